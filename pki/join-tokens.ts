import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import { FileReadError, nodeLabelsProblem, withFileLock, writeFileAtomic } from "../core/index.js";
import { PKI_CODES, PkiError } from "./errors.js";
import { type RevokedIdentity, readInventory } from "./inventory.js";
import { spiffeId } from "./spiffe.js";

/**
 * Join tokens let a new node enroll (CSR + token → certificate) without an
 * operator copying certificates around. A token is `shoal1.<id>.<secret>`: the
 * id finds the record, the 256-bit secret is stored only as its SHA-256 (a
 * fast hash is enough for a random secret) and compared in constant time. A
 * token enrolls `maxUses` nodes (default 1), each node id once, until it
 * expires or is revoked; its labels become the node's labels.
 */
export const JOIN_TOKENS_FILE = "join-tokens.json";
/** @default 1 hour */
export const DEFAULT_JOIN_TOKEN_TTL_MS = 3_600_000;

export interface JoinTokenRecord {
  id: string;
  /** SHA-256 hex of the secret part. */
  secretSha256: string;
  createdAt: Date;
  expiresAt: Date;
  labels: Record<string, string>;
  /** How many nodes may enroll with it. @default 1 */
  maxUses: number;
  /** The node ids that redeemed it, in order. */
  usedBy: string[];
  /** When it was last redeemed. */
  usedAt?: Date;
  /** Set by {@link revokeJoinToken}: the token no longer enrolls anyone. */
  revokedAt?: Date;
}

/** A join token as listed: no secret, plus its state at the time of listing. */
export type JoinTokenView = Omit<JoinTokenRecord, "secretSha256"> & {
  state: "usable" | "used" | "expired" | "revoked";
};

interface JoinTokensFile {
  version: 1;
  tokens: JoinTokenRecord[];
}

const TOKEN_PATTERN = /^shoal1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$/;
const TOKEN_ID_PATTERN = /^[0-9a-f]{16}$/;
/** Spent tokens stay listed (and refused with their reason) this long after they expire. */
const KEEP_SPENT_MS = 24 * 3600 * 1000;

function sha256(text: string): string {
  return createHash("sha256").update(text).digest("hex");
}

/** Reads one stored record; records written before `maxUses` existed were single-use with `usedBy` a string. */
function reviveRecord(raw: Record<string, unknown>): JoinTokenRecord {
  const usedBy = raw.usedBy;
  return {
    ...(raw as unknown as JoinTokenRecord),
    createdAt: new Date(raw.createdAt as string),
    expiresAt: new Date(raw.expiresAt as string),
    maxUses: typeof raw.maxUses === "number" ? raw.maxUses : 1,
    usedBy: Array.isArray(usedBy) ? (usedBy as string[]) : typeof usedBy === "string" ? [usedBy] : [],
    ...(raw.usedAt ? { usedAt: new Date(raw.usedAt as string) } : {}),
    ...(raw.revokedAt ? { revokedAt: new Date(raw.revokedAt as string) } : {}),
  };
}

async function readTokens(dir: string): Promise<JoinTokensFile> {
  await readInventory(dir); // a PKI must exist here (SHOAL_PKI_NOT_FOUND otherwise)
  const file = path.join(dir, JOIN_TOKENS_FILE);
  let text: string;
  try {
    text = await fs.readFile(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return { version: 1, tokens: [] };
    throw new FileReadError(file, err);
  }
  try {
    const data = JSON.parse(text) as { version: unknown; tokens: unknown };
    if (data.version !== 1 || !Array.isArray(data.tokens)) throw new Error("unexpected shape");
    return { version: 1, tokens: (data.tokens as Record<string, unknown>[]).map(reviveRecord) };
  } catch (err) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_INVENTORY_CORRUPT, `${file} is not a valid join token file`, {
      cause: err,
      fix: "delete it to drop every outstanding join token, then create new ones",
    });
  }
}

/**
 * Read-modify-write of the token file under its lock (O_EXCL lock file, so it
 * serialises redemptions across processes and within one). `change` may be
 * async and may throw: the file is then left as it was.
 */
async function updateTokens<T>(dir: string, change: (file: JoinTokensFile) => T | Promise<T>): Promise<T> {
  // Callers in this process (concurrent API requests) queue here instead of
  // polling the lock file against each other; the file lock is for other processes.
  const key = path.resolve(dir);
  const run = (inProcess.get(key) ?? Promise.resolve()).then(() =>
    withFileLock(path.join(dir, `${JOIN_TOKENS_FILE}.lock`), async () => {
      const file = await readTokens(dir);
      const result = await change(file);
      // Secrets' hashes only, but still nobody else's business: 0600.
      await writeFileAtomic(path.join(dir, JOIN_TOKENS_FILE), `${JSON.stringify(file, null, 2)}\n`, 0o600);
      return result;
    }),
  );
  const tail = run.then(
    () => {},
    () => {},
  );
  inProcess.set(key, tail);
  try {
    return await run;
  } finally {
    if (inProcess.get(key) === tail) inProcess.delete(key);
  }
}

