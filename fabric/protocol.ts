import { type Static, Type as T, type TSchema } from "@sinclair/typebox";
import { type TypeCheck, TypeCompiler } from "@sinclair/typebox/compiler";
import { NodeLabelsSchema } from "../core/index.js";

/**
 * The job protocol between the orchestrator and compute nodes: the kinds of
 * message (the envelope's `typ`) and the schema of each body. Both daemons
 * validate every body they receive against these schemas, so a node that sends
 * garbage is logged and ignored, never trusted.
 *
 * Directions (see DESIGN.md "Subjects and permissions"):
 * - compute → orchestrator on `shoal.compute.<id>.out.<kind>`: register, heartbeat,
 *   status, logs, result, result-chunk, renew, module. `register`, `result`,
 *   `renew` and `module` are requests: the orchestrator replies on the node's
 *   inbox (`renew-reply` carries the new chain, `module-reply` a module's bytes).
 * - orchestrator → compute on `shoal.compute.<id>.in`: bid, run, cancel. `bid`
 *   and `run` are requests: the node replies (allow_responses).
 * - orchestrator → all on `shoal.broadcast.<kind>`: revocation, certificate (the
 *   orchestrator's renewed identity chain, so nodes verify what it signs next).
 */

const Resources = T.Object({
  /** CPU cores (fractions allowed). */
  cpu: T.Number({ minimum: 0 }),
  /** Memory in bytes. */
  memory: T.Number({ minimum: 0 }),
});
export type Resources = Static<typeof Resources>;

/** Who submitted a job, as the API authenticated them. */
const Submitter = T.Object({
  sub: T.String(),
  namespace: T.String(),
  method: T.String(),
});
export type Submitter = Static<typeof Submitter>;

/**
 * Most output bytes a `result` carries as its last log lines (`logs`): what was
 * not streamed yet when the execution ended, if no more than this; else it is
 * streamed as `logs` messages first. @default 8 KiB
 */
export const RESULT_LOG_TAIL_BYTES = 8 * 1024;

/** One batch of an execution's output: `seq` counts up from 0 across both streams. */
const LogLine = {
  stream: T.Union([T.Literal("stdout"), T.Literal("stderr")]),
  seq: T.Integer({ minimum: 0 }),
  /** base64 */
  data: T.String(),
};

export const Approval = T.Union([T.Literal("APPROVED"), T.Literal("PENDING"), T.Literal("REJECTED")]);
export type Approval = Static<typeof Approval>;

