import { JetStreamApiError, JetStreamError } from "@nats-io/jetstream";
import {
  ClosedConnectionError,
  ConnectionError,
  DrainingConnectionError,
  NoRespondersError,
  RequestError,
  TimeoutError,
} from "@nats-io/transport-node";
import { defineCodes, ShoalError } from "../core/index.js";

export const ORCHESTRATOR_CODES = defineCodes("orchestrator", {
  SHOAL_ORCH_REQUEST_INVALID: "An API request body, query or path parameter does not fit its schema.",
  SHOAL_ORCH_JOB_NOT_FOUND: "No job with that ID.",
  SHOAL_ORCH_NODE_NOT_FOUND: "No node with that ID.",
  SHOAL_ORCH_JOB_FINISHED: "The job is already Completed, Failed or Stopped.",
  SHOAL_ORCH_JOB_CONFLICT:
    "Another orchestrator of the cluster kept changing the job (its owner, or one taking it over) while this one tried to take it over to stop it.",
  SHOAL_ORCH_RESULTS_NOT_FOUND: "The job, execution or result file has no stored result.",
  SHOAL_ORCH_SHUTTING_DOWN: "The orchestrator is shutting down and takes no new work.",
  SHOAL_ORCH_STATE_STORE: "The JetStream KV state store cannot be reached or written.",
  SHOAL_ORCH_DATA_DIR: "The data directory cannot be created or used.",
  SHOAL_ORCH_JOB_LIMIT:
    "Too many jobs have not ended yet (Orchestrator.Scheduler.MaxUnfinishedJobs in all, or MaxUnfinishedJobsPerSubmitter of this submitter): no new job is taken until some end (HTTP 429).",
  SHOAL_ORCH_DISK_FULL:
    "The data directory's file system has less free space than Orchestrator.Storage.MinFree: no new job is taken (HTTP 507).",
  SHOAL_ORCH_CLUSTER_QUORUM:
    "A clustered orchestrator's JetStream did not become available in time (too few of the cluster's servers are up or routed).",
  SHOAL_ORCH_NODE_ID_TAKEN:
    "Enrollment asked for a node id that another live (unexpired, unrevoked) certificate already holds.",
  SHOAL_ORCH_ENROLL_REJECTED: "An operator rejected this node's enrollment request (`shoal node reject`).",
  SHOAL_ORCH_ENROLL_LIMIT:
    "Too many enrollment requests without a join token already wait for approval (in all, or from this address).",
  SHOAL_ORCH_NATS_NOT_ADMITTED:
    "The operator-run NATS server (Orchestrator.NATS.Servers) has no user for the orchestrator's identity: the users block Shoal wrote is not included, or the server was not reloaded.",
  SHOAL_ORCH_NATS_NO_JETSTREAM:
    "The operator-run NATS server does not offer JetStream, where the orchestrator keeps its state.",
  SHOAL_ORCH_NATS_EXTERNAL_CONFIG:
    "Settings that cannot be combined with operator-run NATS servers (Orchestrator.NATS.Servers), e.g. Orchestrator.Cluster.*.",
  SHOAL_ORCH_AUTH_CONFIG:
    "API.Auth settings that cannot work, e.g. sharedSecret enabled without SHOAL_SHARED_SECRET.",
});

/**
 * An error the API turns into an HTTP status and the body
 * `{ error: { code, message, fix, field } }`.
 */
export class OrchestratorError extends ShoalError {
  constructor(
    code: keyof typeof ORCHESTRATOR_CODES,
    message: string,
    readonly status: number,
    options: { cause?: unknown; fix?: string; field?: string } = {},
  ) {
    super(code, message, options);
    this.field = options.field;
  }
  readonly field: string | undefined;
}

export function jobNotFound(id: string): OrchestratorError {
  return new OrchestratorError(ORCHESTRATOR_CODES.SHOAL_ORCH_JOB_NOT_FOUND, `no job ${id}`, 404, {
    fix: "list jobs with `shoal job list`",
  });
}

export function jobConflict(id: string): OrchestratorError {
  return new OrchestratorError(
    ORCHESTRATOR_CODES.SHOAL_ORCH_JOB_CONFLICT,
    `job ${id} is being changed by another orchestrator of the cluster`,
    409,
    {
      fix: "retry the stop; or stop it at the orchestrator that owns it (Orchestrator in `shoal job describe`)",
    },
  );
}

export function nodeNotFound(id: string): OrchestratorError {
  return new OrchestratorError(ORCHESTRATOR_CODES.SHOAL_ORCH_NODE_NOT_FOUND, `no node ${id}`, 404, {
    fix: "list nodes with `shoal node list`",
  });
}

export function shuttingDown(): OrchestratorError {
  return new OrchestratorError(
    ORCHESTRATOR_CODES.SHOAL_ORCH_SHUTTING_DOWN,
    "the orchestrator is shutting down",
    503,
    { fix: "retry once it is back up" },
  );
}

/** `why` says which limit of unfinished jobs is reached; a 429 the caller may retry once jobs end. */
export function jobLimit(why: string, key: string): OrchestratorError {
  return new OrchestratorError(ORCHESTRATOR_CODES.SHOAL_ORCH_JOB_LIMIT, `no new job taken: ${why}`, 429, {
    fix: `retry once some of them have ended (\`shoal job list --state Queued\`; stop those no longer wanted with \`shoal job stop ID\`), or the operator raises ${key} (0 sets no limit)`,
  });
}

/** `shortfall` says how little room is left (DiskSpace); a 507 the caller may retry later. */
export function diskFull(shortfall: string): OrchestratorError {
  return new OrchestratorError(
    ORCHESTRATOR_CODES.SHOAL_ORCH_DISK_FULL,
    `no room for new jobs: ${shortfall}`,
    507,
    {
      fix: "retry later; the operator frees space under the data directory (finished jobs go by Orchestrator.JobGC) or lowers Orchestrator.Storage.MinFree",
    },
  );
}

/** The broker's and JetStream's own errors: a timeout, no responders, a closed connection, a refused write. */
const STORE_FAILURES = [
  TimeoutError,
  RequestError,
  NoRespondersError,
  ClosedConnectionError,
  DrainingConnectionError,
  ConnectionError,
  JetStreamError,
  JetStreamApiError,
];

/** Whether `err` came from the broker or JetStream: the state store is unavailable, the request is not wrong. */
export function isStoreFailure(err: unknown): boolean {
  return STORE_FAILURES.some((failure) => err instanceof failure);
}

/** `message` says what could not be stored or read; a 503 the caller may retry. */
export function storeUnavailable(message: string, cause: unknown): OrchestratorError {
  return new OrchestratorError(ORCHESTRATOR_CODES.SHOAL_ORCH_STATE_STORE, message, 503, {
    cause,
    fix: "retry once the store is writable; the nats-server log lines say why it is not (in a cluster: are the other orchestrators up?)",
  });
}
