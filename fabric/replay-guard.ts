export interface ReplayGuardOptions {
  /** Hard memory bound. When full of live entries, new messages are refused (fail closed). @default 1_000_000 */
  readonly maxEntries?: number;
  /**
   * Most live entries of one issuer: past it only that issuer's new messages
   * are refused, so one sender (a compromised node flooding signed messages
   * with the longest lifetime accepted) cannot fill the guard and have every
   * other sender refused for minutes. @default a quarter of maxEntries
   */
  readonly maxPerIssuer?: number;
  /**
   * Live entries past which the guard is crowded: from there on, an issuer
   * holding at least the average share is refused, and the rest of the room is
   * kept for the issuers below it. A few colluding issuers (each under
   * `maxPerIssuer`) can then fill the guard only up to this line, not to
   * `maxEntries`, and every other sender is still heard. @default 80% of maxEntries
   */
  readonly crowdedEntries?: number;
  /** @default Date.now */
  readonly now?: () => number;
}

/**
 * `issuer-full`: this issuer has its {@link ReplayGuardOptions.maxPerIssuer} live entries.
 * `over-share`: the guard is crowded and this issuer holds at least the average share.
 */
export type ReplayVerdict = "fresh" | "replay" | "full" | "issuer-full" | "over-share";

/** How often expired entries are swept while the guard is not full. */
const SWEEP_INTERVAL_MS = 1000;

/**
 * Remembers accepted envelope ids until they could no longer verify anyway
 * (their `exp` plus the allowed clock skew), so a captured message cannot be
 * delivered twice. Ids are kept per issuer, so one sender cannot burn another
 * sender's ids. Memory is bounded: expired entries are swept in insertion order
 * at most once a second (keeping an id a little past its expiry is harmless), at
 * once when full, and when `maxEntries` live entries exist the guard refuses new
 * messages instead of forgetting old ones (which would re-open replays). One
 * issuer holds at most `maxPerIssuer` live entries; past that its own new
 * messages are refused, nobody else's. Past `crowdedEntries`, an issuer holding
 * at least the average share of the live entries is refused too, so colluding
 * issuers cannot fill the rest: it stays for the issuers that hold less.
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
  readonly #maxPerIssuer: number;
  readonly #crowded: number;
  readonly #now: () => number;
  readonly #epoch: number;
  #lastFullSweep = Number.NEGATIVE_INFINITY;
  #lastIssuerSweep = Number.NEGATIVE_INFINITY;
  #nextSweep = 0;

  constructor(options: ReplayGuardOptions = {}) {
    this.#max = options.maxEntries ?? 1_000_000;
    this.#maxPerIssuer = options.maxPerIssuer ?? Math.max(1, Math.floor(this.#max / 4));
    this.#crowded = options.crowdedEntries ?? Math.floor(this.#max * 0.8);
    this.#now = options.now ?? Date.now;
    this.#epoch = this.#now();
  }

  get size(): number {
    return this.#size;
  }

  /**
   * Records `issuer`'s `jti` until `forgetAtMs` and says whether it is new.
   * Only a "fresh" verdict records the id.
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
    if (seen.size >= this.#maxPerIssuer || this.#overShare(seen)) {
      // Look past its long-lived head for expired entries, at most once a second.
      const thorough = now - this.#lastIssuerSweep >= 1000;
      if (thorough) this.#lastIssuerSweep = now;
      this.#drop(seen, now, thorough);
      if (seen.size >= this.#maxPerIssuer) return "issuer-full";
      if (this.#overShare(seen)) return "over-share";
    }
    // An expired entry the sweep has not dropped moves to the end, keeping the order.
    if (known !== undefined && seen.delete(jti)) this.#size--;
    seen.set(jti, forgetAtMs - this.#epoch);
    this.#size++;
    return "fresh";
  }

  /** Crowded, and `seen` holds at least the average of the issuers' live entries. */
  #overShare(seen: Map<string, number>): boolean {
    return this.#size >= this.#crowded && seen.size * this.#byIssuer.size >= this.#size;
  }

  /** Entries are inserted with nearly increasing expiry; drop each issuer's expired head. */
  #sweep(now: number): void {
    // When full, look past long-lived heads for expired entries, at most once a second.
    const full = this.#size >= this.#max && now - this.#lastFullSweep >= 1000;
    if (full) this.#lastFullSweep = now;
    this.#nextSweep = now + SWEEP_INTERVAL_MS;
    for (const [issuer, seen] of this.#byIssuer) {
      this.#drop(seen, now, full);
      if (seen.size === 0) this.#byIssuer.delete(issuer);
    }
  }

  /** Drops one issuer's expired head; `thorough`: every expired entry, past live ones. */
  #drop(seen: Map<string, number>, now: number, thorough: boolean): void {
    for (const [jti, forgetAt] of seen) {
      if (forgetAt > now) {
        if (!thorough) break;
        continue;
      }
      seen.delete(jti);
      this.#size--;
    }
  }
}
