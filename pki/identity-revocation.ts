import { PKI_CODES, PkiError } from "./errors.js";
import {
  assertRevocationReason,
  type InventoryEntry,
  type InventoryFile,
  type RevocationReason,
  type RevokedIdentity,
  readInventory,
  updateInventory,
} from "./inventory.js";
import { revokeJoinTokensOf } from "./join-tokens.js";
import { parseSpiffeId } from "./spiffe.js";

/**
 * A revocation for these reasons keeps the identity: the certificate was
 * replaced (rotation) or is only on hold. Any other reason also bars the
 * identity from enrolling again.
 */
const KEEPS_IDENTITY: readonly RevocationReason[] = ["superseded", "certificateHold"];

/**
 * Records in `inv` that `entry`'s identity may not enroll again, unless the
 * reason keeps it (superseded, certificateHold). Returns the barred SPIFFE id.
 */
export function barIdentity(
  inv: InventoryFile,
  entry: Pick<InventoryEntry, "spiffeId" | "role">,
  reason: RevocationReason,
  at: Date,
): string | undefined {
  if (!entry.spiffeId || entry.role === "server" || KEEPS_IDENTITY.includes(reason)) return undefined;
  addBar(inv, entry.spiffeId, reason, at);
  return entry.spiffeId;
}

function addBar(inv: InventoryFile, spiffeId: string, reason: RevocationReason, at: Date): void {
  inv.revokedIdentities ??= [];
  if (!inv.revokedIdentities.some((r) => r.spiffeId === spiffeId)) {
    inv.revokedIdentities.push({ spiffeId, revokedAt: at, reason });
  }
}

/**
 * Revokes the tokens a barred compute identity enrolled with; a no-op for
 * other identities and when nothing was barred.
 */
export async function revokeTokensOfBarred(dir: string, barred: string | undefined, at: Date): Promise<void> {
  const parsed = barred ? parseSpiffeId(barred) : undefined;
  if (parsed?.role === "compute") await revokeJoinTokensOf(dir, parsed.id, at);
}

/**
 * Takes identity `spiffeId` away in the PKI in `dir`: every certificate it
 * holds is revoked, it is barred from enrolling again, and the join tokens it
 * enrolled with are revoked. Idempotent (the first date and reason stand).
 * Returns the certificates revoked now and whether the PKI had ever issued
 * the identity or barred it before.
 */
export async function revokeIdentity(
  dir: string,
  spiffeId: string,
  reason: RevocationReason = "privilegeWithdrawn",
  at: Date = new Date(),
): Promise<{ revoked: InventoryEntry[]; known: boolean }> {
  assertRevocationReason(reason);
  if (!parseSpiffeId(spiffeId)) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_ID, `${JSON.stringify(spiffeId)} is not a Shoal SPIFFE id`, {
      fix: "name it as spiffe://<trust-domain>/<compute|orchestrator|user>/<id>",
    });
  }
  const result = await updateInventory(dir, (inv) => {
    const known =
      inv.certificates.some((e) => e.spiffeId === spiffeId) ||
      (inv.revokedIdentities ?? []).some((r) => r.spiffeId === spiffeId);
    const revoked: InventoryEntry[] = [];
    for (const entry of inv.certificates) {
      if (entry.spiffeId !== spiffeId || entry.status === "revoked") continue;
      entry.status = "revoked";
      entry.revokedAt = at;
      entry.reason = reason;
      revoked.push({ ...entry });
    }
    addBar(inv, spiffeId, reason, at);
    return { revoked, known };
  });
  await revokeTokensOfBarred(dir, spiffeId, at);
  return result;
}

/** The identities of the PKI in `dir` that may not enroll again. */
export async function revokedIdentities(dir: string): Promise<RevokedIdentity[]> {
  return (await readInventory(dir)).revokedIdentities ?? [];
}

/**
 * The revocation of `spiffeId` when it is barred from enrolling again in the
 * PKI in `dir`, else undefined. Enrollment checks this before it signs
 * (`redeemJoinToken` does so for compute ids).
 */
export async function isIdentityRevoked(dir: string, spiffeId: string): Promise<RevokedIdentity | undefined> {
  return (await revokedIdentities(dir)).find((r) => r.spiffeId === spiffeId);
}
