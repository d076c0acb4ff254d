import { randomUUID } from "node:crypto";
import type { Readable } from "node:stream";
import { type JobSpec, JobSpecError, type Logger } from "../core/index.js";
import type { Submitter } from "../fabric/protocol.js";
import {
  diskFull,
  jobLimit,
  jobNotFound,
  ORCHESTRATOR_CODES,
  OrchestratorError,
  shuttingDown,
  storeUnavailable,
} from "./errors.js";
import type { LogEntry, LogStore } from "./log-store.js";
import type { ModuleStore } from "./module-store.js";
import type { Cursor } from "./ordered-keys.js";
import {
  type ExecutionRecord,
  type JobEvent,
  type JobRecord,
  type JobState,
  type JobView,
  type ResultFile,
  TERMINAL_JOB_STATES,
} from "./records.js";
import type { ResultsStore } from "./results-store.js";
import type { StateStore } from "./state-store.js";

/** What a job spec parser yields: the validated spec and what the orchestrator needs of it. */
export interface ParsedJob {
  /** The spec as stored: inline modules replaced by their digests (core/job-spec `separateModules`). */
  spec: unknown;
  /** The bytes of the spec's inline modules, by digest, to store before the job. */
  modules: ReadonlyMap<string, Buffer>;
  /** Every module the stored spec names, with the field naming it; each must be stored. */
  namedModules: readonly { digest: string; field: string }[];
  name: string;
  namespace: string;
  type: "batch" | "ops";
  count: number;
}

/** The dispatcher as the job service sees it: it places new jobs and stops running ones. */
export interface JobDispatch {
  /** Look for nodes for the job now (it is stored and Pending). */
  enqueue(jobId: string): void;
  /** Cancel the job's active executions and mark it Stopped. */
  stop(jobId: string, reason: string): Promise<void>;
}

export interface JobServiceOptions {
  store: StateStore;
  logs: LogStore;
  results: ResultsStore;
  modules: ModuleStore;
  log: Logger;
  /** Validates a submitted spec; throws an error with `field` (HTTP 400) for a bad one. */
  parseSpec: (raw: unknown) => ParsedJob;
  dispatch: JobDispatch;
  /** In a cluster: this orchestrator's name, stamped on the jobs it accepts (`JobRecord.Orchestrator`). */
  owner?: string;
  /** What room is missing on the data directory's disk (DiskSpace), if any: new jobs are refused while something is. */
  shortfall?: () => Promise<string | undefined>;
  /**
   * Most jobs that have not ended, in all (`Orchestrator.Scheduler.MaxUnfinishedJobs`)
   * and of one submitter (`...PerSubmitter`); 0 or absent sets no limit.
   */
  maxUnfinished?: { all: number; perSubmitter: number };
  /** Most jobs one listing looks at. @default LIST_SCAN_LIMIT */
  listScanLimit?: number;
  /** How long a submission may wait on the store. @default SUBMIT_STORE_TIMEOUT_MS */
  storeTimeoutMs?: number;
}

/**
 * How long a submission waits for its module and its job to be stored before
 * it is answered 503 (and the job withdrawn): below the CLI's 30 s, so that a
 * client hears "not stored" rather than nothing. Writes queue behind each
 * other, and while JetStream does not answer each waits out its own timeout.
 */
export const SUBMIT_STORE_TIMEOUT_MS = 20_000;

/** `work`, or a rejection once `deadline` (epoch ms) has passed; `work`'s own later failure is then dropped. */
function byDeadline<T>(work: Promise<T>, deadline: number): Promise<T> {
  work.catch(() => {});
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error("the store did not answer in time")),
      Math.max(0, deadline - Date.now()),
    );
  });
  return Promise.race([work, late]).finally(() => clearTimeout(timer));
}

/**
 * Most jobs one listing looks at, whether the caller may see them or not, so
 * that one page costs the event loop a few milliseconds however many jobs
 * the orchestrator holds and however few of them the caller may see. A page
 * that stops here has fewer items than asked and a {@link JobPage.next}.
 */
