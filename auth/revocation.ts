import type { AuthStore } from "./store.js";
import type { RevokedToken } from "./types.js";

/** What a KV watcher pushes when another orchestrator revokes a token (or a record expires). */
export type RevocationEvent = { type: "revoked"; record: RevokedToken } | { type: "removed"; jti: string };

/**
 * Revoked token ids: the store is the source of truth (shared by every
 * orchestrator), and an in-memory mirror answers {@link isRevoked} without I/O
 * on every request. The mirror is filled by {@link refresh} and kept current by
 * {@link revoke} (local) and {@link apply} (changes pushed by a store watcher).
 */
export class RevocationList {
  readonly #store: AuthStore;
  readonly #now: () => number;
  /** jti → exp (unix seconds). */
  readonly #revoked = new Map<string, number>();

  constructor(store: AuthStore, now: () => number = Date.now) {
    this.#store = store;
    this.#now = now;
  }

  isRevoked(jti: string): boolean {
    return this.#revoked.has(jti);
  }

  get size(): number {
    return this.#revoked.size;
  }

  /** Revokes `jti` in the store and at once in this process's mirror. `expiresAt` is the token's `exp`. */
  async revoke(jti: string, expiresAt: number): Promise<RevokedToken> {
    const record: RevokedToken = { jti, expiresAt, revokedAt: Math.floor(this.#now() / 1000) };
    this.#revoked.set(jti, expiresAt);
    await this.#store.revokedTokens.put(jti, record);
    return record;
  }

  /** Applies a change seen by a store watcher. */
  apply(event: RevocationEvent): void {
    if (event.type === "revoked") this.#revoked.set(event.record.jti, event.record.expiresAt);
    else this.#revoked.delete(event.jti);
  }

  /**
   * Reloads the mirror from the store (at start-up and after a watcher
   * reconnects) and deletes records whose tokens have expired anyway. Entries
   * revoked locally meanwhile are kept.
   */
  async refresh(): Promise<void> {
    const nowSeconds = Math.floor(this.#now() / 1000);
    const fresh = new Map<string, number>();
    for (const [jti, record] of await this.#store.revokedTokens.list()) {
      if (record.expiresAt < nowSeconds) await this.#store.revokedTokens.delete(jti);
      else fresh.set(jti, record.expiresAt);
    }
    for (const [jti, exp] of this.#revoked) if (exp >= nowSeconds && !fresh.has(jti)) fresh.set(jti, exp);
    this.#revoked.clear();
    for (const [jti, exp] of fresh) this.#revoked.set(jti, exp);
  }
}
