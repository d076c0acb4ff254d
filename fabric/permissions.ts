import { parseSpiffeId } from "../pki/index.js";
import { FABRIC_CODES, FabricError } from "./errors.js";
import { subjects } from "./subjects.js";

/** One identity's broker permissions, as nats-server's `permissions {}` block holds them. */
export interface NatsPermissions {
  readonly publish: { readonly allow: readonly string[] };
  readonly subscribe: { readonly allow: readonly string[] };
  /**
   * nats-server `allow_responses`: the user may publish once to the reply subject
   * of each request it received, within `expiresMs`. Replies therefore need no
   * publish permission on anyone's inbox.
   */
  readonly allowResponses: { readonly max: number; readonly expiresMs: number };
}

/** How long a node may take to answer a request it received. @default 2 minutes */
export const DEFAULT_RESPONSE_WINDOW_MS = 120_000;

/**
 * The permissions of the broker user for `identity` (a SPIFFE id), exactly the
 * table of DESIGN.md "Subjects and permissions":
 *
 * - compute `<id>`: publish only `shoal.compute.<id>.out.>`; subscribe only
 *   `shoal.compute.<id>.in`, `shoal.broadcast.>`, `_INBOX_<id>.>`; replies to the
 *   orchestrator's requests through `allow_responses`.
 * - orchestrator `<id>`: publish to every node's `.in`, broadcasts, the JetStream
 *   and KV APIs (its state lives in KV); subscribe to every node's `.out.>`,
 *   broadcasts and its own inbox; replies to nodes' requests through
 *   `allow_responses`.
 * - user identities never talk on the fabric: `undefined` (not a broker user).
 */
export function permissionsFor(identity: string): NatsPermissions | undefined {
  const parsed = parseSpiffeId(identity);
  if (!parsed) {
    throw new FabricError(
      FABRIC_CODES.SHOAL_NATS_CONFIG,
      `${JSON.stringify(identity)} is not a Shoal SPIFFE id`,
      {
        fix: "identities look like spiffe://<trust-domain>/<compute|orchestrator>/<id>",
        details: { identity },
      },
    );
  }
  const allowResponses = { max: 1, expiresMs: DEFAULT_RESPONSE_WINDOW_MS };
  switch (parsed.role) {
    case "compute":
      return {
        publish: { allow: [subjects.computeOutAll(parsed.id)] },
        subscribe: {
          allow: [subjects.computeIn(parsed.id), subjects.broadcastAll, subjects.inboxAll(parsed.id)],
        },
        allowResponses,
      };
    case "orchestrator":
      return {
        publish: {
          allow: [
            subjects.computeInAny,
            subjects.broadcastAll,
            // JetStream, KV and object store (result files): API calls, acks and flow-control
            // replies of its own consumers, KV writes, object chunks and metadata.
            "$JS.API.>",
            "$JS.ACK.>",
            "$JS.FC.>",
            "$KV.>",
            "$O.>",
          ],
        },
        subscribe: {
          allow: [subjects.computeOutAny, subjects.broadcastAll, subjects.inboxAll(parsed.id)],
        },
        allowResponses,
      };
    case "user":
      return undefined;
  }
}
