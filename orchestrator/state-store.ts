import { EventEmitter } from "node:events";
import type { JetStreamClient } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { Logger } from "../core/index.js";
import { KvTable, type KvTableOptions } from "./kv-table.js";
import {
  type ExecutionRecord,
  type ExecutionState,
  type JobEvent,
  type JobRecord,
  type JobState,
  type NodeRecord,
  TERMINAL_EXECUTION_STATES,
  TERMINAL_JOB_STATES,
} from "./records.js";

/** The KV buckets the orchestrator keeps its state in. */
export const BUCKETS = {
  jobs: "shoal-jobs",
  executions: "shoal-executions",
  nodes: "shoal-nodes",
  events: "shoal-events",
} as const;

/**
 * Events per stored page of a job's history: a job's history is kept in
 * `shoal-events` as pages of up to this many events (about 16 KB), so a long
 * history (a batch job of Count 1000 makes thousands of events) never
 * outgrows one NATS message, and an event rewrites one page, not the whole
 * history. A single orchestrator writes pages `<job>.<n>`; in a cluster each
 * orchestrator writes its own, `<job>.<name>.<n>`, so no page has two
 * writers: an owner that has not yet heard of a takeover, or a new owner
 * whose copy of the history lags, cannot overwrite the other's events. A
 * history stored whole under `<job>` (before pages) is still read.
 */
export const HISTORY_PAGE_EVENTS = 64;

/**
 * Under load, how long a change of a job, an execution or a history page may
 * wait before it is written to KV, unless a flush names it first: a job's
 * submission is flushed before the API answers, a result before the node is
 * told it is stored, a stop before it is answered. The states a job goes
 * through in between (placed, bid accepted, running) are then written within
 * this time, or with the next flush of the job: a job that ends sooner costs
 * five KV writes, not ten. A crash loses at most this much of those states,
 * and the job is then placed again (docs/orchestrator.md, start-up step 3).
 * While no batch of several rows is being written (a single job at a time),
 * a change goes with the next batch (see {@link KvTableOptions.holdMs}).
 */
export const JOB_WRITE_HOLD_MS = 250;

/**
 * How long after its claims an orchestrator reads the claimed records back
 * ({@link StateStore.confirmClaims}). nats-server before 2.9.21 checks a
 * compare-and-set's revision before replicating the write, not as part of it
 * (nats-io/nats-server#4320): in a clustered stream, two claims of one
 * revision sent within milliseconds of each other can both succeed, the
 * later overwriting the earlier. Any such write has landed well within this.
 */
export const CLAIM_SETTLE_MS = 500;

/** Page `page` of a job's history written by `writer` (an orchestrator of a cluster; none for a single one). */
const pageKey = (jobId: string, writer: string | undefined, page: number) =>
  writer === undefined ? `${jobId}.${page}` : `${jobId}.${writer}.${page}`;

/** The writer and number of a page key's `<n>` or `<writer>.<n>` part; undefined for anything else. */
function parsePage(rest: string): { writer: string | undefined; page: number } | undefined {
  const dot = rest.lastIndexOf(".");
  const page = Number(dot < 0 ? rest : rest.slice(dot + 1));
  if (!Number.isInteger(page) || page < 0) return undefined;
  return { writer: dot < 0 ? undefined : rest.slice(0, dot), page };
}

/**
 * How long a job's history stays in memory after the job ended: events that
 * come after the end (an execution cancelled, a late node) still go onto its
 * last page. Later, {@link StateStore.history} reads the pages from KV.
 */
export const HISTORY_KEPT_MS = 60_000;

/** The `submitter` tally's key of the jobs that ended (no submitter is named with nothing). */
const ENDED = "";

/** A change the API's watchers and the dispatcher react to. */
export type StateChange =
  | { type: "job"; job: JobRecord }
  | { type: "execution"; execution: ExecutionRecord }
  | { type: "event"; event: JobEvent }
  | { type: "node"; node: NodeRecord };

/**
 * All orchestrator state: jobs, executions, nodes and job history, each a
 * {@link KvTable} (memory first, JetStream KV behind), plus change
 * notifications so watchers are fed by writes, never by polling.
 */