/** The last queued token-file update per PKI directory in this process. */
const inProcess = new Map<string, Promise<void>>();

function stateAt(t: JoinTokenRecord, now: Date): JoinTokenView["state"] {
  if (t.revokedAt) return "revoked";
  if (t.usedBy.length >= t.maxUses) return "used";
  if (t.expiresAt <= now) return "expired";
  return "usable";
}

/** Creates a join token for the PKI in `dir`. The token is returned once and never stored. */
export async function createJoinToken(
  dir: string,
  opts: { ttlMs?: number; labels?: Record<string, string>; uses?: number; now?: Date } = {},
): Promise<{ token: string; id: string; expiresAt: Date; labels: Record<string, string>; maxUses: number }> {
  const ttlMs = opts.ttlMs ?? DEFAULT_JOIN_TOKEN_TTL_MS;
  if (!Number.isFinite(ttlMs) || ttlMs <= 0) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_VALIDITY, `a join token needs a positive TTL, not ${ttlMs} ms`, {
      fix: "give --ttl like 30m, 1h or 24h",
    });
  }
  const maxUses = opts.uses ?? 1;
  if (!Number.isInteger(maxUses) || maxUses < 1 || maxUses > 100_000) {
    throw new PkiError(
      PKI_CODES.SHOAL_PKI_JOIN_TOKEN_USES,
      `a join token allows 1 to 100000 uses, not ${maxUses}`,
      {
        fix: "give --uses N with a whole number N ≥ 1 (default 1)",
      },
    );
  }
  const labelsProblem = nodeLabelsProblem(opts.labels ?? {});
  if (labelsProblem) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_JOIN_TOKEN_LABELS, `a join token's labels: ${labelsProblem}`, {
      fix: "give labels as --label region=eu (keys of letters, digits, '.', '_', '/', '-')",
    });
  }
  const now = opts.now ?? new Date();
  const id = randomBytes(8).toString("hex");
  const secret = randomBytes(32).toString("base64url");
  const record: JoinTokenRecord = {
    id,
    secretSha256: sha256(secret),
    createdAt: now,
    expiresAt: new Date(now.getTime() + ttlMs),
    labels: { ...opts.labels },
    maxUses,
    usedBy: [],
  };
  await updateTokens(dir, (file) => {
    // Forget tokens spent for a day, so the file does not grow forever; until then
    // they are listed and refused with their reason.
    file.tokens = file.tokens.filter(
      (t) => stateAt(t, now) === "usable" || t.expiresAt.getTime() + KEEP_SPENT_MS > now.getTime(),
    );
    file.tokens.push(record);
  });
  return { token: `shoal1.${id}.${secret}`, id, expiresAt: record.expiresAt, labels: record.labels, maxUses };
}

function invalidToken(): PkiError {
  return new PkiError(
    PKI_CODES.SHOAL_PKI_JOIN_TOKEN_INVALID,
    "the join token is not valid for this orchestrator",
    {
      fix: "create a new one with `shoal pki join-token create --dir DIR` on the orchestrator and copy it whole",
    },
  );
}

/** Throws the reason `record` may not enroll `nodeId` now, if there is one. */
function assertRedeemable(record: JoinTokenRecord, nodeId: string, now: Date): void {
  if (record.revokedAt) {
    throw new PkiError(
      PKI_CODES.SHOAL_PKI_JOIN_TOKEN_REVOKED,
      `join token ${record.id} was revoked at ${record.revokedAt.toISOString()}`,
      { fix: "ask the operator for a new join token" },
    );
  }
  if (record.usedBy.includes(nodeId)) {
    // Also what keeps a deleted or revoked node from coming back with a multi-use token.
    throw new PkiError(
      PKI_CODES.SHOAL_PKI_JOIN_TOKEN_USED,
      `join token ${record.id} already enrolled node ${nodeId}; a token enrolls a node id once`,
      { fix: "create a new join token for this node (`shoal pki join-token create`)" },
    );
  }
  if (record.usedBy.length >= record.maxUses) {
    throw new PkiError(
      PKI_CODES.SHOAL_PKI_JOIN_TOKEN_USED,
      `join token ${record.id} was already used by ${record.usedBy.join(", ")}${record.usedAt ? ` (last at ${record.usedAt.toISOString()})` : ""}`,
      {
        fix: `it allowed ${record.maxUses} enrollment${record.maxUses === 1 ? "" : "s"}: create a new one for this node`,
      },
    );
  }
  if (record.expiresAt <= now) {
    throw new PkiError(
      PKI_CODES.SHOAL_PKI_JOIN_TOKEN_EXPIRED,
      `join token ${record.id} expired ${record.expiresAt.toISOString()}`,
      { fix: "create a new one (`shoal pki join-token create --ttl 1h`)" },
    );
  }
}

