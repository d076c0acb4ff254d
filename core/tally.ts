/** How many of each key are held now: a count per key, and the key forgotten when its count drops to zero. */
export class Tally<K = string> {
  readonly #counts = new Map<K, number>();

  get(key: K): number {
    return this.#counts.get(key) ?? 0;
  }

  has(key: K): boolean {
    return this.#counts.has(key);
  }

  /** The keys held at least once. */
  keys(): IterableIterator<K> {
    return this.#counts.keys();
  }

  add(key: K): void {
    this.#counts.set(key, this.get(key) + 1);
  }

  /** One fewer of `key`; at zero it is forgotten. */
  remove(key: K): void {
    const left = this.get(key) - 1;
    if (left > 0) this.#counts.set(key, left);
    else this.#counts.delete(key);
  }
}
