import { type JobSpec, type Logger, storedModules } from "../core/index.js";
import type { LogStore } from "./log-store.js";
import type { ModuleStore } from "./module-store.js";
import { type ExecutionRecord, type JobRecord, TERMINAL_JOB_STATES } from "./records.js";
import type { ResultsStore } from "./results-store.js";
import type { StateStore } from "./state-store.js";

/** Longest pause between two sweeps, whatever the threshold. */
export const MAX_SWEEP_INTERVAL_MS = 5 * 60_000;
/**
 * Longest pause between two sweeps with a limit on finished jobs, which may
 * be passed by the jobs that finish in between (finding the jobs beyond the
 * limit among 100,000, the default, takes about 10 ms here, in turns of the
 * event loop of {@link SCAN_CHUNK} jobs).
 */
export const MAX_COUNT_SWEEP_INTERVAL_MS = 10_000;
/** How long the files of a job not stored are kept at start when no threshold is set (see removeStrays). */
export const STRAY_GRACE_MS = 60 * 60_000;
/** Jobs removed side by side within a sweep. */
const BATCH = 32;
/**
 * Jobs a sweep looks at between two turns of the event loop: it reads every
 * stored job (100,000 by default), which took 10 ms, and 120 ms when it also
 * gathered the modules they name, in one piece before.
 */
const SCAN_CHUNK = 1000;

/** Each job stored now, giving the event loop a turn every {@link SCAN_CHUNK}; jobs added meanwhile are seen too. */
async function* everyJob(store: StateStore): AsyncGenerator<JobRecord> {
  let seen = 0;
  for (const job of store.jobs.values()) {
    yield job;
    if (++seen % SCAN_CHUNK === 0) await new Promise((resolve) => setImmediate(resolve));
  }
}

export interface JobCollectorOptions {
  store: StateStore;
  logs: LogStore;
  results: ResultsStore;
  modules: ModuleStore;
  log: Logger;
  /** How long after it ended (its last change) a job is removed; 0: never for its age. */
  thresholdMs: number;
  /** Finished jobs kept at most, the ones that ended first removed beyond it; 0 (the default): no limit. */
  maxJobs?: number;
}

/**
 * Job garbage collection (`Orchestrator.JobGC`): a job that ended
 * (Completed, Failed, Stopped) longer ago than the threshold, or beyond the
 * `MaxJobs` finished jobs that ended last, is removed with its executions,
 * history, logs and result files, so an orchestrator's memory, its disk and
 * JetStream do not grow with every job ever run, nor with the rate of jobs.
 *
 * Every orchestrator of a cluster collects on its own: each forgets the
 * expired jobs in memory and removes its own files, and the job's owner
 * purges its records and shared result files from JetStream. Another
 * orchestrator purges them only if they are still stored twice the threshold
 * after the job ended (its owner is gone for good). Records are purged, not
 * deleted, so no delete markers pile up in the streams; a job whose purge
 * fails stays for the next sweep. A stored module that no stored job has
 * named at two sweeps in a row goes too (ModuleStore.collect).
 */
export class JobCollector {
  readonly #o: JobCollectorOptions;
  /** Other orchestrators' jobs forgotten here: purged at `due` unless their owner did it. */
  readonly #orphans = new Map<string, { due: number; executions: ExecutionRecord[] }>();
  #timer: NodeJS.Timeout | undefined;
  #sweeping: Promise<number> | undefined;
  /** When (the `now` of a sweep) modules were last collected. */
  #modulesCollectedAt = Number.NEGATIVE_INFINITY;

  constructor(options: JobCollectorOptions) {
    this.#o = options;
  }

  /** How often {@link start} sweeps: {@link modulesIntervalMs}, at most 10 s with a limit on finished jobs. */
  get intervalMs(): number {
    const byAge = this.modulesIntervalMs;
    return this.#o.maxJobs ? Math.min(MAX_COUNT_SWEEP_INTERVAL_MS, byAge) : byAge;
  }

