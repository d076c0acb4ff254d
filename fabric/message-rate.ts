/**
 * How fast a compute node may send to the orchestrators, and the means to hold
 * it to that: a token bucket; a {@link Pacer} for the sender, where sends wait
 * their turn in order and none is dropped; a {@link RateLimit} per sender for
 * the receiver, where what exceeds is dropped before it costs a signature check.
 */

/** So many a second (messages, bytes), and so many at once. */
export interface Rate {
  /** How many a second, sustained. */
  perSecond: number;
  /** How many at once after a quiet spell. */
  burst: number;
}

/**
 * What an orchestrator takes from one node (on its `.out.` subjects); past it,
 * messages are dropped unverified. A flood from one node with a valid key then
 * costs about a fifth of a core in signature checks, not all of it.
 */
export const NODE_MESSAGE_LIMIT: Readonly<Rate> = Object.freeze({ perSecond: 2000, burst: 4000 });

/**
 * What a compute node holds itself to: half of {@link NODE_MESSAGE_LIMIT}, so
 * that messages the network delivers bunched together still arrive within it.
 * Far above what a node sends in normal work (a batch of log lines per running
 * execution every 100 ms, one message per result chunk of 256 KiB).
 */
export const NODE_SEND_RATE: Readonly<Rate> = Object.freeze({ perSecond: 1000, burst: 2000 });

/**
 * Module bytes an orchestrator serves one node (`module` requests, 256 KiB
 * each): 32 MiB a second, 64 MiB at once (eight modules of the largest size).
 * Serving a part costs a file read and a signature over it, far more than
 * checking a message, so a node asking for more waits its turn, up to
 * {@link MODULE_SERVE_MAX_WAIT_MS}, and past that is told to ask again.
 */
export const NODE_MODULE_BYTES: Readonly<Rate> = Object.freeze({ perSecond: 32 << 20, burst: 64 << 20 });

/**
 * Of {@link NODE_MESSAGE_LIMIT}, what one node may spend on the messages that
 * cost an orchestrator most, each dropped unverified past its own limit:
 * - `register`: a chain validated against the CA, a write of the node's record
 *   (and in a cluster a read of it). A node registers when it connects, after a
 *   renewal and once a heartbeat while PENDING.
 * - `renew`: a certificate signed, recorded in the PKI inventory and pushed to
 *   the broker's users. A node renews once a certificate lifetime and retries
 *   with backoff up to 30 s.
 *
 * These are the floors: {@link nodeControlLimits} raises them for short
 * heartbeats and certificate lifetimes.
 */
export const NODE_CONTROL_LIMITS: Readonly<Record<"register" | "renew", Readonly<Rate>>> = Object.freeze({
  register: Object.freeze({ perSecond: 1, burst: 10 }),
  renew: Object.freeze({ perSecond: 1 / 30, burst: 5 }),
});

/**
 * {@link NODE_CONTROL_LIMITS} for an orchestrator that tells its nodes to
 * heartbeat every `heartbeatMs` and issues certificates of `certTtlMs`: at
 * least twice the pace an honest node keeps (a PENDING node registers once a
 * heartbeat; a node renews at two thirds of a lifetime at the soonest).
 */
export function nodeControlLimits(o: {
  heartbeatMs: number;
  certTtlMs: number;
}): Record<"register" | "renew", Rate> {
  const { register, renew } = NODE_CONTROL_LIMITS;
  return {
    register: { ...register, perSecond: Math.max(register.perSecond, 2000 / o.heartbeatMs) },
    renew: { ...renew, perSecond: Math.max(renew.perSecond, 3000 / o.certTtlMs) },
  };
}

/** The longest an orchestrator holds a `module` request back for {@link NODE_MODULE_BYTES}. */
export const MODULE_SERVE_MAX_WAIT_MS = 3000;

/** The clock of the bucket: milliseconds, monotonic. */
export type Clock = () => number;

const monotonic: Clock = () => performance.now();

/** A token bucket: `burst` tokens, refilled at `perSecond`; a message takes one (or a byte). */
export class TokenBucket {
  readonly #rate: Rate;
  #tokens: number;
  #at: number;

  constructor(rate: Rate, now: number) {
    this.#rate = rate;
    this.#tokens = rate.burst;
    this.#at = now;
  }