/**
 * Checks and consumes one use of a join token for node `nodeId`. With `use`,
 * that function (e.g. signing the node's CSR) runs while the token is locked
 * and the use is recorded only if it succeeds: concurrent redemptions are
 * serialised, a token is never spent on a failed enrollment, and a single-use
 * token enrolls exactly one node however many ask at once.
 *
 * Fails with SHOAL_PKI_JOIN_TOKEN_INVALID (malformed, unknown or wrong secret),
 * SHOAL_PKI_JOIN_TOKEN_REVOKED, SHOAL_PKI_JOIN_TOKEN_USED (used up, or already
 * used by this node id), SHOAL_PKI_JOIN_TOKEN_EXPIRED or SHOAL_PKI_IDENTITY_REVOKED
 * (the node id was deleted or revoked); or with what `use` throws.
 */
export async function redeemJoinToken<T = undefined>(
  dir: string,
  token: string,
  opts: {
    nodeId: string;
    now?: Date;
    use?: (grant: { id: string; labels: Record<string, string> }) => Promise<T>;
  },
): Promise<{ id: string; labels: Record<string, string>; result: T }> {
  const m = TOKEN_PATTERN.exec(token.trim());
  if (!m) throw invalidToken();
  const [, id, secret] = m as unknown as [string, string, string];
  const now = opts.now ?? new Date();
  return updateTokens(dir, async (file) => {
    const record = file.tokens.find((t) => t.id === id);
    if (
      !record ||
      !timingSafeEqual(Buffer.from(record.secretSha256, "hex"), createHash("sha256").update(secret).digest())
    ) {
      throw invalidToken();
    }
    assertRedeemable(record, opts.nodeId, now);
    const inventory = await readInventory(dir);
    const barred = (inventory.revokedIdentities ?? []).find(
      (r) => r.spiffeId === spiffeId(inventory.trustDomain, "compute", opts.nodeId),
    );
    if (barred) throw identityRevoked(barred);
    const grant = { id, labels: { ...record.labels } };
    const result = (opts.use ? await opts.use(grant) : undefined) as T;
    record.usedBy.push(opts.nodeId);
    record.usedAt = now;
    return { ...grant, result };
  });
}

/**
 * Revokes a join token by id (or by the whole token): it enrolls nobody from
 * now on. Nodes it already enrolled keep their certificates (revoke those with
 * `shoal pki revoke`). Revoking twice keeps the first date.
 */
export async function revokeJoinToken(
  dir: string,
  idOrToken: string,
  now: Date = new Date(),
): Promise<JoinTokenView> {
  const id = TOKEN_PATTERN.exec(idOrToken.trim())?.[1] ?? idOrToken.trim();
  if (!TOKEN_ID_PATTERN.test(id)) throw invalidToken();
  return updateTokens(dir, (file) => {
    const record = file.tokens.find((t) => t.id === id);
    if (!record) {
      throw new PkiError(PKI_CODES.SHOAL_PKI_JOIN_TOKEN_INVALID, `this PKI has no join token ${id}`, {
        fix: "see the ids with `shoal pki join-token list --dir DIR`",
      });
    }
    record.revokedAt ??= now;
    return view(record, now);
  });
}

/**
 * Revokes the join tokens node `nodeId` enrolled with (`shoal node delete`,
 * `shoal pki revoke`), so they enroll nobody else either. Returns how many changed.
 */
export async function revokeJoinTokensOf(
  dir: string,
  nodeId: string,
  now: Date = new Date(),
): Promise<number> {
  return updateTokens(dir, (file) => {
    const hit = file.tokens.filter((t) => t.usedBy.includes(nodeId) && !t.revokedAt);
    for (const t of hit) t.revokedAt = now;
    return hit.length;
  });
}

/** SHOAL_PKI_IDENTITY_REVOKED: enrollment under an identity that was deleted or revoked. */
function identityRevoked(r: RevokedIdentity): PkiError {
  return new PkiError(
    PKI_CODES.SHOAL_PKI_IDENTITY_REVOKED,
    `${r.spiffeId} was revoked at ${r.revokedAt.toISOString()} (${r.reason}) and may not enroll again`,
    {
      fix: "enroll the node under a new id, or have an operator issue its certificate explicitly (`shoal pki issue compute --id ID`)",
    },
  );
}

function view({ secretSha256: _secret, ...rest }: JoinTokenRecord, now: Date): JoinTokenView {
  return { ...rest, state: stateAt(rest as JoinTokenRecord, now) };
}

/** Outstanding and spent join tokens (never the secrets), with their state at `now`. */
export async function listJoinTokens(dir: string, now: Date = new Date()): Promise<JoinTokenView[]> {
  const file = await readTokens(dir);
  return file.tokens.map((t) => view(t, now));
}