  /**
   * How often modules are collected (one no job names at two collections in a
   * row goes): a quarter of the threshold, between 100 ms and 5 minutes; 5
   * minutes without a threshold. Frequent sweeps for a job limit must not
   * shorten the time a module stays unnamed before it goes.
   */
  get modulesIntervalMs(): number {
    const { thresholdMs } = this.#o;
    if (thresholdMs <= 0) return MAX_SWEEP_INTERVAL_MS;
    return Math.min(MAX_SWEEP_INTERVAL_MS, Math.max(100, Math.floor(thresholdMs / 4)));
  }

  /**
   * Removes the logs and result files on this disk of jobs that are not
   * stored (any more): removed while this orchestrator was down, or it
   * stopped between a job's purge and the removal of its files. Only files
   * untouched for the threshold (STRAY_GRACE_MS without one) go: a job removed
   * for its age had ended that long before, while a store that has not loaded
   * a live job yet (a lagging replica) must not cost it its files. Run it once
   * the store is loaded, before nodes are heard.
   */
  async removeStrays(now = Date.now()): Promise<number> {
    const { store, logs, results } = this.#o;
    const graceMs = this.#o.thresholdMs > 0 ? this.#o.thresholdMs : STRAY_GRACE_MS;
    const lastWrites = new Map<string, number>();
    for (const files of await Promise.all([logs.jobs(), results.jobs()])) {
      for (const [id, at] of files) lastWrites.set(id, Math.max(at, lastWrites.get(id) ?? 0));
    }
    const strays = [...lastWrites]
      .filter(([id, at]) => !store.jobs.has(id) && now - at >= graceMs)
      .map(([id]) => id);
    await Promise.all(strays.map((id) => this.#removeFiles(id)));
    if (strays.length > 0) this.#o.log.info({ removed: strays.length }, "files of removed jobs deleted");
    return strays.length;
  }

  /** Sweeps every {@link intervalMs} until {@link close}. */
  start(): void {
    this.#timer = setInterval(() => {
      this.sweep().catch((err) => this.#o.log.error({ err }, "job collection failed"));
    }, this.intervalMs);
    this.#timer.unref();
  }

  /** Stops sweeping; resolves once a sweep under way is done. */
  async close(): Promise<void> {
    clearInterval(this.#timer);
    await this.#sweeping?.catch(() => {});
  }

  /** Removes the jobs expired at `now` (one sweep at a time); resolves to how many. */
  sweep(now = Date.now()): Promise<number> {
    this.#sweeping ??= this.#sweep(now).finally(() => {
      this.#sweeping = undefined;
    });
    return this.#sweeping;
  }