export const BODY_SCHEMAS = {
  register: T.Object({
    nodeId: T.String(),
    /** The node's certificate chain (leaf first), so verifiers can cache it by fingerprint. */
    chainPem: T.String(),
    /** As an operator may give them (core/node-labels); a node cannot register others. */
    labels: NodeLabelsSchema,
    capacity: Resources,
    engines: T.Array(T.String()),
    version: T.String(),
    /** Executions the node still runs or holds unacknowledged results for (resync after reconnect). */
    executions: T.Array(T.Object({ executionId: T.String(), state: T.String() })),
    /** Set while the node's disk has less room than it keeps (Compute.Storage.MinFree): what is short. */
    lowDisk: T.Optional(T.String({ maxLength: 1024 })),
  }),
  "register-reply": T.Object({
    approval: Approval,
    heartbeatIntervalMs: T.Integer({ minimum: 100 }),
    /** The orchestrator's chain, so the node can verify what it signs. */
    chainPem: T.String(),
    reason: T.Optional(T.String()),
  }),
  heartbeat: T.Object({
    nodeId: T.String(),
    seq: T.Integer({ minimum: 0 }),
    allocated: Resources,
    running: T.Array(T.String()),
    /** As in `register`: set while the node's disk is short of room. */
    lowDisk: T.Optional(T.String({ maxLength: 1024 })),
  }),
  bid: T.Object({
    jobId: T.String(),
    executionId: T.String(),
    /** The whole validated job spec (core/job-spec), so the node can apply its job-selection policy. */
    spec: T.Unknown(),
    submitter: Submitter,
    resources: Resources,
    /**
     * The run, carried by the bid: a node that accepts starts the execution at
     * once (saving the `run` round trip) and answers `started: true`. A node
     * that does not start it answers without `started`, and `run` follows.
     */
    run: T.Optional(T.Object({ timeoutMs: T.Integer({ minimum: 1 }) })),
  }),
  "bid-reply": T.Object({
    accept: T.Boolean(),
    reason: T.Optional(T.String()),
    /** The bid carried the run and the execution is running. */
    started: T.Optional(T.Boolean()),
    /**
     * Refused only for want of free capacity now (e.g. an execution it was just
     * told to cancel has not ended yet): asking again shortly may succeed.
     */
    busy: T.Optional(T.Boolean()),
    /**
     * Refused because the node's disk is short of room (what is short): a passing
     * condition, so the node may be asked again for the job once heard from after it.
     */
    lowDisk: T.Optional(T.String()),
  }),
  run: T.Object({
    jobId: T.String(),
    executionId: T.String(),
    spec: T.Unknown(),
    submitter: Submitter,
    timeoutMs: T.Integer({ minimum: 1 }),
  }),
  "run-reply": T.Object({ accepted: T.Boolean(), reason: T.Optional(T.String()) }),
  cancel: T.Object({ executionId: T.String(), reason: T.String() }),
  status: T.Object({
    executionId: T.String(),
    state: T.Union([T.Literal("Running"), T.Literal("Failed"), T.Literal("Cancelled")]),
    error: T.Optional(T.String()),
  }),
  logs: T.Object({ executionId: T.String(), ...LogLine }),
  /** One chunk of one result file; `sha256` is of the decoded `data`, and the envelope signs it all. */
  "result-chunk": T.Object({
    executionId: T.String(),
    file: T.String(),
    index: T.Integer({ minimum: 0 }),
    sha256: T.String(),
    data: T.String(),
  }),
  /** The final outcome of an execution with the manifest of its result files; acknowledged by reply. */
  result: T.Object({
    executionId: T.String(),
    state: T.Union([T.Literal("Completed"), T.Literal("Failed")]),
    exitCode: T.Integer(),
    error: T.Optional(T.String()),
    stdout: T.String(),
    stderr: T.String(),
    stdoutTruncated: T.Boolean(),
    stderrTruncated: T.Boolean(),
    files: T.Array(
      T.Object({
        name: T.String(),
        size: T.Integer({ minimum: 0 }),
        sha256: T.String(),
        chunks: T.Array(T.String()),
      }),
    ),
    /**
     * The output not streamed yet when the execution ended (at most
     * RESULT_LOG_TAIL_BYTES), so a short execution's output costs no `logs`
     * message of its own and is acknowledged with the result.
     */
    logs: T.Optional(
      T.Array(
        T.Object({ ...LogLine, data: T.String({ maxLength: Math.ceil(RESULT_LOG_TAIL_BYTES / 3) * 4 }) }),
        {
          maxItems: 2,
        },
      ),
    ),
  }),
  "result-reply": T.Object({ stored: T.Boolean(), reason: T.Optional(T.String()) }),
  /**
   * A node asks for part of a stored module (core/job-spec `stored` source)
   * that one of its executions runs; the orchestrator answers only for an
   * execution it placed on that node, of a job that names the module.
   */
  module: T.Object({
    executionId: T.String({ maxLength: 256 }),
    digest: T.String({ pattern: "^sha256:[0-9a-f]{64}$" }),
    offset: T.Integer({ minimum: 0 }),
  }),
  /**
   * The module's `size`, and its bytes (base64) from the asked offset, at most
   * MODULE_CHUNK_BYTES; or why not, with `unknown` when the orchestrator does
   * not know the execution (yet: in a cluster its record may still be on its
   * way), so the node may ask again shortly.
   */
  "module-reply": T.Object({
    size: T.Optional(T.Integer({ minimum: 0 })),
    data: T.Optional(T.String()),
    reason: T.Optional(T.String()),
    unknown: T.Optional(T.Boolean()),
  }),
  /** A node asks for a new certificate for the same identity: a CSR for a key it just made. */
  renew: T.Object({ csrPem: T.String({ maxLength: 16_384 }) }),
  /** The new chain (leaf first), or why not. */
  "renew-reply": T.Object({ chainPem: T.Optional(T.String()), reason: T.Optional(T.String()) }),
  /** The orchestrator's renewed identity chain; verified against the CA before it is trusted. */
  certificate: T.Object({ chainPem: T.String() }),
  revocation: T.Object({
    serials: T.Array(T.String()),
    fingerprints: T.Array(T.String()),
    identities: T.Array(T.String()),
  }),
} satisfies Record<string, TSchema>;

export type MessageKind = keyof typeof BODY_SCHEMAS;

/** Most module bytes in one `module-reply` (its envelope, base64 twice over, stays well under 1 MiB). */
export const MODULE_CHUNK_BYTES = 256 * 1024;
export type MessageBody<K extends MessageKind> = Static<(typeof BODY_SCHEMAS)[K]>;

/**
 * One compiled checker per kind, built on first use: TypeBox's compiled check is a
 * straight-line function, ~10x cheaper per message than interpreting the schema
 * (`Value.Check`) on the receive path.
 */
const CHECKERS = new Map<MessageKind, TypeCheck<TSchema>>();
function checker(kind: MessageKind): TypeCheck<TSchema> {
  let c = CHECKERS.get(kind);
  if (!c) {
    c = TypeCompiler.Compile(BODY_SCHEMAS[kind]);
    CHECKERS.set(kind, c);
  }
  return c;
}

/** True when `body` has the shape the protocol requires for `kind`. */
export function isValidBody<K extends MessageKind>(kind: K, body: unknown): body is MessageBody<K> {
  return checker(kind).Check(body);
}

/** The first problem with `body`, for the log line that says why a message was ignored. */
export function describeInvalidBody(kind: MessageKind, body: unknown): string {
  const first = checker(kind).Errors(body).First();
  return first ? `${kind}${first.path}: ${first.message}` : `${kind}: valid`;
}
