import type { Logger } from "pino";

/**
 * At most one log line per key per interval, so that a peer repeating itself
 * (garbage, a flood) cannot fill the disk with the same warning; each line
 * that passes says how many were held back before it.
 */
export class LogThrottle {
  readonly #intervalMs: number;
  readonly #now: () => number;
  readonly #maxKeys: number;
  readonly #keys = new Map<string, { at: number; held: number }>();

  /**
   * @param intervalMs @default 10000
   * @param maxKeys keys remembered at once; the least recently logged go @default 10000
   */
  constructor(intervalMs = 10_000, now: () => number = Date.now, maxKeys = 10_000) {
    this.#intervalMs = intervalMs;
    this.#now = now;
    this.#maxKeys = maxKeys;
  }

  /**
   * How many lines for `key` were held back since the last one that passed,
   * when this one may be logged; `undefined` when it is to be held back.
   */
  pass(key: string): number | undefined {
    const now = this.#now();
    const seen = this.#keys.get(key);
    if (seen && now - seen.at < this.#intervalMs) {
      seen.held++;
      return undefined;
    }
    const held = seen?.held ?? 0;
    this.#keys.delete(key);
    if (this.#keys.size >= this.#maxKeys) this.#keys.delete(this.#keys.keys().next().value as string);
    this.#keys.set(key, { at: now, held: 0 });
    return held;
  }

  /**
   * Logs `msg` at `warn` unless a line of that message for `key` passed within
   * the interval; a line after held-back ones says how many (`heldBack`).
   */
  warn(log: Logger, key: string, fields: Record<string, unknown>, msg: string): void {
    this.#log(log, "warn", key, fields, msg);
  }

  /** As {@link warn}, at `error`. */
  error(log: Logger, key: string, fields: Record<string, unknown>, msg: string): void {
    this.#log(log, "error", key, fields, msg);
  }

  #log(
    log: Logger,
    level: "warn" | "error",
    key: string,
    fields: Record<string, unknown>,
    msg: string,
  ): void {
    const held = this.pass(`${key}\n${msg}`);
    if (held === undefined) return;
    log[level](held > 0 ? { ...fields, heldBack: held } : fields, msg);
  }
}