export const LIST_SCAN_LIMIT = 2000;

export interface ListOptions {
  state?: JobState;
  /** Only jobs with each of these labels. */
  labels?: Readonly<Record<string, string>>;
  /** @default 100 */
  limit?: number;
  /** Where the previous page stopped: its {@link JobPage.next}. */
  after?: string;
  /** The jobs the caller may see (the API's authorization); the others are skipped. */
  visible?: (job: JobRecord) => boolean;
}

/** One page of a listing, newest first. */
export interface JobPage {
  items: JobRecord[];
  /** Set when older jobs may follow: pass it as {@link ListOptions.after} for the next page. */
  next?: string;
}

/** The shape of a {@link JobPage.next} token: the rank (creation time) and tie of a {@link Cursor}. */
export const PAGE_TOKEN_PATTERN = "^[0-9]{1,16}\\.[A-Za-z0-9_-]{16}$";

const pageToken = (c: Cursor) => `${c.rank}.${c.tie}`;

function pageCursor(token: string): Cursor {
  const dot = token.indexOf(".");
  return { rank: Number(token.slice(0, dot)), tie: token.slice(dot + 1) };
}

export interface ExecutionResults {
  ExecutionID: string;
  NodeID: string;
  Files: ResultFile[];
}

/**
 * The API's view of jobs: submit, read, stop, follow. Testable without HTTP;
 * the routes in api.ts only translate to and from it.
 */
export class JobService {
  readonly #o: JobServiceOptions;
  #accepting = true;

  constructor(options: JobServiceOptions) {
    this.#o = options;
  }

  /** Refuse new submissions (graceful shutdown). */
  refuseNewWork(): void {
    this.#accepting = false;
  }

  /**
   * Validates and stores a job (durably, before returning) and hands it to the
   * dispatcher. Throws the parser's error for a bad spec.
   */
  async submit(raw: unknown, submitter: Submitter): Promise<JobView> {
    if (!this.#accepting) throw shuttingDown();
    this.#checkUnfinished(submitter);
    const parsed = this.#o.parseSpec(raw);
    const short = await this.#o.shortfall?.();
    if (short !== undefined) throw diskFull(short);
    const release = this.#o.modules.pin(parsed.namedModules.map((m) => m.digest));
    const deadline = Date.now() + (this.#o.storeTimeoutMs ?? SUBMIT_STORE_TIMEOUT_MS);
    try {
      await this.#storeModules(parsed, deadline);
      return await this.#store(parsed, submitter, deadline);
    } finally {
      release();
    }
  }

  /**
   * Stores the job's inline modules (before the job, which names them), and
   * checks that the modules it names by digest are stored.
   */
  async #storeModules(parsed: ParsedJob, deadline: number): Promise<void> {
    const { modules } = this.#o;
    try {
      for (const [digest, bytes] of parsed.modules) await byDeadline(modules.put(digest, bytes), deadline);
    } catch (cause) {
      throw new OrchestratorError(
        ORCHESTRATOR_CODES.SHOAL_ORCH_STATE_STORE,
        "the job's module could not be stored",
        503,
        {
          cause,
          fix: "check the orchestrator's disk and the nats-server log lines; retry once the store is writable",
        },
      );
    }
    for (const { digest, field } of parsed.namedModules) {
      if (parsed.modules.has(digest) || (await modules.has(digest))) continue;
      throw new JobSpecError([
        {
          field,
          message: `no module ${digest} is stored: submit the module inline (the CLI does) and the orchestrator stores it`,
        },
      ]);
    }
  }

  /**
   * Refuses a job past a limit of unfinished jobs (429). Checked on arrival, so a
   * refused job's module is not stored, and again just before the job is put,
   * in the same turn of the event loop, so submissions that waited on the store
   * together cannot pass the limit between them.
   */
  #checkUnfinished(submitter: Submitter): void {
    const { all = 0, perSubmitter = 0 } = this.#o.maxUnfinished ?? {};
    const { store } = this.#o;
    if (perSubmitter > 0 && store.unfinishedJobCountOf(submitter.sub) >= perSubmitter) {
      throw jobLimit(
        `${submitter.sub} has ${perSubmitter} jobs that have not ended, the most one submitter may have`,
        "Orchestrator.Scheduler.MaxUnfinishedJobsPerSubmitter",
      );
    }
    if (all > 0 && store.unfinishedJobCount() >= all) {
      throw jobLimit(
        `${all} jobs have not ended, the most the orchestrator takes`,
        "Orchestrator.Scheduler.MaxUnfinishedJobs",
      );
    }
  }