  async #sweep(now: number): Promise<number> {
    const expired = (await this.#expired(now)).map((job) => ({
      jobId: job.ID,
      removed: true,
      run: () => this.#remove(job, now),
    }));
    const orphans = [...this.#orphans]
      .filter(([, orphan]) => orphan.due <= now)
      .map(([jobId, orphan]) => ({ jobId, removed: false, run: () => this.#purgeOrphan(jobId, orphan) }));
    const tasks = [...expired, ...orphans];
    let removed = 0;
    for (let i = 0; i < tasks.length; i += BATCH) {
      const batch = tasks.slice(i, i + BATCH);
      const outcomes = await Promise.allSettled(batch.map((task) => task.run()));
      for (const [j, outcome] of outcomes.entries()) {
        if (outcome.status === "fulfilled") {
          if (batch[j]?.removed) removed++;
        } else {
          this.#o.log.warn(
            { err: outcome.reason, job: batch[j]?.jobId },
            "cannot remove an expired job; will retry",
          );
        }
      }
    }
    if (removed > 0) this.#o.log.info({ removed }, "expired jobs removed");
    if (now - this.#modulesCollectedAt >= this.modulesIntervalMs) {
      this.#modulesCollectedAt = now;
      await this.#collectModules();
    }
    return removed;
  }

  /** The finished jobs to remove at `now`: the first ended beyond `maxJobs`, and those past the threshold. */
  async #expired(now: number): Promise<JobRecord[]> {
    const { thresholdMs, maxJobs = 0 } = this.#o;
    const finished: JobRecord[] = [];
    for await (const job of everyJob(this.#o.store))
      if (TERMINAL_JOB_STATES.has(job.State)) finished.push(job);
    const excess = maxJobs > 0 ? finished.length - maxJobs : 0;
    // The `excess` jobs that ended first: those that ended before `cutoff`, and `ties` of those that ended at it.
    let cutoff = Number.NEGATIVE_INFINITY;
    let ties = 0;
    if (excess > 0) {
      const ends = new Float64Array(finished.length);
      for (const [i, job] of finished.entries()) ends[i] = job.ModifyTime;
      cutoff = kthSmallest(ends, excess - 1);
      ties = excess - finished.filter((job) => job.ModifyTime < cutoff).length;
    }
    return finished.filter(
      (job) =>
        job.ModifyTime < cutoff ||
        (job.ModifyTime === cutoff && ties-- > 0) ||
        (thresholdMs > 0 && now - job.ModifyTime >= thresholdMs),
    );
  }

  /** Removes the modules no stored job names any more (ModuleStore.collect); a failure waits for the next sweep. */
  async #collectModules(): Promise<void> {
    const named = new Set<string>();
    for await (const job of everyJob(this.#o.store)) {
      for (const m of storedModules(job.Spec as JobSpec)) named.add(m.digest);
    }
    try {
      const removed = await this.#o.modules.collect(named);
      if (removed > 0) this.#o.log.info({ removed }, "modules no job runs removed");
    } catch (err) {
      this.#o.log.warn({ err }, "cannot remove unused modules; will retry");
    }
  }

  async #remove(job: JobRecord, now: number): Promise<void> {
    const { store } = this.#o;
    const executions = store.executionsOf(job.ID);
    const due = job.ModifyTime + 2 * this.#o.thresholdMs;
    if (store.isMine(job.ID) || due <= now) await this.#purge(job.ID, executions);
    else this.#orphans.set(job.ID, { due, executions });
    store.forgetJob(job.ID);
    await this.#removeFiles(job.ID);
  }

  /** Removes this disk's copies of the job's logs and result files. */
  async #removeFiles(jobId: string): Promise<void> {
    await Promise.all([this.#o.logs.remove(jobId), this.#o.results.removeLocal(jobId)]);
  }

  /** Purges the job from JetStream: its shared result files first, since the execution records name them. */
  async #purge(jobId: string, executions: readonly ExecutionRecord[]): Promise<void> {
    await this.#o.results.removeShared(jobId, executions);
    await this.#o.store.purgeJob(
      jobId,
      executions.map((e) => e.ID),
    );
  }

  async #purgeOrphan(jobId: string, orphan: { executions: ExecutionRecord[] }): Promise<void> {
    if (await this.#o.store.jobs.stored(jobId)) await this.#purge(jobId, orphan.executions);
    this.#orphans.delete(jobId);
  }
}

/**
 * The `k`-th smallest (from 0) of `values`, which it reorders: Hoare's
 * selection, linear time on average, where sorting 100,000 end times took
 * ~25 ms of the event loop at every sweep.
 */
export function kthSmallest(values: Float64Array, k: number): number {
  let lo = 0;
  let hi = values.length - 1;
  while (lo < hi) {
    const pivot = values[(lo + hi) >>> 1]!;
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (values[i]! < pivot) i++;
      while (values[j]! > pivot) j--;
      if (i <= j) {
        [values[i], values[j]] = [values[j]!, values[i]!];
        i++;
        j--;
      }
    }
    if (k <= j) hi = j;
    else if (k >= i) lo = i;
    else break;
  }
  return values[k]!;
}
