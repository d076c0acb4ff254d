/**
 * The fabric's subject names (DESIGN.md "Subjects and permissions"). Every
 * subject a daemon publishes or subscribes to is built here, so the broker's
 * permissions (permissions.ts) and the envelope's subject/role check
 * (envelope.ts) agree with what the daemons actually use.
 *
 * Ids are validated by the PKI (`[a-z0-9][a-z0-9_-]{0,62}`), so they never
 * hold `.`, `*`, `>` or white space and cannot widen a subject.
 */
export const SUBJECT_ROOT = "shoal";

export const subjects = {
  /** orchestrator → compute `<id>`: bid requests, run, cancel, renewal replies. */
  computeIn: (nodeId: string): string => `${SUBJECT_ROOT}.compute.${nodeId}.in`,
  /** Every node's inbound subject, for the orchestrator's publish permission. */
  computeInAny: `${SUBJECT_ROOT}.compute.*.in`,
  /** compute `<id>` → orchestrator, one subject per message kind. */
  computeOut: (nodeId: string, kind: string): string => `${SUBJECT_ROOT}.compute.${nodeId}.out.${kind}`,
  /** Everything compute `<id>` may publish. */
  computeOutAll: (nodeId: string): string => `${SUBJECT_ROOT}.compute.${nodeId}.out.>`,
  /** Everything any compute node publishes: the orchestrator's subscription. */
  computeOutAny: `${SUBJECT_ROOT}.compute.*.out.>`,
  /** orchestrator → all: revocations, trust-bundle updates. */
  broadcast: (kind: string): string => `${SUBJECT_ROOT}.broadcast.${kind}`,
  broadcastAll: `${SUBJECT_ROOT}.broadcast.>`,
  /**
   * The per-identity inbox prefix (nats.js `inboxPrefix`). The shared `_INBOX.>`
   * would let any node read every reply, so each identity gets its own.
   */
  inboxPrefix: (id: string): string => `_INBOX_${id}`,
  inboxAll: (id: string): string => `_INBOX_${id}.>`,
} as const;

/** What a concrete subject means; `undefined` for subjects outside the fabric. */
export type ParsedSubject =
  | { type: "compute-in"; nodeId: string }
  | { type: "compute-out"; nodeId: string; kind: string }
  | { type: "broadcast"; kind: string }
  | { type: "inbox"; owner: string };

/** Splits a concrete (wildcard-free) fabric subject into its meaning. */
export function parseSubject(subject: string): ParsedSubject | undefined {
  const t = subject.split(".");
  if (t[0]?.startsWith("_INBOX_") && t.length >= 2) {
    const owner = t[0].slice("_INBOX_".length);
    return owner ? { type: "inbox", owner } : undefined;
  }
  if (t[0] !== SUBJECT_ROOT) return undefined;
  if (t[1] === "compute" && t.length === 4 && t[3] === "in" && t[2]) {
    return { type: "compute-in", nodeId: t[2] };
  }
  if (t[1] === "compute" && t.length === 5 && t[3] === "out" && t[2] && t[4]) {
    return { type: "compute-out", nodeId: t[2], kind: t[4] };
  }
  if (t[1] === "broadcast" && t.length === 3 && t[2]) return { type: "broadcast", kind: t[2] };
  return undefined;
}
