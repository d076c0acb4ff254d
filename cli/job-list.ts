import type { JobRecord } from "../orchestrator/index.js";
import type { ApiClient } from "./api-client.js";

/** The most jobs asked for in one request. */
export const LIST_PAGE_SIZE = 1000;

/**
 * Up to `limit` jobs, newest first, asked for a page at a time. The
 * orchestrator may end a page early, after reading many jobs the caller may
 * not see; its `NextToken` says where to go on.
 */
export async function listJobs(
  api: ApiClient,
  state: string | undefined,
  limit: number,
): Promise<JobRecord[]> {
  const jobs: JobRecord[] = [];
  let next: string | undefined;
  do {
    const page = await api.get<{ Items: JobRecord[]; NextToken?: string }>("/api/v1/orchestrator/jobs", {
      query: { state, limit: Math.min(limit - jobs.length, LIST_PAGE_SIZE), next_token: next },
    });
    jobs.push(...page.Items);
    next = page.NextToken;
  } while (next && jobs.length < limit);
  return jobs;
}
