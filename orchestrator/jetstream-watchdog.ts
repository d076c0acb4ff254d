import type { Logger } from "../core/index.js";

/** How often the orchestrator's own nats-server is asked whether its JetStream answers. @default 10 s */
export const JETSTREAM_PROBE_INTERVAL_MS = 10_000;
/** How long one such question may take. @default 5 s */
export const JETSTREAM_PROBE_TIMEOUT_MS = 5_000;
/** Unanswered questions in a row after which the server is started again. @default 3 */
export const JETSTREAM_PROBE_FAILURES = 3;
/**
 * In a cluster, free space under which the server's own disk counts as the
 * cause of a hang, when `Orchestrator.Storage.MinFree` is lower. @default 4 MiB
 */
export const JETSTREAM_LOW_DISK = 4 * 2 ** 20;
/**
 * How long a cause seen at a probe still counts: a server started again on a
 * full disk can hang again at once, and stay hung after the operator makes
 * room, before its first unanswered probe. @default 10 min
 */
export const JETSTREAM_CAUSE_MEMORY_MS = 10 * 60_000;

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
  /**
   * In a cluster: why this server itself would be the one that hangs (its
   * disk is short of room), or undefined when nothing says so. A clustered
   * server answers through its meta leader and the streams' leaders, so a
   * probe also fails on every server of a cluster that has lost its quorum,
   * where starting one again helps nothing and only adds to the elections.
   * With it, asked at every probe, a streak restarts the server only while a
   * cause seen within {@link causeMemoryMs} stands. Without it (a single
   * server), every streak restarts.
   */
  cause?: () => Promise<string | undefined>;
  /** @default JETSTREAM_CAUSE_MEMORY_MS */
  causeMemoryMs?: number;
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
 *
 * In a cluster the hang stops more than this server: a stream it leads takes
 * no writes from any orchestrator, and it answers no JetStream question at
 * all. Started again, it hands its leaderships to the others, which go on with
 * their quorum. There a restart needs a cause as well ({@link JetStreamWatchdogOptions.cause}).
 */
export class JetStreamWatchdog {
  readonly #o: JetStreamWatchdogOptions;
  #timer: NodeJS.Timeout | undefined;
  #failures = 0;
  /** The last cause seen, and when. */
  #cause: { text: string; at: number } | undefined;
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
      const [failed, cause] = await Promise.all([
        this.#o.probe().then(
          () => undefined,
          (err: unknown) => ({ err }),
        ),
        this.#o.cause?.(),
      ]);
      if (cause !== undefined) this.#cause = { text: cause, at: Date.now() };
      if (failed === undefined) {
        this.#failures = 0;
        return;
      }
      const failures = ++this.#failures;
      const limit = this.#o.failures ?? JETSTREAM_PROBE_FAILURES;
      const memory = this.#o.causeMemoryMs ?? JETSTREAM_CAUSE_MEMORY_MS;
      const recent = this.#cause && Date.now() - this.#cause.at <= memory ? this.#cause.text : undefined;
      const blamed = this.#o.cause === undefined || recent !== undefined;
      this.#o.log.warn(
        { err: failed.err, failures, limit, ...(recent ? { cause: recent } : {}) },
        blamed ? "JetStream does not answer" : "JetStream does not answer; nothing points to this server",
      );
      if (failures >= limit && blamed) {
        this.#failures = 0;
        await this.#o.restart(
          `JetStream did not answer ${failures} times in a row${recent ? ` (${recent})` : ""}`,
        );
      }
    } finally {
      this.#busy = false;
    }
  }
}
