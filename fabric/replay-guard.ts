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
 * delivered twice. Ids are kept per issuer, so one sender cannot burn another
 * sender's ids. Memory is bounded: expired entries are swept in insertion order
 * at most once a second (keeping an id a little past its expiry is harmless), at
 * once when full, and when `maxEntries` live entries exist the guard refuses new
 * messages instead of forgetting old ones (which would re-open replays).
 *
 * Every accepted id outlives the young generation, so what an entry holds is
 * garbage-collector work on the receive path: the `jti` string the envelope's
 * JSON already made (no `issuer + jti` key built and kept per message) and its
 * expiry as milliseconds since the guard was made (a small integer, not a boxed
 * number, for its first 12 days).
 */
export class ReplayGuard {
  /** issuer → jti → forget-at (ms since #epoch), each in insertion (≈ expiry) order. */
  readonly #byIssuer = new Map<string, Map<string, number>>();
  #size = 0;
  readonly #max: number;
  readonly #now: () => number;
  readonly #epoch: number;
  #lastFullSweep = Number.NEGATIVE_INFINITY;
  #nextSweep = 0;

  constructor(options: ReplayGuardOptions = {}) {
    this.#max = options.maxEntries ?? 1_000_000;
    this.#now = options.now ?? Date.now;
    this.#epoch = this.#now();
  }

  get size(): number {
    return this.#size;
  }

  /**
   * Records `issuer`'s `jti` until `forgetAtMs` and says whether it is new.
   * A "replay" or "full" verdict records nothing.
   */
  check(issuer: string, jti: string, forgetAtMs: number): ReplayVerdict {
    const now = this.#now() - this.#epoch;
    const known = this.#byIssuer.get(issuer)?.get(jti);
    if (known !== undefined && known > now) return "replay";
    if (now >= this.#nextSweep || this.#size >= this.#max) this.#sweep(now);
    if (this.#size >= this.#max) return "full";
    let seen = this.#byIssuer.get(issuer);
    if (!seen) {
      seen = new Map();
      this.#byIssuer.set(issuer, seen);
    }
    // An expired entry the sweep has not dropped moves to the end, keeping the order.
    if (known !== undefined && seen.delete(jti)) this.#size--;
    seen.set(jti, forgetAtMs - this.#epoch);
    this.#size++;
    return "fresh";
  }

  /** Entries are inserted with nearly increasing expiry; drop each issuer's expired head. */
  #sweep(now: number): void {
    // When full, look past long-lived heads for expired entries, at most once a second.
    const full = this.#size >= this.#max && now - this.#lastFullSweep >= 1000;
    if (full) this.#lastFullSweep = now;
    this.#nextSweep = now + SWEEP_INTERVAL_MS;
    for (const [issuer, seen] of this.#byIssuer) {
      for (const [jti, forgetAt] of seen) {
        if (forgetAt > now) {
          if (!full) break;
          continue;
        }
        seen.delete(jti);
        this.#size--;
      }
      if (seen.size === 0) this.#byIssuer.delete(issuer);
    }
  }
}
