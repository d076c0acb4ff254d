/**
 * Runs async tasks one after another per key, in the order they were
 * submitted, and concurrently across keys. The orchestrator handles a node's
 * result chunks and manifest of one execution through it: each message's
 * handling awaits file writes, and without it a manifest could be checked
 * while its last chunk was still being staged (refused as "chunk missing"),
 * or two deliveries of one result could assemble it at once.
 */
export class KeyedSerializer {
  readonly #tails = new Map<string, Promise<void>>();

  /** Runs `task` once every task submitted earlier for `key` has settled; resolves or rejects as it does. */
  run<T>(key: string, task: () => Promise<T>): Promise<T> {
    const result = (this.#tails.get(key) ?? Promise.resolve()).then(task);
    const tail = result.then(
      () => {},
      () => {},
    );
    this.#tails.set(key, tail);
    void tail.then(() => {
      if (this.#tails.get(key) === tail) this.#tails.delete(key);
    });
    return result;
  }
}
