import { createHash } from "node:crypto";

/**
 * A position in an {@link OrderedKeys}: a row's rank and a digest of its key.
 * It names where a listing stopped without naming the row there, which the
 * reader of the listing may not be allowed to see.
 */
export interface Cursor {
  rank: number;
  tie: string;
}

interface Entry extends Cursor {
  key: string;
}

/** The digest that orders rows of equal rank (96 bits of SHA-256, base64url). */
export function tieOf(key: string): string {
  return createHash("sha256").update(key).digest("base64url").slice(0, 16);
}

function compareCursors(a: Cursor, b: Cursor): number {
  return a.rank - b.rank || (a.tie < b.tie ? -1 : a.tie > b.tie ? 1 : 0);
}

function compareEntries(a: Entry, b: Entry): number {
  return compareCursors(a, b) || (a.key < b.key ? -1 : a.key > b.key ? 1 : 0);
}

/**
 * A table's keys in the order of a numeric rank of their rows (a job's
 * creation time), kept as rows are set and deleted, so the highest-ranked
 * rows are read without sorting them all. Rows of equal rank are ordered by
 * {@link tieOf} their key. New rows usually rank highest and old ones are
 * deleted first, so most changes happen at the ends of the array.
 */
export class OrderedKeys<T> {
  readonly #rank: (row: T) => number;
  /** Ascending. */
  readonly #entries: Entry[] = [];

  constructor(rank: (row: T) => number) {
    this.#rank = rank;
  }

  get size(): number {
    return this.#entries.length;
  }

  /** Records that `key` holds `row` now, and held `previous` (`undefined`: a new key). */
  set(key: string, row: T, previous: T | undefined): void {
    const rank = this.#rank(row);
    if (previous !== undefined) {
      if (this.#rank(previous) === rank) return;
      this.delete(key, previous);
    }
    const entry: Entry = { rank, tie: tieOf(key), key };
    const last = this.#entries.at(-1);
    if (last === undefined || compareEntries(last, entry) < 0) this.#entries.push(entry);
    else this.#entries.splice(this.#firstNotBelow(entry, compareEntries), 0, entry);
  }

  /** Records that `key`, which held `previous`, is gone. */
  delete(key: string, previous: T): void {
    const entry: Entry = { rank: this.#rank(previous), tie: tieOf(key), key };
    const i = this.#firstNotBelow(entry, compareEntries);
    const found = this.#entries[i];
    if (found !== undefined && found.key === key) this.#entries.splice(i, 1);
  }

  /**
   * The keys from the highest rank down, each with its cursor; with `below`,
   * only those strictly below it. Rows must not be set or deleted while the
   * iteration runs (a listing reads it synchronously).
   */
  *descending(below?: Cursor): Generator<{ key: string; cursor: Cursor }> {
    const start = below ? this.#firstNotBelow(below, compareCursors) : this.#entries.length;
    for (let i = start - 1; i >= 0; i--) {
      const { key, rank, tie } = this.#entries[i]!;
      yield { key, cursor: { rank, tie } };
    }
  }

  /** The index of the first entry not below `target` (binary search). */
  #firstNotBelow<C extends Cursor>(target: C, compare: (a: Entry, b: C) => number): number {
    let lo = 0;
    let hi = this.#entries.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (compare(this.#entries[mid]!, target) < 0) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}
