import type { NonceRecord, RevokedToken, RoleRecord, TokenKeyRecord, UserRecord } from "./types.js";

/**
 * One keyed collection of auth data. Keys are KV-safe (`[-_=.a-zA-Z0-9]`), so a
 * JetStream KV bucket (or one bucket with a key prefix per collection) can back it.
 */
export interface AuthCollection<T> {
  get(key: string): Promise<T | undefined>;
  /** Stores `value`, replacing any previous one. */
  put(key: string, value: T): Promise<void>;
  /** Stores `value` only if `key` is absent; false when it exists (KV `create`). */
  create(key: string, value: T): Promise<boolean>;
  delete(key: string): Promise<void>;
  /**
   * Reads and deletes `key` atomically: of two concurrent callers only one gets
   * the value (KV: `get`, then `delete` with `previousSeq` of that revision).
   * Single-use nonces depend on this.
   */
  take(key: string): Promise<T | undefined>;
  list(): Promise<Array<[key: string, value: T]>>;
}

/**
 * Where users, roles, revoked token ids and client-key nonces live. The
 * orchestrator implements it over JetStream KV so that every orchestrator sees
 * the same users and revocations; {@link MemoryAuthStore} serves tests and
 * single-process use.
 */
export interface AuthStore {
  users: AuthCollection<UserRecord>;
  roles: AuthCollection<RoleRecord>;
  /** Keyed by jti; kept until the token would have expired anyway. */
  revokedTokens: AuthCollection<RevokedToken>;
  /** Keyed by nonce; taken (deleted) when used. */
  nonces: AuthCollection<NonceRecord>;
  /** Every orchestrator's token verification key, keyed by kid. */
  tokenKeys: AuthCollection<TokenKeyRecord>;
}

/** A Map-backed collection; values are cloned in and out so callers cannot alias stored state. */
export class MemoryCollection<T> implements AuthCollection<T> {
  readonly #entries = new Map<string, T>();

  async get(key: string): Promise<T | undefined> {
    const v = this.#entries.get(key);
    return v === undefined ? undefined : structuredClone(v);
  }

  async put(key: string, value: T): Promise<void> {
    this.#entries.set(key, structuredClone(value));
  }

  async create(key: string, value: T): Promise<boolean> {
    if (this.#entries.has(key)) return false;
    this.#entries.set(key, structuredClone(value));
    return true;
  }

  async delete(key: string): Promise<void> {
    this.#entries.delete(key);
  }

  async take(key: string): Promise<T | undefined> {
    const v = this.#entries.get(key);
    this.#entries.delete(key);
    return v;
  }

  async list(): Promise<Array<[string, T]>> {
    return [...this.#entries].map(([k, v]) => [k, structuredClone(v)]);
  }
}

/** An in-memory {@link AuthStore}: for tests, benchmarks and a single orchestrator without persistence. */
export class MemoryAuthStore implements AuthStore {
  readonly users = new MemoryCollection<UserRecord>();
  readonly roles = new MemoryCollection<RoleRecord>();
  readonly revokedTokens = new MemoryCollection<RevokedToken>();
  readonly nonces = new MemoryCollection<NonceRecord>();
  readonly tokenKeys = new MemoryCollection<TokenKeyRecord>();
}