export class StateStore {
  readonly #emitter = new EventEmitter();
  /** Each job's history pages, every writer's (see {@link HISTORY_PAGE_EVENTS}). */
  readonly #pages = new Map<string, Set<string>>();
  /** How many pages of each job's history this orchestrator wrote. */
  readonly #ownPages = new Map<string, number>();
  /** Jobs with a history stored whole under their id (before pages). */
  readonly #wholeHistories = new Set<string>();
  /** Jobs that ended, with when, oldest first: their history leaves memory {@link HISTORY_KEPT_MS} later. */
  readonly #ended = new Map<string, number>();
  #acting: () => boolean = () => true;
  readonly #log: Logger;

  private constructor(
    readonly jobs: KvTable<JobRecord>,
    readonly executions: KvTable<ExecutionRecord>,
    readonly nodes: KvTable<NodeRecord>,
    readonly events: KvTable<JobEvent[]>,
    /** In a cluster: this orchestrator's name (`JobRecord.Orchestrator` of the jobs it owns). */
    readonly owner: string | undefined,
    log: Logger,
  ) {
    this.#log = log;
    this.#emitter.setMaxListeners(0);
    for (const key of events.storedKeys()) this.#indexPage(key);
  }

  /**
   * Opens (creating if needed) the buckets on `js` and loads them; new
   * buckets get `replicas` copies (a bucket that exists keeps its own setting).
   */
  static async open(
    js: JetStreamClient,
    log: Logger,
    options: {
      replicas?: number;
      /**
       * In a cluster: this orchestrator's name. Every job of the cluster is
       * loaded and the other orchestrators' writes are followed (so the API
       * reads any job anywhere), but only the jobs it owns
       * (`JobRecord.Orchestrator`) are written here, job records by
       * compare-and-set: a write that finds the job taken over is dropped and
       * the new owner's record kept (fencing).
       */
      owner?: string;
      /** @default JOB_WRITE_HOLD_MS */
      holdMs?: number;
    } = {},
  ): Promise<StateStore> {
    const kvm = new Kvm(js);
    const jsm = await js.jetstreamManager();
    const cluster = options.owner !== undefined;
    const holdMs = options.holdMs ?? JOB_WRITE_HOLD_MS;
    let store: StateStore | undefined;
    // In a cluster the job buckets follow the other orchestrators' writes; job records are fenced.
    const open = async <T>(
      bucket: string,
      followed: boolean,
      more: Pick<KvTableOptions<T>, "onConflict" | "rank" | "groups" | "tallies" | "lazy" | "holdMs"> = {},
    ) =>
      KvTable.open<T>(
        await kvm.create(bucket, { history: 1, replicas: options.replicas ?? 1 }),
        log.child({ bucket }),
        {
          bucket,
          js,
          jsm,
          ...(more.rank ? { rank: more.rank } : {}),
          ...(more.groups ? { groups: more.groups } : {}),
          ...(more.tallies ? { tallies: more.tallies } : {}),
          ...(more.lazy ? { lazy: true } : {}),
          ...(more.holdMs ? { holdMs: more.holdMs } : {}),
          ...(cluster && followed
            ? { shared: true, ...(more.onConflict ? { onConflict: more.onConflict } : {}) }
            : {}),
        },
      );
    const [jobs, executions, nodes, events] = await Promise.all([
      open<JobRecord>(BUCKETS.jobs, true, {
        holdMs,
        // Listed newest first (JobService.list).
        rank: (job) => job.CreateTime,
        tallies: {
          // Counted at each scrape (OrchestratorMetrics).
          state: (job) => job.State,
          // Checked at each submission (JobService, Orchestrator.Scheduler.MaxUnfinishedJobs*).
          submitter: (job) => (TERMINAL_JOB_STATES.has(job.State) ? ENDED : job.Submitter.sub),
        },
        // Read at each takeover round (JobTakeover).
        groups: {
          owner: (job) =>
            TERMINAL_JOB_STATES.has(job.State) || job.Orchestrator === undefined
              ? undefined
              : job.Orchestrator,
        },
        onConflict: (_id, job) => {
          if (job && store) store.#emitJob(job);
        },
      }),
      open<ExecutionRecord>(BUCKETS.executions, true, {
        holdMs,
        tallies: { state: (e) => e.State },
        groups: {
          job: (e) => e.JobID,
          // What a node holds or is about to: read per node as it registers or is lost.
          node: (e) => (TERMINAL_EXECUTION_STATES.has(e.State) ? undefined : e.NodeID),
        },
      }),
      // Nodes are shared by every orchestrator, each keeping its own view of their health.
      open<NodeRecord>(BUCKETS.nodes, false),
      // Only the keys: the histories of jobs that ended are read when asked for.
      open<JobEvent[]>(BUCKETS.events, true, { lazy: true, holdMs }),
    ]);
    store = new StateStore(jobs, executions, nodes, events, options.owner, log);
    await events.load(
      [...jobs.values()]
        .filter((job) => !TERMINAL_JOB_STATES.has(job.State))
        .flatMap((job) => store!.#historyKeys(job.ID)),
    );
    if (cluster) store.#followOthers();
    return store;
  }

  /**
   * Whether this orchestrator owns the job and alone acts on it: always for
   * a single orchestrator, and in a cluster for the jobs it accepted or took
   * over (and jobs stored without an owner, by a single orchestrator before);
   * none while the {@link fence} says this orchestrator may not act.
   */
  isMine(jobId: string): boolean {
    return this.#acting() && this.#owns(jobId);
  }

  /**
   * While `acting` is false no job counts as this orchestrator's
   * ({@link isMine}): its lease lapsed, so others may be taking its jobs over
   * (see JobTakeover).
   */
  fence(acting: () => boolean): void {
    this.#acting = acting;
  }

  /** Reads the job's record back from KV (e.g. to learn of a takeover this one missed); resolves to it. */
  async refreshJob(jobId: string): Promise<JobRecord | undefined> {
    const job = await this.jobs.refresh(jobId);
    if (job) this.#emitJob(job);
    return job;
  }

  /**
   * Makes this orchestrator the job's owner, by compare-and-set on the
   * stored record: `canTake` decides on the record as stored, and of two
   * orchestrators claiming the same revision exactly one wins. Resolves to
   * the job as now owned, or undefined (not stored, refused by `canTake`, or
   * another orchestrator changed it first).
   */
  async claimJob(
    jobId: string,
    canTake: (job: JobRecord) => boolean,
    why: string,
    now = Date.now(),
  ): Promise<JobRecord | undefined> {
    if (this.owner === undefined) return undefined;
    const stored = await this.jobs.storedEntry(jobId);
    if (!stored || !canTake(stored.value)) return undefined;
    const job: JobRecord = { ...stored.value, Orchestrator: this.owner, ModifyTime: now };
    if (!(await this.jobs.compareAndSet(jobId, job, stored.revision))) return undefined;
    this.#emitJob(job);
    this.appendEvent({
      Time: now,
      JobID: jobId,
      Type: "JobStateUpdate",
      State: job.State,
      PreviousState: stored.value.State,
      Message: `taken over by ${this.owner} from ${stored.value.Orchestrator ?? "no owner"}: ${why}`,
    });
    return job;
  }

  /**
   * Of the jobs this orchestrator just claimed ({@link claimJob}), those
   * whose stored record still names it once {@link CLAIM_SETTLE_MS} has
   * passed: a claim another orchestrator's concurrent write overwrote is let
   * go (its record, read back, names the other owner). A record that cannot
   * be read back is kept as claimed.
   */
  async confirmClaims(jobIds: readonly string[], settleMs = CLAIM_SETTLE_MS): Promise<string[]> {
    if (jobIds.length === 0) return [];
    await new Promise((resolve) => setTimeout(resolve, settleMs));
    const now = await Promise.all(jobIds.map((id) => this.refreshJob(id).catch(() => this.jobs.get(id))));
    return jobIds.filter((_, i) => now[i]?.Orchestrator === this.owner);
  }

  /** Stops following the other orchestrators' writes. */
  close(): void {
    for (const table of [this.jobs, this.executions, this.nodes, this.events]) table.close();
  }

  putJob(job: JobRecord): void {
    if (!this.#writable(job.ID)) return;
    this.jobs.put(job.ID, job);
    this.#emitJob(job);
    if (TERMINAL_JOB_STATES.has(job.State)) this.#jobEnded(job.ID, job.ModifyTime);
  }

  putExecution(execution: ExecutionRecord): void {
    if (!this.#writable(execution.JobID)) return;
    this.executions.put(execution.ID, execution);
    this.#emitExecution(execution);
  }

  putNode(node: NodeRecord): void {
    this.nodes.put(node.ID, node);
    this.#emitter.emit("change", { type: "node", node } satisfies StateChange);
  }

  deleteNode(id: string): void {
    this.nodes.delete(id);
  }

  appendEvent(event: JobEvent): void {
    if (!this.#writable(event.JobID)) return;
    this.#releaseEnded(event.Time);
    // The last page is not in memory once the job ended a while ago: the event starts a new one.
    const pages = this.#ownPages.get(event.JobID) ?? 0;
    const lastKey = pageKey(event.JobID, this.owner, pages - 1);
    const last = pages > 0 ? this.events.get(lastKey) : undefined;
    if (last && last.length < HISTORY_PAGE_EVENTS) {
      this.events.put(lastKey, [...last, event]);
    } else {
      const key = pageKey(event.JobID, this.owner, pages);
      this.events.put(key, [event]);
      this.#indexPage(key);
    }
    this.#emitEvent(event);
  }

  /** Moves a job to `state` (if it is not there already) and records the event. */
  setJobState(job: JobRecord, state: JobState, message: string, now = Date.now()): JobRecord {
    if (job.State === state && job.StateMessage === message) return job;
    const next: JobRecord = { ...job, State: state, StateMessage: message, ModifyTime: now };
    if (state === "Queued" && job.State !== "Queued") next.QueuedSince = now;
    this.putJob(next);
    this.appendEvent({
      Time: now,
      JobID: job.ID,
      Type: "JobStateUpdate",
      State: state,
      PreviousState: job.State,
      Message: message,
    });
    return next;
  }

  /** Moves an execution to `state` with extra fields and records the event. */
  setExecutionState(
    execution: ExecutionRecord,
    state: ExecutionState,
    message: string,
    extra: Partial<ExecutionRecord> = {},
    now = Date.now(),
  ): ExecutionRecord {
    const next: ExecutionRecord = {
      ...execution,
      ...extra,
      State: state,
      StateMessage: message,
      ModifyTime: now,
    };
    this.putExecution(next);
    if (state !== execution.State) {
      this.appendEvent({
        Time: now,
        JobID: execution.JobID,
        ExecutionID: execution.ID,
        NodeID: execution.NodeID,
        Type: "ExecutionStateUpdate",
        State: state,
        PreviousState: execution.State,
        Message: message,
      });
    }
    return next;
  }

  /**
   * The job's events: in the order written, and when several orchestrators
   * wrote pages (a takeover), merged by time. Pages not in memory (the job
   * ended a while ago) are read from KV; the rest is taken from memory after
   * that, in the same turn, so an event appended meanwhile is in it once.
   */
  async history(jobId: string): Promise<JobEvent[]> {
    const keys = this.#historyKeys(jobId);
    const read = new Map<string, JobEvent[]>();
    await Promise.all(
      keys
        .filter((key) => !this.events.has(key))
        .map(async (key) => {
          const page = await this.events.stored(key);
          if (page) read.set(key, page);
        }),
    );
    const events = keys.flatMap((key) => this.events.get(key) ?? read.get(key) ?? []);
    const writers = new Set(
      keys.filter((key) => key !== jobId).map((key) => parsePage(key.slice(jobId.length + 1))?.writer),
    );
    // A stable sort: each writer's events keep their order.
    return writers.size > 1 ? events.sort((a, b) => a.Time - b.Time) : events;
  }

  executionsOf(jobId: string): ExecutionRecord[] {
    return [...this.executions.inGroup("job", jobId)].sort((a, b) => a.CreateTime - b.CreateTime);
  }

  /** The orchestrators named as the owner of a job that has not ended. */
  ownersOfUnfinishedJobs(): string[] {
    return this.jobs.groups("owner");
  }

  /** How many jobs have not ended: every orchestrator's, in a cluster. */
  unfinishedJobCount(): number {
    return this.jobs.size - this.jobs.count("submitter", ENDED);
  }

  /** How many jobs `sub` submitted that have not ended: on every orchestrator, in a cluster. */
  unfinishedJobCountOf(sub: string): number {
    return sub === ENDED ? 0 : this.jobs.count("submitter", sub);
  }

  /** The jobs that have not ended and name `owner` as their owner, in no order. */
  unfinishedJobsOf(owner: string): JobRecord[] {
    return [...this.jobs.inGroup("owner", owner)];
  }

  /** The node's executions that have not ended (its own view of them may differ), in no order. */
  unfinishedExecutionsOn(nodeId: string): ExecutionRecord[] {
    return [...this.executions.inGroup("node", nodeId)];
  }

  /** Drops the job, its executions and its history from memory, not from KV (see {@link purgeJob}). */
  forgetJob(jobId: string): void {
    for (const e of this.executionsOf(jobId)) this.executions.forget(e.ID);
    this.jobs.forget(jobId);
    for (const key of this.#historyKeys(jobId)) this.events.forget(key);
    this.#dropIndex(jobId);
  }

  #dropIndex(jobId: string): void {
    this.#pages.delete(jobId);
    this.#ownPages.delete(jobId);
    this.#wholeHistories.delete(jobId);
    this.#ended.delete(jobId);
  }

  /** Notes that the job ended `at`: its history leaves memory {@link HISTORY_KEPT_MS} later. */
  #jobEnded(jobId: string, at: number): void {
    if (this.#ended.has(jobId)) return;
    this.#ended.set(jobId, at);
    this.#releaseEnded(at);
  }

  /** Lets go of the histories of the jobs that ended {@link HISTORY_KEPT_MS} before `now`. */
  #releaseEnded(now: number): void {
    for (const [jobId, at] of this.#ended) {
      if (now - at < HISTORY_KEPT_MS) return;
      this.#ended.delete(jobId);
      const job = this.jobs.get(jobId);
      if (job && TERMINAL_JOB_STATES.has(job.State)) {
        for (const key of this.#historyKeys(jobId)) this.events.release(key);
      }
    }
  }

  /**
   * Takes back a job whose submitter is told it was not stored: gone from
   * memory now, and deleted in KV by writes queued after the failed ones, so
   * their retry never stores it later (a job the caller then submits again
   * would run twice). The job has no executions yet.
   */
  withdrawJob(jobId: string): void {
    const pages = this.#historyKeys(jobId);
    for (const key of pages) this.events.delete(key);
    this.jobs.delete(jobId);
    this.#dropIndex(jobId);
    // Sent with the next batch, not held: the fewer the moments the job is stored, the better.
    // A failure is retried as any write's; nobody waits for these.
    void this.jobs.flush([jobId]).catch(() => {});
    void this.events.flush(pages).catch(() => {});
  }

  /** Removes the job, its executions and its history from KV, leaving no delete markers. */
  async purgeJob(jobId: string, executionIds: readonly string[]): Promise<void> {
    await Promise.all([
      this.jobs.purge(jobId),
      this.events.purge(jobId),
      this.events.purge(`${jobId}.>`),
      ...executionIds.map((id) => this.executions.purge(id)),
    ]);
  }

  /** Calls `listener` on every change to the job; returns the unsubscribe function. */
  watchJob(jobId: string, listener: (change: StateChange) => void): () => void {
    this.#emitter.on(`job:${jobId}`, listener);
    return () => this.#emitter.off(`job:${jobId}`, listener);
  }

  /** Calls `listener` on every change; returns the unsubscribe function. */
  watchAll(listener: (change: StateChange) => void): () => void {
    this.#emitter.on("change", listener);
    return () => this.#emitter.off("change", listener);
  }

  /** Resolves when every change so far is stored in JetStream; rejects if one of them failed. */
  async flush(): Promise<void> {
    await Promise.all([this.jobs.flush(), this.executions.flush(), this.nodes.flush(), this.events.flush()]);
  }

  /**
   * Resolves when the job's own records (job, executions, history) written so
   * far are stored; rejects only if one of them failed, never for another
   * job's write that failed meanwhile.
   */
  async flushJob(jobId: string): Promise<void> {
    await Promise.all([
      this.jobs.flush([jobId]),
      this.executions.flush(this.executionsOf(jobId).map((e) => e.ID)),
      this.events.flush(this.#historyKeys(jobId)),
    ]);
  }

  /**
   * Fencing: nothing is written for a job whose record (as last seen here)
   * names another owner. A takeover not seen yet is caught by KV instead:
   * job records are written by compare-and-set.
   */
  #writable(jobId: string): boolean {
    const job = this.jobs.get(jobId);
    if (!job || this.#isOwner(job)) return true;
    this.#log.warn(
      { job: jobId, owner: job.Orchestrator },
      "write dropped: another orchestrator owns the job",
    );
    return false;
  }

  #owns(jobId: string): boolean {
    const job = this.jobs.get(jobId);
    return job !== undefined && this.#isOwner(job);
  }

  #isOwner(job: JobRecord): boolean {
    return this.owner === undefined || job.Orchestrator === undefined || job.Orchestrator === this.owner;
  }

  /**
   * Applies the other orchestrators' writes: every change to a job this one
   * does not own, and a job record that names another owner (its job was
   * taken over). Echoes of its own writes are skipped.
   */
  #followOthers(): void {
    const foreignJob = (jobId: string | undefined) => jobId === undefined || !this.#owns(jobId);
    this.jobs.follow({
      accept: (id, job) => (job ? !this.#isOwner(job) : foreignJob(id)),
      applied: (_id, job) => {
        if (!job) return;
        this.#emitJob(job);
        if (TERMINAL_JOB_STATES.has(job.State)) this.#jobEnded(job.ID, job.ModifyTime);
      },
    });
    this.executions.follow({
      accept: (id, e) => foreignJob((e ?? this.executions.get(id))?.JobID),
      applied: (_id, e) => {
        if (e) this.#emitExecution(e);
      },
    });
    this.events.follow({
      // A page known here but not in memory is of a job that ended a while ago: readers
      // fetch it from KV, and nobody follows that job any more (sending its whole page again).
      accept: (key) => foreignJob(jobOfPage(key)) && (this.events.has(key) || !this.#knownPage(key)),
      applied: (key, events, previous) => {
        this.#indexPage(key);
        for (const event of (events ?? []).slice(previous?.length ?? 0)) this.#emitEvent(event);
      },
    });
  }

  #emitJob(job: JobRecord): void {
    this.#emitter.emit(`job:${job.ID}`, { type: "job", job } satisfies StateChange);
    this.#emitter.emit("change", { type: "job", job } satisfies StateChange);
  }

  #emitExecution(execution: ExecutionRecord): void {
    const change: StateChange = { type: "execution", execution };
    this.#emitter.emit(`job:${execution.JobID}`, change);
    this.#emitter.emit("change", change);
  }

  #emitEvent(event: JobEvent): void {
    this.#emitter.emit(`job:${event.JobID}`, { type: "event", event } satisfies StateChange);
  }

