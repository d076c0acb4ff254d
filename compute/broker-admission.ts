import { promises as fs } from "node:fs";
import path from "node:path";
import { writeFileAtomic } from "../core/index.js";

/** `DATA-DIR/broker-admission.json`: the identity the broker once let in, and when. */
export const ADMISSION_FILE = "broker-admission.json";

/** What {@link ADMISSION_FILE} holds. */
export interface BrokerAdmission {
  /** The SPIFFE id the broker accepted (broker users are per identity, so renewal keeps it). */
  Identity: string;
  /** ISO time of the first accepted connection. */
  FirstAdmittedAt: string;
}

/**
 * What a node does when the broker refuses its identity at connect time
 * (`Authorization Violation`). The broker's refusal is the same for "not a
 * user yet" and "no longer a user", so the node decides on what it knows
 * itself: an identity the broker admitted before was taken away (revoked,
 * deleted or expired; the node's own validity is checked before dialing), so
 * it stops; an identity never admitted is new — the broker has not been
 * reloaded for it yet (an operator-run server in external NATS mode, or the
 * moment between issuing and the supervised server's reload) — so it waits.
 */
export type RefusalDecision =
  | { readonly action: "wait" }
  | { readonly action: "stop"; readonly admittedAt: string };

/** Pure: the decision for `identity` given the recorded admission, if any. */
export function decideOnRefusal(identity: string, admission: BrokerAdmission | undefined): RefusalDecision {
  if (admission && admission.Identity === identity) {
    return { action: "stop", admittedAt: admission.FirstAdmittedAt };
  }
  return { action: "wait" };
}

/** The recorded admission, or undefined (none yet, another identity's, or unreadable). */
export async function readAdmission(dataDir: string): Promise<BrokerAdmission | undefined> {
  try {
    const parsed = JSON.parse(await fs.readFile(path.join(dataDir, ADMISSION_FILE), "utf8")) as unknown;
    const a = parsed as Partial<BrokerAdmission>;
    if (typeof a?.Identity === "string" && typeof a.FirstAdmittedAt === "string") {
      return { Identity: a.Identity, FirstAdmittedAt: a.FirstAdmittedAt };
    }
  } catch {
    // missing or unreadable: treated as never admitted (the node waits rather than stops)
  }
  return undefined;
}

/** Records the first admission of `identity`; keeps an existing record of the same identity. */
export async function recordAdmission(dataDir: string, identity: string, now: Date): Promise<void> {
  if ((await readAdmission(dataDir))?.Identity === identity) return;
  const record: BrokerAdmission = { Identity: identity, FirstAdmittedAt: now.toISOString() };
  await writeFileAtomic(path.join(dataDir, ADMISSION_FILE), `${JSON.stringify(record, null, 2)}\n`, 0o600);
}
