/**
 * Broadcasts status events to any number of async-iterable listeners. Each call
 * to `iterate()` sees the events pushed after it; a listener that falls more than
 * `bufferLimit` events behind loses the oldest ones rather than growing memory.
 * `end()` finishes every listener.
 */
export class StatusStream<T> {
  readonly #listeners = new Set<{ queue: T[]; wake: (() => void) | undefined }>();
  #ended = false;

  constructor(private readonly bufferLimit = 1000) {}

  push(event: T): void {
    if (this.#ended) return;
    for (const l of this.#listeners) {
      l.queue.push(event);
      if (l.queue.length > this.bufferLimit) l.queue.shift();
      l.wake?.();
    }
  }

  end(): void {
    this.#ended = true;
    for (const l of this.#listeners) l.wake?.();
  }

  async *iterate(): AsyncGenerator<T, void, undefined> {
    const l: { queue: T[]; wake: (() => void) | undefined } = { queue: [], wake: undefined };
    this.#listeners.add(l);
    try {
      for (;;) {
        const next = l.queue.shift();
        if (next !== undefined) {
          yield next;
          continue;
        }
        if (this.#ended) return;
        await new Promise<void>((resolve) => {
          l.wake = resolve;
        });
        l.wake = undefined;
      }
    } finally {
      this.#listeners.delete(l);
    }
  }
}
