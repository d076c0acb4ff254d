export interface ReplayGuardOptions {
  /** Hard memory bound. When full of live entries, new messages are refused (fail closed). @default 1_000_000 */
  readonly maxEntries?: number;
  /** @default Date.now */
  readonly now?: () => number;
}

export type ReplayVerdict = "fresh" | "replay" | "full";

/** How often expired entries are swept while the guard is not full. */
const SWEEP_INTERVAL_MS = 1000;

/**
 * Remembers accepted envelope ids until they could no longer verify anyway
 * (their `exp` plus the allowed clock skew), so a captured message cannot be
 * delivered twice. Keys are scoped by issuer, so one sender cannot burn another
 * sender's ids. Memory is bounded: expired entries are swept in insertion order
 * at most once a second (keeping an id a little past its expiry is harmless, and
 * the per-message cost is one Map get and one set), at once when full, and when
 * `maxEntries` live entries exist the guard refuses new messages instead of
 * forgetting old ones (which would re-open replays).
 */
export class ReplayGuard {
  readonly #seen = new Map<string, number>();
  readonly #max: number;
  readonly #now: () => number;
  #lastFullSweep = 0;
  #nextSweep = 0;

  constructor(options: ReplayGuardOptions = {}) {
    this.#max = options.maxEntries ?? 1_000_000;
    this.#now = options.now ?? Date.now;
  }

  get size(): number {
    return this.#seen.size;
  }

  /**
   * Records `issuer`'s `jti` until `forgetAtMs` and says whether it is new.
   * A "replay" or "full" verdict records nothing.
   */
  check(issuer: string, jti: string, forgetAtMs: number): ReplayVerdict {
    const key = `${issuer} ${jti}`;
    const now = this.#now();
    const known = this.#seen.get(key);
    if (known !== undefined && known > now) return "replay";
    if (now >= this.#nextSweep || this.#seen.size >= this.#max) this.#sweep(now);
    if (this.#seen.size >= this.#max) return "full";
    // An expired entry moves to the end, keeping the Map in expiry order for the sweep.
    if (known !== undefined) this.#seen.delete(key);
    this.#seen.set(key, forgetAtMs);
    return "fresh";
  }

  /** Entries are inserted with nearly increasing expiry; drop the expired head. */
  #sweep(now: number): void {
    // When full, look past a long-lived head for expired entries, at most once a second.
    const full = this.#seen.size >= this.#max && now - this.#lastFullSweep >= 1000;
    if (full) this.#lastFullSweep = now;
    this.#nextSweep = now + SWEEP_INTERVAL_MS;
    for (const [key, forgetAt] of this.#seen) {
      if (forgetAt > now) {
        if (!full) return;
        continue;
      }
      this.#seen.delete(key);
    }
  }
}
