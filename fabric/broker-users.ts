import { createHash, X509Certificate } from "node:crypto";
import { parseSpiffeId } from "../pki/index.js";
import { type NatsPermissions, permissionsFor } from "./permissions.js";

/** One certificate-backed identity the broker may admit (from the PKI inventory or config). */
export interface BrokerIdentity {
  /** The certificate's URI SAN, `spiffe://<td>/<role>/<id>`. */
  readonly spiffeId: string;
  /** Start of the certificate's validity; absent means "already valid". */
  readonly notBefore?: Date;
  readonly notAfter: Date;
  readonly revoked?: boolean;
  /**
   * Hex SHA-256 of the certificate's DER SubjectPublicKeyInfo (what nats-server's
   * `pinned_certs` matches). When every identity has one, the broker admits only
   * these keys, so revoking one of two certificates of the same identity locks the
   * revoked one out even though the user (the SPIFFE id) stays.
   */
  readonly publicKeySha256?: string;
}

export interface BrokerUser {
  /** nats-server `user`, matched by `verify_and_map` against the URI SAN. */
  readonly user: string;
  readonly permissions: NatsPermissions;
  /** Pinned public keys of this user's live certificates (sorted), when known. */
  readonly keys?: readonly string[];
}

export type ExclusionReason = "expired" | "revoked" | "not-yet-valid" | "no-broker-access" | "inbox-conflict";

/** The broker's users at one instant; a pure function of the identities and the clock. */
export interface BrokerUsers {
  /** Sorted by `user`, one entry per SPIFFE id with at least one live certificate. */
  readonly users: readonly BrokerUser[];
  /** Every live public key (sorted), or `undefined` when some identity has no key hash. */
  readonly pinnedKeys: readonly string[] | undefined;
  /** Identities left out, and why (logged by the supervisor). */
  readonly excluded: readonly { spiffeId: string; reason: ExclusionReason }[];
  /** The next instant at which the clock alone changes the result (an expiry or a notBefore). */
  readonly nextChangeAt: Date | undefined;
}

/**
 * Computes the broker's users from certificate-backed identities at `now`.
 *
 * nats-server checks a certificate only at the handshake, so an expired or
 * revoked identity must leave the user list (and the server be reloaded) for its
 * live connection to close; `nextChangeAt` tells the caller when to recompute.
 * A compute id equal to an orchestrator id is refused: both would own the inbox
 * `_INBOX_<id>.>` and the node could read the orchestrator's replies.
 */
export function computeBrokerUsers(identities: readonly BrokerIdentity[], now: Date): BrokerUsers {
  const t = now.getTime();
  const live = new Map<string, { permissions: NatsPermissions; keys: Set<string>; unkeyed: boolean }>();
  const excluded: { spiffeId: string; reason: ExclusionReason }[] = [];
  let next: number | undefined;
  const consider = (at: number) => {
    if (at > t && (next === undefined || at < next)) next = at;
  };
  for (const identity of identities) {
    if (identity.revoked) {
      excluded.push({ spiffeId: identity.spiffeId, reason: "revoked" });
      continue;
    }
    const notBefore = identity.notBefore?.getTime() ?? Number.NEGATIVE_INFINITY;
    const notAfter = identity.notAfter.getTime();
    if (notBefore > t) {
      consider(notBefore);
      excluded.push({ spiffeId: identity.spiffeId, reason: "not-yet-valid" });
      continue;
    }
    if (notAfter <= t) {
      excluded.push({ spiffeId: identity.spiffeId, reason: "expired" });
      continue;
    }
    consider(notAfter);
    const permissions = permissionsFor(identity.spiffeId);
    if (!permissions) {
      excluded.push({ spiffeId: identity.spiffeId, reason: "no-broker-access" });
      continue;
    }
    const entry = live.get(identity.spiffeId) ?? { permissions, keys: new Set<string>(), unkeyed: false };
    if (identity.publicKeySha256) entry.keys.add(identity.publicKeySha256.toLowerCase());
    else entry.unkeyed = true;
    live.set(identity.spiffeId, entry);
  }
  const orchestratorIds = new Set(
    [...live.keys()].map((s) => parseSpiffeId(s)).flatMap((p) => (p?.role === "orchestrator" ? [p.id] : [])),
  );
  for (const spiffeId of [...live.keys()]) {
    const p = parseSpiffeId(spiffeId);
    if (p?.role === "compute" && orchestratorIds.has(p.id)) {
      live.delete(spiffeId);
      excluded.push({ spiffeId, reason: "inbox-conflict" });
    }
  }
  const users: BrokerUser[] = [...live.entries()]
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([user, e]) => ({
      user,
      permissions: e.permissions,
      ...(e.unkeyed ? {} : { keys: [...e.keys].sort() }),
    }));
  const pinnedKeys =
    users.length > 0 && users.every((u) => u.keys) ? users.flatMap((u) => u.keys ?? []).sort() : undefined;
  return { users, pinnedKeys, excluded, nextChangeAt: next === undefined ? undefined : new Date(next) };
}

/**
 * Users that stay in the list but lost a pinned key between `before` and `after`
 * (one of their certificates was revoked or expired). nats-server does not
 * re-check pins on reload, so their connections must be closed by reloading once
 * without them (the holder of a still-valid certificate reconnects).
 */
export function usersLosingKeys(before: BrokerUsers, after: BrokerUsers): string[] {
  const old = new Map(before.users.map((u) => [u.user, u.keys]));
  const out: string[] = [];
  for (const u of after.users) {
    const prev = old.get(u.user);
    if (!prev || !u.keys) continue;
    const now = new Set(u.keys);
    if (prev.some((k) => !now.has(k))) out.push(u.user);
  }
  return out;
}

/** True when two user sets would render the same broker configuration. */
export function sameBrokerUsers(a: BrokerUsers, b: BrokerUsers): boolean {
  return JSON.stringify([a.users, a.pinnedKeys]) === JSON.stringify([b.users, b.pinnedKeys]);
}

/**
 * The broker identity a certificate stands for, with its key pinned (for callers
 * that hold the certificate files, e.g. the PKI directory's issued certificates).
 */
export function brokerIdentityFromCertificate(certPem: string, revoked = false): BrokerIdentity | undefined {
  const leaf = new X509Certificate(certPem);
  const spiffeId = leaf.subjectAltName?.match(/URI:(spiffe:\/\/[^,\s]+)/)?.[1];
  if (!spiffeId) return undefined;
  return {
    spiffeId,
    notBefore: new Date(leaf.validFrom),
    notAfter: new Date(leaf.validTo),
    revoked,
    publicKeySha256: createHash("sha256")
      .update(leaf.publicKey.export({ type: "spki", format: "der" }))
      .digest("hex"),
  };
}
