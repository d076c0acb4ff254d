import { type JobSpec, separateModules, storedModules } from "../core/index.js";
import { type ApiClient, ApiResponseError } from "./api-client.js";

/** A module at least this large is first named by its digest only. @default 256 KiB */
export const NAME_MODULE_FIRST_BYTES = 256 * 1024;

const JOBS = "/api/v1/orchestrator/jobs";

/**
 * Submits a job and returns its id. The orchestrator stores each module once,
 * by digest (core/job-spec `separateModules`), so a large module it already
 * has (an earlier run of it) need not travel again: the job is first sent
 * naming it by digest, and only when the orchestrator answers that no such
 * module is stored is it sent again with the module inline. A small module
 * goes inline at once, in one request.
 */
export async function submitJob(api: ApiClient, spec: JobSpec): Promise<string> {
  const { spec: byDigest, modules } = separateModules(spec);
  if ([...modules.values()].some((m) => m.length >= NAME_MODULE_FIRST_BYTES)) {
    const named = new Set(storedModules(byDigest).map((m) => m.field));
    try {
      return (await api.put<{ JobID: string }>(JOBS, { Job: byDigest })).JobID;
    } catch (err) {
      const unknownModule =
        err instanceof ApiResponseError && err.code === "SHOAL_JOB_INVALID" && named.has(err.field ?? "");
      if (!unknownModule) throw err;
    }
  }
  return (await api.put<{ JobID: string }>(JOBS, { Job: spec })).JobID;
}
