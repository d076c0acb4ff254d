import { clientKey, Tally } from "../core/index.js";
import { RateLimitedError } from "./errors.js";

export interface LoginLimits {
  /** Failures within `windowMs` that lock a user out. @default 5 */
  maxFailuresPerUser?: number;
  /** Failures within `windowMs` that lock an address out (it may be guessing many users). @default 20 */
  maxFailuresPerAddress?: number;
  /** How far back failures count. @default 900_000 (15 min) */
  windowMs?: number;
  /** How long a lockout lasts; it doubles with each further lockout in a row, up to `maxLockoutMs`. @default 60_000 */
  lockoutMs?: number;
  /** @default 3_600_000 (1 h) */
  maxLockoutMs?: number;
  /** Keys tracked at once; beyond it the least recently failed are forgotten (memory bound). @default 100_000 */
  maxKeys?: number;
}

interface Entry {
  failures: number[];
  lockedUntil: number;
  lockouts: number;
}

/**
 * Failed-login limiter per user and per source address: a sliding window of
 * failures with a lockout that doubles on repeat offences. Pure: time comes
 * from the injected clock, so tests step it instead of sleeping.
 */
export class LoginRateLimiter {
  readonly #limits: Required<LoginLimits>;
  readonly #now: () => number;
  readonly #entries = new Map<string, Entry>();
  /** Attempts under way, by key: each may still fail. */
  readonly #inFlight = new Tally();

  constructor(limits: LoginLimits = {}, now: () => number = Date.now) {
    this.#limits = {
      maxFailuresPerUser: limits.maxFailuresPerUser ?? 5,
      maxFailuresPerAddress: limits.maxFailuresPerAddress ?? 20,
      windowMs: limits.windowMs ?? 15 * 60_000,
      lockoutMs: limits.lockoutMs ?? 60_000,
      maxLockoutMs: limits.maxLockoutMs ?? 60 * 60_000,
      maxKeys: limits.maxKeys ?? 100_000,
    };
    this.#now = now;
  }

  /** Throws {@link RateLimitedError} (SHOAL_AUTH_RATE_LIMITED) if the user or the address is locked out. */
  check(subject: { user?: string; address?: string }): void {
    const now = this.#now();
    for (const [kind, key] of keysOf(subject)) {
      const e = this.#entries.get(key);
      if (e && e.lockedUntil > now) throw new RateLimitedError(e.lockedUntil - now, kind);
    }
  }

  /**
   * {@link check}, and counts the attempt as under way until the returned
   * function is called. Attempts under way count as failures to come: a burst
   * of concurrent guesses (each costs a password hash) cannot get past what
   * the lockout allows, as it could when all of them were checked before the
   * first one failed.
   */
  begin(subject: { user?: string; address?: string }): () => void {
    this.check(subject);
    const now = this.#now();
    const keys = keysOf(subject);
    for (const [kind, key] of keys) {
      const recent = this.#recent(this.#entries.get(key)?.failures ?? [], now).length;
      if (recent + this.#inFlight.get(key) >= this.#max(kind)) throw RateLimitedError.busy(kind);
    }
    for (const [, key] of keys) this.#inFlight.add(key);
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      for (const [, key] of keys) this.#inFlight.remove(key);
    };
  }

  /** Counts a failed login; locks the user or address once its window holds too many failures. */
  recordFailure(subject: { user?: string; address?: string }): void {
    const now = this.#now();
    for (const [kind, key] of keysOf(subject)) {
      const e = this.#entries.get(key) ?? { failures: [], lockedUntil: 0, lockouts: 0 };
      this.#entries.delete(key); // re-insert: Map order is then least recently failed first
      e.failures = this.#recent(e.failures, now);
      if (e.lockouts > 0 && now > e.lockedUntil + this.#limits.windowMs) e.lockouts = 0; // quiet for a window: forgiven
      e.failures.push(now);
      if (e.failures.length >= this.#max(kind)) {
        const lockout = Math.min(this.#limits.lockoutMs * 2 ** e.lockouts, this.#limits.maxLockoutMs);
        e.lockedUntil = now + lockout;
        e.lockouts++;
        e.failures = [];
      }
      this.#entries.set(key, e);
    }
    while (this.#entries.size > this.#limits.maxKeys) {
      this.#entries.delete(this.#entries.keys().next().value as string);
    }
  }

  /** The failures within the window. */
  #recent(failures: number[], now: number): number[] {
    return failures.filter((t) => t > now - this.#limits.windowMs);
  }

  /** Failures in a window that lock out a user or an address. */
  #max(kind: "user" | "address"): number {
    return kind === "user" ? this.#limits.maxFailuresPerUser : this.#limits.maxFailuresPerAddress;
  }

  /** A successful login clears the user's record (not the address's: one good account does not excuse guessing). */
  recordSuccess(subject: { user?: string }): void {
    if (subject.user !== undefined) this.#entries.delete(`user:${subject.user}`);
  }
}

function keysOf(subject: { user?: string; address?: string }): Array<["user" | "address", string]> {
  const keys: Array<["user" | "address", string]> = [];
  if (subject.user !== undefined) keys.push(["user", `user:${subject.user}`]);
  if (subject.address !== undefined) keys.push(["address", `addr:${clientKey(subject.address)}`]);
  return keys;
}

/**
 * Password hashes checked at once, and queued, on the whole server. A scrypt
 * check takes 128 MiB and about a tenth of a CPU second in libuv's thread
 * pool (4 threads, shared with every file operation): logins from many
 * addresses at once must neither take all of it nor queue without bound.
 */
export class HashGate {
  readonly #running: number;
  readonly #waiting: number;
  #busy = 0;
  readonly #queue: Array<() => void> = [];

  /** @param running @default 2 @param waiting @default 32 */
  constructor(running = 2, waiting = 32) {
    this.#running = running;
    this.#waiting = waiting;
  }

  /** Runs `check` at its turn; refuses (SHOAL_AUTH_RATE_LIMITED, `server`) when the queue is full. */
  async run<T>(check: () => Promise<T>): Promise<T> {
    if (this.#busy < this.#running) this.#busy++;
    else if (this.#queue.length < this.#waiting) await new Promise<void>((turn) => this.#queue.push(turn));
    else throw RateLimitedError.busy("server");
    try {
      return await check();
    } finally {
      // The turn passes straight to the next in line, or the place is freed.
      const next = this.#queue.shift();
      if (next) next();
      else this.#busy--;
    }
  }
}