  async #store(parsed: ParsedJob, submitter: Submitter, deadline: number): Promise<JobView> {
    this.#checkUnfinished(submitter);
    const now = Date.now();
    const job: JobRecord = {
      ID: `j-${randomUUID()}`,
      Name: parsed.name,
      Namespace: parsed.namespace,
      Type: parsed.type,
      Spec: parsed.spec,
      Submitter: submitter,
      State: "Pending",
      StateMessage: "submitted",
      Count: parsed.count,
      Retries: 0,
      CreateTime: now,
      ModifyTime: now,
      ...(this.#o.owner ? { Orchestrator: this.#o.owner } : {}),
    };
    this.#o.store.putJob(job);
    this.#o.store.appendEvent({
      Time: now,
      JobID: job.ID,
      Type: "JobStateUpdate",
      State: "Pending",
      Message: `submitted by ${submitter.sub}`,
    });
    try {
      await byDeadline(this.#o.store.flushJob(job.ID), deadline);
    } catch (cause) {
      this.#o.store.withdrawJob(job.ID);
      throw storeUnavailable(`job ${job.ID} could not be stored durably`, cause);
    }
    this.#o.log.info({ job: job.ID, type: job.Type, submitter: submitter.sub }, "job submitted");
    this.#o.dispatch.enqueue(job.ID);
    return { ...job, Executions: [] };
  }

  /**
   * A page of jobs, newest first. Reads at most `listScanLimit` jobs: the
   * page then ends early, with a `next` token to go on from there. `after`
   * must match {@link PAGE_TOKEN_PATTERN} (the API's schema checks it).
   */
  list(options: ListOptions = {}): JobPage {
    const limit = options.limit ?? 100;
    const scanLimit = this.#o.listScanLimit ?? LIST_SCAN_LIMIT;
    const wanted = Object.entries(options.labels ?? {});
    const items: JobRecord[] = [];
    let scanned = 0;
    let last: Cursor | undefined;
    for (const { row: job, cursor } of this.#o.store.jobs.descending(
      options.after ? pageCursor(options.after) : undefined,
    )) {
      if (items.length === limit || scanned === scanLimit) return { items, next: pageToken(last!) };
      scanned++;
      last = cursor;
      if (options.state && job.State !== options.state) continue;
      if (wanted.length > 0) {
        const labels = (job.Spec as Partial<JobSpec>).Labels ?? {};
        if (wanted.some(([k, v]) => labels[k] !== v)) continue;
      }
      if (options.visible && !options.visible(job)) continue;
      items.push(job);
    }
    return { items };
  }

  get(id: string): JobView {
    return { ...this.#require(id), Executions: this.#o.store.executionsOf(id) };
  }

  executions(id: string): ExecutionRecord[] {
    this.#require(id);
    return this.#o.store.executionsOf(id);
  }

  history(id: string): Promise<JobEvent[]> {
    this.#require(id);
    return this.#o.store.history(id);
  }

  /** Stops a job that is not finished yet; returns it as it is afterwards. */
  async stop(id: string, reason = "stopped by user"): Promise<JobView> {
    const job = this.#require(id);
    if (TERMINAL_JOB_STATES.has(job.State)) {
      throw new OrchestratorError(
        ORCHESTRATOR_CODES.SHOAL_ORCH_JOB_FINISHED,
        `job ${id} is already ${job.State}`,
        409,
        { fix: "nothing to stop" },
      );
    }
    await this.#o.dispatch.stop(id, reason);
    return this.get(id);
  }

  /**
   * Calls `onEvent` with the job's history so far and then each new event,
   * and `onEnd` once the job is in a final state. Returns the unsubscribe
   * function. Fed by the store's change notifications (no polling).
   */
  follow(id: string, onEvent: (e: JobEvent) => void, onEnd: (job: JobView) => void): () => void {
    this.#require(id);
    let done = false;
    /** Events that came while the history so far was read. */
    let buffered: JobEvent[] | undefined = [];
    const finish = () => {
      if (done) return;
      done = true;
      unsubscribe();
      // Let the final execution writes of this tick land before the snapshot.
      setImmediate(() => onEnd(this.get(id)));
    };
    const unsubscribe = this.#o.store.watchJob(id, (change) => {
      if (done) return;
      if (change.type === "event") {
        if (buffered) buffered.push(change.event);
        else onEvent(change.event);
      }
      if (!buffered && change.type === "job" && TERMINAL_JOB_STATES.has(change.job.State)) finish();
    });
    const replay = (stored: JobEvent[]) => {
      if (done) return;
      // The history holds the events appended while it was read (the same objects): each is sent once.
      const seen = new Set(stored);
      for (const e of stored) onEvent(e);
      for (const e of buffered ?? []) if (!seen.has(e)) onEvent(e);
      buffered = undefined;
      const job = this.#o.store.jobs.get(id);
      if (!job || TERMINAL_JOB_STATES.has(job.State)) finish();
    };
    this.#o.store.history(id).then(replay, (err: unknown) => {
      this.#o.log.error({ err, job: id }, "cannot read the job's history; following what comes next");
      replay([]);
    });
    return () => {
      done = true;
      unsubscribe();
    };
  }

  /** The job's stored lines, read as the caller takes them. */
  logs(id: string): AsyncGenerator<LogEntry> {
    this.#require(id);
    return this.#o.logs.lines(id);
  }

  /**
   * The job's stored lines and then each new one, until the job is final
   * (or removed) and every line stored before that is given, or until
   * `cancelled` is aborted (its client went away).
   */
  followLogs(id: string, cancelled: AbortSignal): AsyncGenerator<LogEntry> {
    this.#require(id);
    return this.#followLogs(id, cancelled);
  }

  async *#followLogs(id: string, cancelled: AbortSignal): AsyncGenerator<LogEntry> {
    const ended = new AbortController();
    const isFinal = () => {
      const job = this.#o.store.jobs.get(id);
      return !job || TERMINAL_JOB_STATES.has(job.State);
    };
    const stopJob = this.#o.store.watchJob(id, () => {
      if (isFinal()) ended.abort();
    });
    try {
      if (isFinal()) ended.abort();
      yield* this.#o.logs.follow(id, ended.signal, cancelled);
    } finally {
      stopJob();
    }
  }

  /** The stored result files of each execution of the job. */
  results(id: string): ExecutionResults[] {
    return this.executions(id)
      .filter((e) => e.Results)
      .map((e) => ({ ExecutionID: e.ID, NodeID: e.NodeID, Files: e.Results ?? [] }));
  }

  async openResult(
    id: string,
    executionId: string,
    name: string,
  ): Promise<{ file: ResultFile; stream: Readable }> {
    const execution = this.executions(id).find((e) => e.ID === executionId);
    const file = execution?.Results?.find((f) => f.name === name);
    const opened = file ? await this.#o.results.open(id, executionId, file) : undefined;
    if (!file || !opened) {
      throw new OrchestratorError(
        ORCHESTRATOR_CODES.SHOAL_ORCH_RESULTS_NOT_FOUND,
        `no result ${name} for execution ${executionId} of job ${id}`,
        404,
        { fix: "list the stored results with GET .../results" },
      );
    }
    return { file, stream: opened.stream };
  }

  #require(id: string): JobRecord {
    const job = this.#o.store.jobs.get(id);
    if (!job) throw jobNotFound(id);
    return job;
  }
}