  /** Takes a token if there is one. */
  take(now: number): boolean {
    return this.reserve(now, 1, 0) === 0;
  }

  /**
   * Takes `amount` tokens now if they are there (0), or ahead of time if they
   * will be within `maxWaitMs`: then it returns the wait, which the caller
   * keeps to (the bucket is in debt meanwhile). Past `maxWaitMs` it takes
   * nothing and returns `undefined`.
   */
  reserve(now: number, amount: number, maxWaitMs: number): number | undefined {
    const waitMs = this.#wait(now, amount);
    if (waitMs > maxWaitMs) return undefined;
    this.#tokens -= amount;
    return waitMs;
  }

  /** Milliseconds until a token is there (0: now). */
  delay(now: number): number {
    return this.#wait(now, 1);
  }

  /** Milliseconds until `amount` tokens are there, after refilling for the time since the last call. */
  #wait(now: number, amount: number): number {
    const elapsed = Math.max(0, now - this.#at);
    this.#tokens = Math.min(this.#rate.burst, this.#tokens + (elapsed * this.#rate.perSecond) / 1000);
    this.#at = now;
    return this.#tokens >= amount ? 0 : ((amount - this.#tokens) * 1000) / this.#rate.perSecond;
  }
}

/**
 * Holds a sender to a rate: each send runs at once while the bucket has a
 * token and nothing waits before it, otherwise later, in the order given.
 * Nothing is dropped; what waits is bounded by what the sender produces (a
 * node's log output and status per execution are capped).
 */
export class Pacer {
  readonly #bucket: TokenBucket;
  readonly #now: Clock;
  readonly #queue: Array<() => void> = [];
  #timer: NodeJS.Timeout | undefined;

  constructor(rate: Rate, now: Clock = monotonic) {
    this.#now = now;
    this.#bucket = new TokenBucket(rate, now());
  }

  /** Sends waiting for their turn. */
  get waiting(): number {
    return this.#queue.length;
  }

  /** Runs `send` now if the rate allows and nothing waits, else at its turn; `send` must not throw. */
  send(send: () => void): void {
    if (this.#queue.length === 0 && this.#bucket.take(this.#now())) {
      send();
      return;
    }
    this.#queue.push(send);
    this.#arm();
  }

  /** Resolves when the caller may send one message, after everything queued before it. */
  turn(): Promise<void> {
    return new Promise((resolve) => this.send(resolve));
  }

  #arm(): void {
    if (this.#timer) return;
    // Not unref'd: a caller awaiting its turn must get it, and the wait is bounded.
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#drain();
    }, this.#bucket.delay(this.#now()));
  }

  #drain(): void {
    while (this.#queue.length > 0 && this.#bucket.take(this.#now())) this.#queue.shift()!();
    if (this.#queue.length > 0) this.#arm();
  }
}

/**
 * One token bucket per sender, for a receiver that drops what exceeds. Keeps
 * at most `maxSenders` buckets (the least recently used go: such a sender
 * starts again with a full bucket).
 */
export class RateLimit {
  readonly #rate: Rate;
  readonly #now: Clock;
  readonly #maxSenders: number;
  readonly #buckets = new Map<string, TokenBucket>();

  /** @param maxSenders @default 65536 */
  constructor(rate: Rate, now: Clock = monotonic, maxSenders = 65_536) {
    this.#rate = rate;
    this.#now = now;
    this.#maxSenders = maxSenders;
  }

  /** True when `sender` is within its rate (and this message counts against it). */
  admit(sender: string): boolean {
    return this.reserve(sender, 1, 0) === 0;
  }

  /** {@link TokenBucket.reserve} on `sender`'s bucket. */
  reserve(sender: string, amount: number, maxWaitMs: number): number | undefined {
    const now = this.#now();
    let bucket = this.#buckets.get(sender);
    if (bucket) {
      this.#buckets.delete(sender); // re-inserted below: Map order is least recently used first
    } else {
      bucket = new TokenBucket(this.#rate, now);
      if (this.#buckets.size >= this.#maxSenders) {
        this.#buckets.delete(this.#buckets.keys().next().value as string);
      }
    }
    this.#buckets.set(sender, bucket);
    return bucket.reserve(now, amount, maxWaitMs);
  }
}
