/** The life of a job, as the orchestrator records it. */
export const JobState = {
  /** Accepted and stored; not yet looked at by the scheduler. */
  Pending: "Pending",
  /** No node can take it now; waits until one can or `QueueTimeout` passes. */
  Queued: "Queued",
  /** At least one execution is placed or running. */
  Running: "Running",
  Completed: "Completed",
  Failed: "Failed",
  /** Stopped by a user. */
  Stopped: "Stopped",
} as const;
export type JobState = (typeof JobState)[keyof typeof JobState];

/** The life of one execution of a job on one node. */
export const ExecutionState = {
  /** Created by the scheduler; no message sent yet. */
  New: "New",
  /** A `bid` request is out to the node. */
  AskForBid: "AskForBid",
  BidAccepted: "BidAccepted",
  /** The node declined (its job-selection policy, or it is busy). */
  BidRejected: "BidRejected",
  Running: "Running",
  Completed: "Completed",
  /** The program failed (non-zero exit, timeout, limit) or the node could not run it. */
  Failed: "Failed",
  /** Cancelled by the orchestrator (job stopped, or no longer needed). */
  Cancelled: "Cancelled",
  /** Its node was lost (deleted, rejected, or gone past the disconnect timeout). */
  Lost: "Lost",
} as const;
export type ExecutionState = (typeof ExecutionState)[keyof typeof ExecutionState];

const TERMINAL_JOB_STATES: ReadonlySet<JobState> = new Set([
  JobState.Completed,
  JobState.Failed,
  JobState.Stopped,
]);
const ACTIVE_EXECUTION_STATES: ReadonlySet<ExecutionState> = new Set([
  ExecutionState.New,
  ExecutionState.AskForBid,
  ExecutionState.BidAccepted,
  ExecutionState.Running,
]);

/** True for Completed, Failed and Stopped: nothing more will happen to the job. */
export function isTerminalJobState(state: JobState): boolean {
  return TERMINAL_JOB_STATES.has(state);
}

/** True while an execution holds (or is about to hold) resources on its node. */
export function isActiveExecutionState(state: ExecutionState): boolean {
  return ACTIVE_EXECUTION_STATES.has(state);
}
