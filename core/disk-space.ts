import { promises as fs } from "node:fs";

/** How long one reading of the free space is used. @default 1 s */
export const DISK_SPACE_READ_EVERY_MS = 1_000;

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

/**
 * The free space of the file system under a data directory, against the
 * setting that keeps some of it free (`Orchestrator.Storage.MinFree`,
 * `Compute.Storage.MinFree`), so that a daemon stops short of filling its disk
 * itself: a full disk makes nats-server 2.9.10 hang (orchestrator/jetstream-watchdog.ts),
 * and a refused job, a declined bid or a result held back is better than a
 * failure half-way. The space is read (statfs, the blocks an unprivileged
 * writer may use) at most once a second.
 */
export class DiskSpace {
  readonly #dir: string;
  readonly #minFree: number;
  readonly #setting: string;
  #read: { at: number; free: Promise<number> } | undefined;

  /** `setting`: the key that sets `minFree`, for the messages. */
  constructor(dir: string, minFree: number, setting: string) {
    this.#dir = dir;
    this.#minFree = minFree;
    this.#setting = setting;
  }

  /**
   * Undefined while the free space is at least MinFree (and always with a
   * MinFree of 0); else what is short, for an error message. A file system
   * that cannot be read counts as having room: writing there then fails on
   * its own, with its own error.
   */
  async shortfall(): Promise<string | undefined> {
    if (this.#minFree <= 0) return undefined;
    const now = Date.now();
    if (!this.#read || now - this.#read.at >= DISK_SPACE_READ_EVERY_MS) {
      const free = fs.statfs(this.#dir).then(
        (s) => s.bavail * s.bsize,
        () => Number.POSITIVE_INFINITY,
      );
      this.#read = { at: now, free };
    }
    const free = await this.#read.free;
    return free >= this.#minFree
      ? undefined
      : `${this.#dir} has ${mib(free)} free, less than ${this.#setting} (${mib(this.#minFree)})`;
  }
}