  /** The `shoal-events` keys of the job's history: a whole history stored before pages, then each writer's pages in order. */
  #historyKeys(jobId: string): string[] {
    const pages = [...(this.#pages.get(jobId) ?? [])].map((key) => ({
      key,
      ...parsePage(key.slice(jobId.length + 1))!,
    }));
    pages.sort((a, b) => (a.writer ?? "").localeCompare(b.writer ?? "") || a.page - b.page);
    return [...(this.#wholeHistories.has(jobId) ? [jobId] : []), ...pages.map((p) => p.key)];
  }

  /** Whether the `shoal-events` key is one this orchestrator knows (see {@link #indexPage}). */
  #knownPage(key: string): boolean {
    const jobId = jobOfPage(key);
    return key === jobId ? this.#wholeHistories.has(jobId) : (this.#pages.get(jobId)?.has(key) ?? false);
  }

  #indexPage(key: string): void {
    const jobId = jobOfPage(key);
    // A key without a page is a whole history stored before pages: history() reads it first.
    if (key === jobId) {
      this.#wholeHistories.add(jobId);
      return;
    }
    const parsed = parsePage(key.slice(jobId.length + 1));
    if (!parsed) return;
    let pages = this.#pages.get(jobId);
    if (!pages) {
      pages = new Set();
      this.#pages.set(jobId, pages);
    }
    pages.add(key);
    if (parsed.writer === this.owner && parsed.page >= (this.#ownPages.get(jobId) ?? 0)) {
      this.#ownPages.set(jobId, parsed.page + 1);
    }
  }
}

/** The job a `shoal-events` key belongs to: `<job>.<page>`, or `<job>` for a history stored whole. */
function jobOfPage(key: string): string {
  const dot = key.indexOf(".");
  return dot < 0 ? key : key.slice(0, dot);
}
