import {
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
} from "@nats-io/jetstream";
import type { KV } from "@nats-io/kv";
import { InvalidArgumentError } from "@nats-io/transport-node";
import { type Logger, Tally } from "../core/index.js";
import { followBucket, type KvChange, readBucket } from "./kv-follow.js";
import { type Cursor, OrderedKeys } from "./ordered-keys.js";

export interface KvTableOptions<T> {
  /** The bucket's name; its stream is read through `js` and purged through `jsm` (see {@link KvTable.purge}). */
  bucket: string;
  js: JetStreamClient;
  jsm: JetStreamManager;
  /**
   * Other writers share the bucket (a cluster): their changes are followed
   * from the moment the table opens, and applied by {@link KvTable.follow}.
   */
  shared?: boolean;
  /**
   * Writes are compare-and-set against the revision this table last saw of
   * the key: a write that finds another writer's newer revision is dropped,
   * the stored value is read back into memory and `onConflict` is told.
   */
  onConflict?: (key: string, stored: T | undefined) => void;
  /** Keeps the rows in the order of this rank, for {@link KvTable.descending}. */
  rank?: (row: T) => number;
  /**
   * Keeps the keys of the rows by the group each is in (`undefined`: none),
   * under each grouping's name, for {@link KvTable.inGroup}.
   */
  groups?: Record<string, (row: T) => string | undefined>;
  /** Counts the rows by a key of each, under each tally's name, for {@link KvTable.tally}. */
  tallies?: Record<string, (row: T) => string>;
  /**
   * Only the keys are read at open ({@link KvTable.storedKeys}), not the
   * values: rows come into memory as they are written or followed, or with
   * {@link KvTable.load}, and leave it with {@link KvTable.release}.
   */
  lazy?: boolean;
  /**
   * Under load, a changed row waits up to this long for a
   * {@link KvTable.flush} that names it before it is written (write-behind):
   * the changes a row goes through meanwhile cost one write, not one each.
   * "Under load" is while a batch of several rows is being written: a row
   * changed while none is, or while a batch of one row is (the changes of a
   * single job at a time), goes with the next batch, as without this option.
   */
  holdMs?: number;
}

/** Which changes of other writers a shared table applies, and what to do after. */
export interface KvFollower<T> {
  /** Whether to apply another writer's newer value (`undefined`: a delete) of `key`. */
  accept: (key: string, value: T | undefined) => boolean;
  applied: (key: string, value: T | undefined, previous: T | undefined) => void;
}

/**
 * One JetStream KV bucket mirrored in memory. Reads come from memory and
 * writes go to memory at once and to KV behind it: writes made in the same tick are coalesced per key
 * and sent as one pipelined batch, so a burst of state changes costs one round
 * of acks instead of one per change. {@link flush} resolves once every write
 * made before it is acknowledged by JetStream — callers await it where
 * durability matters (a submission before answering 201, a result before
 * acknowledging it to the node). A shared table also follows the other
 * writers' changes (newer revisions only, as its {@link KvFollower} accepts).
 */
export class KvTable<T> {
  readonly #kv: KV;
  readonly #bucket: string;
  readonly #jsm: JetStreamManager;
  readonly #log: Logger;
  readonly #rows = new Map<string, T>();
  /** The KV revision of each row as last written or read here. */
  readonly #revisions = new Map<string, number>();
  readonly #onConflict: KvTableOptions<T>["onConflict"];
  readonly #order: OrderedKeys<T> | undefined;
  readonly #groups: Map<string, Grouping<T>>;
  readonly #tallies: Map<string, { of: (row: T) => string; counts: Tally }>;
  #stopFollowing: (() => void) | undefined;
  /** Other writers' changes that arrived before {@link follow} was called. */
  readonly #early: KvChange[] = [];
  #follower: KvFollower<T> | undefined;
  /** Keys changed since the last flush started; `undefined` marks a delete. */
  #dirty = new Map<string, T | undefined>();
  readonly #holdMs: number | undefined;
  /** Whether a batch of several rows is being written now: load, for the `holdMs` option. */
  #underLoad = false;
  /** Changed keys that wait for a flush naming them, or until `until` (see the `holdMs` option), oldest first. */
  readonly #held = new Map<string, { value: T | undefined; until: number }>();
  #holdTimer: NodeJS.Timeout | undefined;
  #flushing: Promise<void> = Promise.resolve();
  #scheduled: Promise<void> | undefined;
  /** Keys whose last write failed, with its error (until written again, or forgotten). */
  readonly #failed = new Map<string, unknown>();
  /** Keys in batches queued or being written, with how many such batches hold each. */
  readonly #queued = new Tally();

