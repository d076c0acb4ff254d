import type { Logger } from "../core/index.js";

/** How often the orchestrator's own nats-server is asked whether its JetStream answers. @default 10 s */
export const JETSTREAM_PROBE_INTERVAL_MS = 10_000;
/** How long one such question may take. @default 5 s */
export const JETSTREAM_PROBE_TIMEOUT_MS = 5_000;
/** Unanswered questions in a row after which the server is started again. @default 3 */
export const JETSTREAM_PROBE_FAILURES = 3;

export interface JetStreamWatchdogOptions {
  /** Asks JetStream something it answers without writing (account info); rejects when it does not answer. */
  probe: () => Promise<unknown>;
  /** Starts the server again (NatsSupervisor.restart). */
  restart: (reason: string) => Promise<void>;
  log: Logger;
  /** @default JETSTREAM_PROBE_INTERVAL_MS */
  intervalMs?: number;
  /** @default JETSTREAM_PROBE_FAILURES */
  failures?: number;
}

/**
 * Restarts the orchestrator's own nats-server when its JetStream stops
 * answering while the process lives on. nats-server 2.9.10 does so for good
 * when a write fails for want of disk space (a stream's store waits on a lock
 * it holds itself), and only a new process serves again: every state write
 * meanwhile fails (HTTP 503), until the operator restarts it. The restart comes
 * after {@link JETSTREAM_PROBE_FAILURES} unanswered questions in a row, about
 * half a minute; it loses nothing acknowledged (JetStream recovers its files at
 * start). On a disk that is still full the server may stop answering again, and
 * is started again each time, until there is room.
 */
export class JetStreamWatchdog {
  readonly #o: JetStreamWatchdogOptions;
  #timer: NodeJS.Timeout | undefined;
  #failures = 0;
  #busy = false;

  constructor(options: JetStreamWatchdogOptions) {
    this.#o = options;
  }

  start(): void {
    this.#timer ??= setInterval(() => void this.#check(), this.#o.intervalMs ?? JETSTREAM_PROBE_INTERVAL_MS);
    this.#timer.unref();
  }

  stop(): void {
    clearInterval(this.#timer);
  }

  async #check(): Promise<void> {
    if (this.#busy) return;
    this.#busy = true;
    try {
      await this.#o.probe();
      this.#failures = 0;
    } catch (err) {
      const failures = ++this.#failures;
      const limit = this.#o.failures ?? JETSTREAM_PROBE_FAILURES;
      this.#o.log.warn({ err, failures, limit }, "JetStream does not answer");
      if (failures >= limit) {
        this.#failures = 0;
        await this.#o.restart(`JetStream did not answer ${failures} times in a row`);
      }
    } finally {
      this.#busy = false;
    }
  }
}
