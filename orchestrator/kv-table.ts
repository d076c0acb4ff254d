import type { KV } from "@nats-io/kv";
import type { Logger } from "../core/index.js";

/**
 * One JetStream KV bucket mirrored in memory. The orchestrator is the only
 * writer of its buckets, so reads come from memory and writes go to memory at
 * once and to KV behind it: writes made in the same tick are coalesced per key
 * and sent as one pipelined batch, so a burst of state changes costs one round
 * of acks instead of one per change. {@link flush} resolves once every write
 * made before it is acknowledged by JetStream — callers await it where
 * durability matters (a submission before answering 201, a result before
 * acknowledging it to the node).
 */
export class KvTable<T> {
  readonly #kv: KV;
  readonly #log: Logger;
  readonly #rows = new Map<string, T>();
  /** Keys changed since the last flush started; `undefined` marks a delete. */
  #dirty = new Map<string, T | undefined>();
  #flushing: Promise<void> = Promise.resolve();
  #scheduled: Promise<void> | undefined;
  #failure: unknown;

  private constructor(kv: KV, log: Logger) {
    this.#kv = kv;
    this.#log = log;
  }

  /** Opens the bucket and loads every current value into memory. */
  static async open<T>(kv: KV, log: Logger): Promise<KvTable<T>> {
    const table = new KvTable<T>(kv, log);
    const keys: string[] = [];
    for await (const k of await kv.keys()) keys.push(k);
    const entries = await Promise.all(keys.map((k) => kv.get(k)));
    for (const e of entries) {
      if (e && e.operation === "PUT" && e.length > 0) table.#rows.set(e.key, e.json<T>());
    }
    return table;
  }

  get(key: string): T | undefined {
    return this.#rows.get(key);
  }

  /**
   * The value in the KV bucket itself, bypassing memory: what another
   * orchestrator sharing the bucket wrote (this table does not follow their writes).
   */
  async stored(key: string): Promise<T | undefined> {
    const e = await this.#kv.get(key);
    return e?.operation === "PUT" && e.length > 0 ? e.json<T>() : undefined;
  }

  has(key: string): boolean {
    return this.#rows.has(key);
  }

  values(): IterableIterator<T> {
    return this.#rows.values();
  }

  get size(): number {
    return this.#rows.size;
  }

  /** Drops `key` from memory only (a row another orchestrator owns); KV keeps it. */
  forget(key: string): void {
    this.#rows.delete(key);
  }

  /** Sets `key` in memory now and in KV with the next flush. */
  put(key: string, value: T): void {
    this.#rows.set(key, value);
    this.#dirty.set(key, value);
    this.#schedule();
  }

  delete(key: string): void {
    this.#rows.delete(key);
    this.#dirty.set(key, undefined);
    this.#schedule();
  }

  /**
   * Resolves when every write made so far is stored in JetStream; rejects with
   * the store's error if one failed (the rows stay dirty and are retried).
   */
  async flush(): Promise<void> {
    if (this.#scheduled) await this.#scheduled;
    await this.#flushing;
    if (this.#failure) {
      const err = this.#failure;
      this.#failure = undefined;
      throw err;
    }
  }

  #schedule(): void {
    if (this.#scheduled) return;
    this.#scheduled = new Promise<void>((resolve) => {
      setImmediate(() => {
        this.#scheduled = undefined;
        const batch = this.#dirty;
        this.#dirty = new Map();
        // Batches are written one after another so a key's later value never
        // overtakes an earlier one.
        this.#flushing = this.#flushing.then(() => this.#write(batch));
        this.#flushing.then(resolve, resolve);
      });
    });
  }

  async #write(batch: Map<string, T | undefined>): Promise<void> {
    const results = await Promise.allSettled(
      [...batch].map(([key, value]) =>
        value === undefined ? this.#kv.delete(key) : this.#kv.put(key, JSON.stringify(value)),
      ),
    );
    let failed = 0;
    [...batch].forEach(([key, value], i) => {
      const r = results[i];
      if (r?.status === "rejected") {
        failed++;
        this.#failure = r.reason;
        // Retry with the next flush unless a newer value has replaced it.
        if (!this.#dirty.has(key)) this.#dirty.set(key, value);
      }
    });
    if (failed > 0) {
      this.#log.error({ err: this.#failure, failed }, "KV writes failed; will retry");
      setTimeout(() => this.#schedule(), 250).unref();
    }
  }
}
