import type { ExecutionState, JobState } from "../core/index.js";
import type { Approval, Resources, Submitter } from "../fabric/protocol.js";

/**
 * What the orchestrator stores (JetStream KV buckets `shoal-jobs`,
 * `shoal-executions`, `shoal-nodes`, `shoal-events`) and what the API returns.
 * Field names are Bacalhau's (PascalCase) so scripts written for its API read
 * Shoal's the same way. Times are milliseconds since the epoch.
 */

export type { ExecutionState, JobState };
export const TERMINAL_JOB_STATES: ReadonlySet<JobState> = new Set(["Completed", "Failed", "Stopped"]);
export const TERMINAL_EXECUTION_STATES: ReadonlySet<ExecutionState> = new Set([
  "BidRejected",
  "Completed",
  "Failed",
  "Cancelled",
  "Lost",
]);

export type NodeHealth = "HEALTHY" | "UNHEALTHY" | "LOST";

export interface JobRecord {
  ID: string;
  Name: string;
  Namespace: string;
  Type: "batch" | "ops";
  /** The validated spec as submitted (core/job-spec). */
  Spec: unknown;
  Submitter: Submitter;
  State: JobState;
  StateMessage: string;
  /** Executions the job needs to complete (batch: Count; ops: the matching nodes when first placed). */
  Count: number;
  /** Reschedules spent after node losses, against Orchestrator.Scheduler.RetryBudget. */
  Retries: number;
  CreateTime: number;
  ModifyTime: number;
  /** When it last started waiting for a node, for QueueTimeout. */
  QueuedSince?: number;
  /**
   * In a cluster: the job's owner (its nats `server_name`), which alone
   * dispatches it and writes its records: the orchestrator that accepted it,
   * until another takes it over (lease expired, or a stop there). Absent for
   * a single orchestrator.
   */
  Orchestrator?: string;
}

export interface ResultFile {
  name: string;
  size: number;
  sha256: string;
}

export interface ExecutionRecord {
  ID: string;
  JobID: string;
  NodeID: string;
  State: ExecutionState;
  StateMessage: string;
  Resources: Resources;
  CreateTime: number;
  ModifyTime: number;
  /** When the node must be done, for the orchestrator's own ExecutionTimeout. */
  Deadline?: number;
  /**
   * Set on a `BidRejected` whose node did not answer the bid (nobody listened,
   * or no reply in time): it did not decline the job, and may be asked again
   * once it is seen after that (scheduler.ts).
   */
  Unanswered?: boolean;
  /**
   * Set on a `BidRejected` that the node declined for want of disk room: a passing
   * condition, so it too may be asked again once seen after that (scheduler.ts).
   */
  ShortOfDisk?: boolean;
  ExitCode?: number;
  Stdout?: string;
  Stderr?: string;
  StdoutTruncated?: boolean;
  StderrTruncated?: boolean;
  /** Result files stored under DATA-DIR/results/<job>/<execution>/, digests verified. */
  Results?: ResultFile[];
}

export interface JobEvent {
  Time: number;
  JobID: string;
  ExecutionID?: string;
  NodeID?: string;
  Type: "JobStateUpdate" | "ExecutionStateUpdate";
  State: string;
  PreviousState?: string;
  Message: string;
}

export interface NodeRecord {
  ID: string;
  Labels: Record<string, string>;
  Capacity: Resources;
  Engines: string[];
  Version: string;
  Approval: Approval;
  Health: NodeHealth;
  /** Last register or heartbeat. */
  LastSeen: number;
  FirstSeen: number;
  /** The node's certificate chain from its last register, for envelope verification. */
  ChainPem: string;
  /** Set while the node reports its disk short of room (Compute.Storage.MinFree): no job is placed there. */
  LowDisk?: string;
}

/** A job with its executions, as `GET .../jobs/{id}` returns it. */
export interface JobView extends JobRecord {
  Executions: ExecutionRecord[];
}
