import {
  executionTimeoutMs,
  type JobSpec,
  jobResources,
  parseJobSpec,
  queueTimeoutMs,
  separateModules,
  storedModules,
} from "../core/index.js";
import type { JobRequirements } from "./dispatcher.js";
import type { ParsedJob } from "./job-service.js";
import type { JobRecord } from "./records.js";

/** Validates a submitted spec (core/job-spec); throws JobSpecError naming the field → HTTP 400. */
export function parseSubmittedJob(raw: unknown): ParsedJob {
  const { spec, modules } = separateModules(parseJobSpec(raw as object));
  return {
    spec,
    modules,
    namedModules: storedModules(spec),
    name: spec.Name,
    namespace: spec.Namespace,
    type: spec.Type,
    count: spec.Type === "batch" ? (spec.Count ?? 1) : 0,
  };
}

/**
 * What the scheduler needs of a stored job. The job's own timeouts are capped
 * by the cluster's (`Orchestrator.Scheduler.*`): a job may ask for less time,
 * not more.
 */
export function jobRequirements(
  job: JobRecord,
  limits: { executionTimeoutMs: number; queueTimeoutMs: number },
): JobRequirements {
  const spec = job.Spec as JobSpec;
  return {
    resources: jobResources(spec),
    executionTimeoutMs: Math.min(limits.executionTimeoutMs, ...spec.Tasks.map(executionTimeoutMs)),
    queueTimeoutMs: Math.min(limits.queueTimeoutMs, queueTimeoutMs(spec)),
  };
}