  private constructor(kv: KV, log: Logger, options: KvTableOptions<T>) {
    this.#kv = kv;
    this.#bucket = options.bucket;
    this.#jsm = options.jsm;
    this.#log = log;
    this.#onConflict = options.onConflict;
    this.#holdMs = options.holdMs;
    this.#order = options.rank ? new OrderedKeys(options.rank) : undefined;
    this.#groups = new Map(
      Object.entries(options.groups ?? {}).map(([name, of]) => [name, new Grouping(of)]),
    );
    this.#tallies = new Map(
      Object.entries(options.tallies ?? {}).map(([name, of]) => [name, { of, counts: new Tally() }]),
    );
  }

  /** Opens the bucket and loads every current value into memory. */
  static async open<T>(kv: KV, log: Logger, options: KvTableOptions<T>): Promise<KvTable<T>> {
    const table = new KvTable<T>(kv, log, options);
    // Followed before loading, so no change made meanwhile is missed (older revisions are skipped).
    if (options.shared) {
      table.#stopFollowing = await followBucket({ js: options.js, bucket: options.bucket, log }, (change) =>
        table.#follower ? table.#apply(table.#follower, change) : table.#early.push(change),
      );
    }
    const lazy = options.lazy === true;
    for (const { key, revision, value } of await readBucket(options.js, options.bucket, { keysOnly: lazy })) {
      if (!lazy) table.#setRow(key, parse<T>(value));
      table.#revisions.set(key, revision);
    }
    return table;
  }

  /** The keys this table knows to be stored, in memory or not (see the `lazy` option). */
  storedKeys(): IterableIterator<string> {
    return this.#revisions.keys();
  }

  /**
   * Reads the stored values of `keys` that are not in memory into it, a
   * batch of requests at a time (a row written or followed meanwhile is kept).
   */
  async load(keys: readonly string[]): Promise<void> {
    const missing = keys.filter((key) => !this.#rows.has(key));
    for (let i = 0; i < missing.length; i += LOAD_BATCH) {
      const batch = missing.slice(i, i + LOAD_BATCH);
      const entries = await Promise.all(batch.map((key) => this.storedEntry(key)));
      batch.forEach((key, j) => {
        const entry = entries[j];
        if (!entry || this.#rows.has(key)) return;
        this.#setRow(key, entry.value);
        this.#revisions.set(key, Math.max(entry.revision, this.#revisions.get(key) ?? 0));
      });
    }
  }

  /** Drops the row from memory only: it stays stored, and known (see {@link storedKeys}). */
  release(key: string): void {
    this.#deleteRow(key);
  }

  /** Applies the other writers' changes (of a shared table) as `follower` decides, until {@link close}. */
  follow(follower: KvFollower<T>): void {
    this.#follower = follower;
    for (const change of this.#early.splice(0)) this.#apply(follower, change);
  }

  /** Stops following other writers, and the hold's timer: {@link flush} first to write what is held. */
  close(): void {
    this.#stopFollowing?.();
    clearTimeout(this.#holdTimer);
  }

  #apply(follower: KvFollower<T>, { key, revision, value: data }: KvChange): void {
    if (revision <= (this.#revisions.get(key) ?? 0)) return;
    const value = data === undefined ? undefined : parse<T>(data);
    if (!follower.accept(key, value)) return;
    const previous = this.#rows.get(key);
    this.#revisions.set(key, revision);
    if (value === undefined) this.#deleteRow(key);
    else this.#setRow(key, value);
    follower.applied(key, value, previous);
  }

  get(key: string): T | undefined {
    return this.#rows.get(key);
  }

  /** The value in the KV bucket itself, bypassing memory (another writer's value this table has not applied). */
  async stored(key: string): Promise<T | undefined> {
    return (await this.storedEntry(key))?.value;
  }

  /** The stored value with its revision, for {@link compareAndSet}. */
  async storedEntry(key: string): Promise<{ value: T; revision: number } | undefined> {
    const e = await this.#kv.get(key);
    return e?.operation === "PUT" && e.length > 0 ? { value: e.json<T>(), revision: e.revision } : undefined;
  }

  /**
   * Stores `value` only if the key's stored revision is still `revision` (so
   * of two writers racing from one revision exactly one wins), in KV and then
   * in memory. Resolves false when another writer got there first.
   */
  async compareAndSet(key: string, value: T, revision: number): Promise<boolean> {
    try {
      this.#revisions.set(key, await this.#kv.update(key, JSON.stringify(value), revision));
    } catch (err) {
      if (isWrongRevision(err)) return false;
      throw err;
    }
    this.#setRow(key, value);
    return true;
  }

  has(key: string): boolean {
    return this.#rows.has(key);
  }

  values(): IterableIterator<T> {
    return this.#rows.values();
  }

  keys(): IterableIterator<string> {
    return this.#rows.keys();
  }

  get size(): number {
    return this.#rows.size;
  }

  /**
   * The rows from the highest rank down (the table's `rank` option), each
   * with its cursor; with `below`, only those ranked strictly below it.
   */
  *descending(below?: Cursor): Generator<{ row: T; cursor: Cursor }> {
    if (!this.#order) throw new Error(`the ${this.#bucket} table keeps no order`);
    for (const { key, cursor } of this.#order.descending(below)) yield { row: this.#rows.get(key)!, cursor };
  }

  /** The rows in `group` of the grouping named `grouping` (the table's `groups` option), in no order. */
  *inGroup(grouping: string, group: string): Generator<T> {
    // A copy: the caller may change rows as it goes.
    for (const key of [...this.#grouping(grouping).keysIn(group)]) yield this.#rows.get(key)!;
  }

  /** The groups of the grouping named `grouping` that hold rows now. */
  groups(grouping: string): string[] {
    return this.#grouping(grouping).groups();
  }

  /** How many rows have each key of the tally named `name` (the table's `tallies` option), kept as rows change. */
  tally(name: string): ReadonlyMap<string, number> {
    const { counts } = this.#tally(name);
    return new Map([...counts.keys()].map((key) => [key, counts.get(key)]));
  }

  /** How many rows have `key` in the tally named `name`. */
  count(name: string, key: string): number {
    return this.#tally(name).counts.get(key);
  }

  #tally(name: string): { of: (row: T) => string; counts: Tally } {
    const tally = this.#tallies.get(name);
    if (!tally) throw new Error(`the ${this.#bucket} table keeps no tally ${name}`);
    return tally;
  }

  #grouping(name: string): Grouping<T> {
    const grouping = this.#groups.get(name);
    if (!grouping) throw new Error(`the ${this.#bucket} table keeps no grouping ${name}`);
    return grouping;
  }

  #setRow(key: string, value: T): void {
    const previous = this.#rows.get(key);
    this.#rows.set(key, value);
    this.#order?.set(key, value, previous);
    for (const grouping of this.#groups.values()) grouping.move(key, previous, value);
    for (const { of, counts } of this.#tallies.values()) {
      if (previous !== undefined) counts.remove(of(previous));
      counts.add(of(value));
    }
  }

  #deleteRow(key: string): void {
    const previous = this.#rows.get(key);
    if (previous === undefined) return;
    this.#rows.delete(key);
    this.#order?.delete(key, previous);
    for (const grouping of this.#groups.values()) grouping.move(key, previous, undefined);
    for (const { of, counts } of this.#tallies.values()) counts.remove(of(previous));
  }

  /** Sets `key` in memory now and in KV with the next batch (or when its hold ends, see the `holdMs` option). */
  put(key: string, value: T): void {
    this.#setRow(key, value);
    this.#changed(key, value);
  }

  delete(key: string): void {
    this.#deleteRow(key);
    this.#changed(key, undefined);
  }

  #changed(key: string, value: T | undefined): void {
    const held = this.#held.get(key);
    if (held) {
      held.value = value;
    } else if (this.#holdMs === undefined || !this.#underLoad || this.#dirty.has(key)) {
      this.#dirty.set(key, value);
      this.#schedule();
    } else {
      this.#held.set(key, { value, until: performance.now() + this.#holdMs });
      this.#holdTimer ??= setTimeout(() => this.#holdEnded(), this.#holdMs).unref();
    }
  }

  /** Sends the held keys whose hold has ended with the next batch, and waits for the next to end. */
  #holdEnded(): void {
    this.#holdTimer = undefined;
    const now = performance.now();
    const due: string[] = [];
    for (const [key, { until }] of this.#held) {
      if (until > now) {
        this.#holdTimer = setTimeout(() => this.#holdEnded(), until - now).unref();
        break;
      }
      due.push(key);
    }
    this.#release(due);
  }

  /** Sends these held keys (every held key: `undefined`) with the next batch. */
  #release(keys: Iterable<string> | undefined): void {
    let released = false;
    for (const key of keys ?? [...this.#held.keys()]) {
      const held = this.#held.get(key);
      if (!held) continue;
      this.#held.delete(key);
      this.#dirty.set(key, held.value);
      released = true;
    }
    if (released) this.#schedule();
  }

  /** Drops the key from memory only; the bucket keeps it (see {@link purge}). */
  forget(key: string): void {
    this.#deleteRow(key);
    this.#revisions.delete(key);
    this.#failed.delete(key);
  }

  /**
   * Removes every stored revision of the key from the bucket's stream,
   * leaving no delete marker (which would stay in the stream for good): the
   * other writers are not told, each forgets the key on its own. Writes made
   * before it are sent first, so none of them brings the key back.
   */
  async purge(key: string): Promise<void> {
    // `key` may end in the `>` wildcard (the keys under a prefix).
    const prefix = key.endsWith(">") ? key.slice(0, -1) : undefined;
    this.#release(prefix === undefined ? [key] : [...this.#held.keys()].filter((k) => k.startsWith(prefix)));
    await this.#settled();
    await this.#jsm.streams.purge(`KV_${this.#bucket}`, { filter: `$KV.${this.#bucket}.${key}` });
  }

  /**
   * Resolves when the writes made so far — of `keys`, or of every key — are
   * stored in JetStream; rejects with the store's error if one of them failed
   * (a failed row stays dirty and is retried, unless no retry could store it).
   * A caller that names its keys is not failed by other keys' writes.
   */
  async flush(keys?: Iterable<string>): Promise<void> {
    const named = keys ? [...keys] : undefined;
    this.#release(named);
    const watched = named ?? [...this.#dirty.keys(), ...this.#queued.keys()];
    await this.#settled();
    for (const key of watched) {
      if (this.#failed.has(key)) throw this.#failed.get(key);
    }
  }

  /** Resolves when every write made so far has been sent and answered (stored or failed). */
  async #settled(): Promise<void> {
    if (this.#scheduled) await this.#scheduled;
    await this.#flushing;
  }

  #schedule(): void {
    if (this.#scheduled) return;
    this.#scheduled = new Promise<void>((resolve) => {
      setImmediate(() => {
        // Batches are written one after another so a key's later value never
        // overtakes an earlier one. A batch takes what is dirty when its turn
        // comes, not when it was scheduled (group commit): what is written
        // while the batch before it is being stored joins it, so under load
        // writes wait for one batch at most instead of queueing behind a
        // chain of small batches, one round trip each.
        this.#flushing = this.#flushing.then(() => {
          this.#scheduled = undefined;
          const batch = this.#dirty;
          this.#dirty = new Map();
          for (const key of batch.keys()) this.#queued.add(key);
          this.#underLoad = batch.size > 1;
          return this.#write(batch).finally(() => {
            this.#underLoad = false;
          });
        });
        this.#flushing.then(resolve, resolve);
      });
    });
  }

  /** One write; compare-and-set (fenced) when the table has an `onConflict`. Resolves to the new revision. */
  #store(key: string, value: T | undefined): Promise<number | undefined> {
    if (value === undefined) return this.#kv.delete(key).then(() => undefined);
    const data = JSON.stringify(value);
    if (!this.#onConflict) return this.#kv.put(key, data);
    const revision = this.#revisions.get(key);
    return revision === undefined ? this.#kv.create(key, data) : this.#kv.update(key, data, revision);
  }

  /** Reads the key's stored value into memory when it is newer than the one here; resolves to the value now held. */
  async refresh(key: string): Promise<T | undefined> {
    const stored = await this.storedEntry(key);
    if (stored && stored.revision > (this.#revisions.get(key) ?? 0)) {
      this.#setRow(key, stored.value);
      this.#revisions.set(key, stored.revision);
    }
    return this.#rows.get(key);
  }

  /** Another writer changed the key since this table last saw it: its value wins, in memory too. */
  async #conflict(key: string): Promise<void> {
    this.#dirty.delete(key);
    const value = await this.refresh(key).catch(() => this.#rows.get(key));
    this.#log.warn({ key }, "write refused: another writer changed the key; its value is kept");
    this.#onConflict?.(key, value);
  }

  async #write(batch: Map<string, T | undefined>): Promise<void> {
    const results = await Promise.allSettled([...batch].map(([key, value]) => this.#store(key, value)));
    let retried = 0;
    let retryError: unknown;
    for (const [i, [key, value]] of [...batch].entries()) {
      const r = results[i];
      this.#queued.remove(key);
      if (r?.status === "fulfilled") {
        this.#failed.delete(key);
        if (r.value !== undefined) this.#revisions.set(key, r.value);
      } else if (r && this.#onConflict && isWrongRevision(r.reason)) {
        // Another writer's value won: nothing of this write is left to store.
        this.#failed.delete(key);
        await this.#conflict(key);
      } else if (r && r.reason instanceof InvalidArgumentError) {
        // A value no retry can store (larger than a NATS message): retrying it would fail
        // every later batch for good.
        this.#failed.set(key, r.reason);
        this.#log.error({ err: r.reason, key }, "KV write refused for good; the value stays in memory only");
      } else if (r) {
        this.#failed.set(key, r.reason);
        retried++;
        retryError = r.reason;
        // Retry with the next flush unless a newer value has replaced it, waiting (dirty)
        // or already in a later batch: the retry would overwrite that value.
        if (!this.#dirty.has(key) && !this.#queued.has(key) && !this.#held.has(key))
          this.#dirty.set(key, value);
      }
    }
    if (retried > 0) {
      this.#log.error({ err: retryError, failed: retried }, "KV writes failed; will retry");
      setTimeout(() => this.#schedule(), 250).unref();
    }
  }
}

/** A table's keys by the group each row is in, kept as rows are set and deleted. */
class Grouping<T> {
  readonly #keys = new Map<string, Set<string>>();

  constructor(readonly groupOf: (row: T) => string | undefined) {}

  /** `key` held `previous` and holds `value` now (`undefined`: no row). */
  move(key: string, previous: T | undefined, value: T | undefined): void {
    const from = previous === undefined ? undefined : this.groupOf(previous);
    const to = value === undefined ? undefined : this.groupOf(value);
    if (from === to) return;
    if (from !== undefined) {
      const keys = this.#keys.get(from);
      keys?.delete(key);
      if (keys?.size === 0) this.#keys.delete(from);
    }
    if (to !== undefined) {
      const keys = this.#keys.get(to) ?? new Set();
      keys.add(key);
      this.#keys.set(to, keys);
    }
  }

  keysIn(group: string): ReadonlySet<string> {
    return this.#keys.get(group) ?? new Set();
  }

  groups(): string[] {
    return [...this.#keys.keys()];
  }
}

function isWrongRevision(err: unknown): boolean {
  return (
    err instanceof JetStreamApiError &&
    (err.code === JetStreamApiCodes.StreamWrongLastSequence ||
      err.code === JetStreamApiCodes.StreamWrongLastSequenceUnknown)
  );
}

/** Stored values read at a time by {@link KvTable.load}. */
const LOAD_BATCH = 256;

function parse<T>(data: Uint8Array): T {
  return JSON.parse(Buffer.from(data).toString("utf8")) as T;
}
