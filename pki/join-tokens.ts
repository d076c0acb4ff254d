import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import { FileReadError, withFileLock, writeFileAtomic } from "../core/index.js";
import { PKI_CODES, PkiError } from "./errors.js";
import { readInventory } from "./inventory.js";

/**
 * Join tokens let a new node enroll (CSR + token → certificate) without an
 * operator copying certificates around. A token is `shoal1.<id>.<secret>`: the
 * id finds the record, the 256-bit secret is stored only as its SHA-256 (a
 * fast hash is enough for a random secret) and compared in constant time. A
 * token is single-use and expires; its labels become the node's labels.
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
  usedAt?: Date;
  /** The node id that redeemed it. */
  usedBy?: string;
}

interface JoinTokensFile {
  version: 1;
  tokens: JoinTokenRecord[];
}

const TOKEN_PATTERN = /^shoal1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$/;

function sha256(text: string): string {
  return createHash("sha256").update(text).digest("hex");
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
    const data = JSON.parse(text) as JoinTokensFile;
    if (data.version !== 1 || !Array.isArray(data.tokens)) throw new Error("unexpected shape");
    return {
      version: 1,
      tokens: data.tokens.map((t) => ({
        ...t,
        createdAt: new Date(t.createdAt),
        expiresAt: new Date(t.expiresAt),
        ...(t.usedAt ? { usedAt: new Date(t.usedAt) } : {}),
      })),
    };
  } catch (err) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_INVENTORY_CORRUPT, `${file} is not a valid join token file`, {
      cause: err,
      fix: "delete it to drop every outstanding join token, then create new ones",
    });
  }
}

async function updateTokens<T>(dir: string, change: (file: JoinTokensFile) => T): Promise<T> {
  return withFileLock(path.join(dir, `${JOIN_TOKENS_FILE}.lock`), async () => {
    const file = await readTokens(dir);
    const result = change(file);
    // Secrets' hashes only, but still nobody else's business: 0600.
    await writeFileAtomic(path.join(dir, JOIN_TOKENS_FILE), `${JSON.stringify(file, null, 2)}\n`, 0o600);
    return result;
  });
}

/** Creates a single-use join token for the PKI in `dir`. The token is returned once and never stored. */
export async function createJoinToken(
  dir: string,
  opts: { ttlMs?: number; labels?: Record<string, string>; now?: Date } = {},
): Promise<{ token: string; id: string; expiresAt: Date; labels: Record<string, string> }> {
  const ttlMs = opts.ttlMs ?? DEFAULT_JOIN_TOKEN_TTL_MS;
  if (!Number.isFinite(ttlMs) || ttlMs <= 0) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_VALIDITY, `a join token needs a positive TTL, not ${ttlMs} ms`, {
      fix: "give --ttl like 30m, 1h or 24h",
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
  };
  await updateTokens(dir, (file) => {
    // Drop tokens that can no longer be used, so the file does not grow forever.
    file.tokens = file.tokens.filter((t) => !t.usedAt && t.expiresAt > now);
    file.tokens.push(record);
  });
  return { token: `shoal1.${id}.${secret}`, id, expiresAt: record.expiresAt, labels: record.labels };
}

/**
 * Checks and consumes a join token for node `nodeId`; returns its labels.
 * Fails with SHOAL_PKI_JOIN_TOKEN_INVALID (malformed, unknown or wrong secret),
 * SHOAL_PKI_JOIN_TOKEN_EXPIRED or SHOAL_PKI_JOIN_TOKEN_USED.
 */
export async function redeemJoinToken(
  dir: string,
  token: string,
  opts: { nodeId: string; now?: Date },
): Promise<{ id: string; labels: Record<string, string> }> {
  const invalid = () =>
    new PkiError(
      PKI_CODES.SHOAL_PKI_JOIN_TOKEN_INVALID,
      "the join token is not valid for this orchestrator",
      {
        fix: "create a new one with `shoal pki join-token create --dir DIR` on the orchestrator and copy it whole",
      },
    );
  const m = TOKEN_PATTERN.exec(token.trim());
  if (!m) throw invalid();
  const [, id, secret] = m as unknown as [string, string, string];
  const now = opts.now ?? new Date();
  return updateTokens(dir, (file) => {
    const record = file.tokens.find((t) => t.id === id);
    if (
      !record ||
      !timingSafeEqual(Buffer.from(record.secretSha256, "hex"), createHash("sha256").update(secret).digest())
    ) {
      throw invalid();
    }
    if (record.usedAt) {
      throw new PkiError(
        PKI_CODES.SHOAL_PKI_JOIN_TOKEN_USED,
        `join token ${id} was already used by ${record.usedBy ?? "another node"} at ${record.usedAt.toISOString()}`,
        { fix: "join tokens work once: create a new one for this node" },
      );
    }
    if (record.expiresAt <= now) {
      throw new PkiError(
        PKI_CODES.SHOAL_PKI_JOIN_TOKEN_EXPIRED,
        `join token ${id} expired ${record.expiresAt.toISOString()}`,
        {
          fix: "create a new one (`shoal pki join-token create --ttl 1h`)",
        },
      );
    }
    record.usedAt = now;
    record.usedBy = opts.nodeId;
    return { id, labels: { ...record.labels } };
  });
}

/** Outstanding and used join tokens (no secrets). */
export async function listJoinTokens(dir: string): Promise<Omit<JoinTokenRecord, "secretSha256">[]> {
  const file = await readTokens(dir);
  return file.tokens.map(({ secretSha256: _secret, ...rest }) => rest);
}
