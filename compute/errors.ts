import { defineCodes, ShoalError } from "../core/index.js";

export const COMPUTE_CODES = defineCodes("compute", {
  SHOAL_COMPUTE_IDENTITY:
    "The node's own certificate is missing, unreadable, outside its validity, not chained to the CA or not a compute identity.",
  SHOAL_COMPUTE_CA_MISMATCH:
    "Enrollment: the CA the orchestrator API serves is not the one pinned with --ca-fingerprint (wrong host, or someone in between).",
  SHOAL_COMPUTE_ENROLL:
    "Enrollment could not complete: the API is unreachable, its TLS certificate is not from the pinned CA, or its answer is not a valid identity.",
  SHOAL_COMPUTE_CERT_EXPIRED:
    "The node's certificate expired before it could be renewed (the orchestrator was unreachable for too long).",
  SHOAL_COMPUTE_NOT_ADMITTED:
    "The broker refused this node's new identity, which it never admitted before: it was not reloaded for it yet (external NATS: the operator must reload their nats-server); the node waits and retries.",
  SHOAL_COMPUTE_REJECTED: "The orchestrator rejected this node's registration (`shoal node reject`).",
  SHOAL_COMPUTE_DATA_DIR_LOCKED: "Another compute node already runs with this data directory.",
  SHOAL_COMPUTE_SPOOL: "A pending result in the spool cannot be read or written.",
  SHOAL_COMPUTE_NOT_RUNNING: "The compute node was used before start() or after close().",
});

export type ComputeCode = keyof typeof COMPUTE_CODES;

/** A failure of the compute daemon; `code` says which. */
export class ComputeError extends ShoalError {
  declare readonly code: ComputeCode;

  constructor(code: ComputeCode, message: string, options: { cause?: unknown; fix?: string } = {}) {
    super(code, message, options);
  }
}
