import { closeSync, ftruncateSync, open as openCallback } from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { unlinkIfPresent } from "../../core/index.js";

/** Idle stdio sets kept for the next executions. @default 8 */
export const DEFAULT_WASM_IDLE_STDIO = 8;

const openFd = promisify(openCallback);

/** The host descriptors behind a WASM execution's descriptors 0, 1 and 2. */
export interface StdioSet {
  /** `/dev/null`, read-only. */
  stdin: number;
  /** An unlinked file the module's stdout is appended to and the engine reads at offsets. */
  stdout: number;
  /** Likewise for stderr. */
  stderr: number;
}

/**
 * Stdio descriptors for WASM executions, reused from one execution to the
 * next. Each set is `/dev/null` and two files opened for appending and unlinked
 * at once; a set given back is truncated to nothing before another execution
 * gets it, and one that cannot be is closed instead.
 *
 * Per execution, this saves creating and deleting two files (ext4 spends
 * more and more time finding a free inode among the recently deleted ones as
 * the rate grows) and six file-system calls, each a libuv round trip.
 * Reuse is safe because a module cannot reach these descriptors except
 * through its descriptors 0–2, and the worker refuses it every call that
 * would change them for the next one (close, renumber, flags; see
 * wasm-worker.ts): appending, even after a seek or with an explicit offset,
 * always writes at the end, so after the truncation an execution's files hold
 * exactly what it wrote.
 */
export class StdioPool {
  readonly #idle: StdioSet[] = [];
  readonly #maxIdle: number;
  #closed = false;
  #created = 0;

  constructor(maxIdle = DEFAULT_WASM_IDLE_STDIO) {
    this.#maxIdle = maxIdle;
  }

  /** Idle sets now (for tests). */
  get idle(): number {
    return this.#idle.length;
  }

  /** An empty set: an idle one, else a new one whose files are created (and unlinked) in `dir`. */
  async acquire(dir: string): Promise<StdioSet> {
    const idle = this.#idle.pop();
    if (idle) return idle;
    const n = this.#created++;
    const names = ["stdout", "stderr"].map((s) => path.join(dir, `.stdio-${n}-${s}`));
    const settled = await Promise.allSettled([
      openFd("/dev/null", "r"),
      // Created exclusively, for reading and appending.
      ...names.map((name) => openFd(name, "ax+", 0o600)),
    ]);
    const fds = settled.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
    // Unlinked whether or not every open worked: the set lives on in its descriptors only.
    const unlinked = await Promise.allSettled(names.map(unlinkIfPresent));
    const failed = [...settled, ...unlinked].find((r) => r.status === "rejected");
    if (failed) {
      for (const fd of fds) closeSync(fd);
      throw failed.reason;
    }
    const [stdin, stdout, stderr] = fds as [number, number, number];
    return { stdin, stdout, stderr };
  }

  /**
   * Takes a set back after its execution (the module no longer runs): emptied
   * for reuse, or closed. `sizes`: what stdout and stderr hold, when read to
   * their end; a stream known to be empty is not truncated (one call fewer).
   * Emptied synchronously: a truncation of a file in the page cache takes a
   * few microseconds, its libuv round trip ten times that (docs/compute.md,
   * "Small file-system calls").
   */
  release(set: StdioSet, sizes?: readonly [stdout: number, stderr: number]): void {
    try {
      [set.stdout, set.stderr].forEach((fd, i) => {
        if (sizes?.[i] !== 0) ftruncateSync(fd, 0);
      });
    } catch {
      closeSet(set);
      return;
    }
    if (this.#closed || this.#idle.length >= this.#maxIdle) closeSet(set);
    else this.#idle.push(set);
  }

  /** Closes every idle set; a set given back later is closed then. */
  close(): void {
    this.#closed = true;
    for (const set of this.#idle.splice(0)) closeSet(set);
  }
}

function closeSet(set: StdioSet): void {
  for (const fd of [set.stdin, set.stdout, set.stderr]) closeSync(fd);
}
