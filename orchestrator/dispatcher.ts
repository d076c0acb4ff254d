import { randomUUID } from "node:crypto";
import { type JobSpec, jobEngines, type Logger, LogThrottle, Tally } from "../core/index.js";
import type { MessageBody, Resources } from "../fabric/protocol.js";
import { jobConflict } from "./errors.js";
import type { JobDispatch } from "./job-service.js";
import { KeyedSerializer } from "./keyed-serializer.js";
import type { LogStore } from "./log-store.js";
import type { NodeService } from "./node-service.js";
import {
  type ExecutionRecord,
  type ExecutionState,
  type JobRecord,
  type NodeRecord,
  TERMINAL_EXECUTION_STATES,
  TERMINAL_JOB_STATES,
} from "./records.js";
import { ResultRejected, type ResultsStore } from "./results-store.js";
import type { StateStore } from "./state-store.js";

/** How the dispatcher talks to one compute node (signed envelopes over the fabric). */
export interface NodeChannel {
  bid(nodeId: string, body: MessageBody<"bid">): Promise<MessageBody<"bid-reply">>;
  run(nodeId: string, body: MessageBody<"run">): Promise<MessageBody<"run-reply">>;
  cancel(nodeId: string, body: MessageBody<"cancel">): Promise<void>;
}

/** Where a job may run and what it takes, derived from its spec. */
export interface JobRequirements {
  resources: Resources;
  /** The job's own limits, when its spec sets them. */
  executionTimeoutMs?: number;
  queueTimeoutMs?: number;
}

/** A placement decision for one job, from the pure scheduler. */
export interface Placement {
  /** Nodes to ask for a bid now, best first. */
  nodes: string[];
  /** Why the remaining executions could not be placed (shown while Queued). */
  reason?: string;
}

/** The scheduler as the dispatcher uses it: a pure decision on a snapshot of one job. */
export type PlaceFn = (input: {
  job: JobRecord;
  executions: readonly ExecutionRecord[];
  nodes: readonly NodeRecord[];
  /** Capacity in use on each node by every job's active executions. */
  allocated: ReadonlyMap<string, Resources>;
}) => Placement;

export interface DispatcherOptions {
  store: StateStore;
  nodes: NodeService;
  logs: LogStore;
  results: ResultsStore;
  channel: NodeChannel;
  log: Logger;
  requirements: (job: JobRecord) => JobRequirements;
  place: PlaceFn;
  /** `Orchestrator.Scheduler.*` in ms / count. */
  queueTimeoutMs: number;
  executionTimeoutMs: number;
  retryBudget: number;
  /** Told each time a job of this orchestrator ends (metrics). */
  onJobFinished?: (state: "Completed" | "Failed" | "Stopped") => void;
  /** Extra time past an execution's deadline before the orchestrator fails it itself. @default 5000 */
  timeoutGraceMs?: number;
  /**
   * How long a bid asked again after a restart or takeover, which its node
   * did not answer, waits for the node to register before it is asked a last
   * time anyway (a node whose connection stayed up does not register again).
   * @default 30000
   */
  askAgainAfterMs?: number;
  /**
   * In a cluster every orchestrator hears every node: true for an execution
   * this one has not seen (yet) but another orchestrator of the cluster
   * stored. Such executions, like the known ones of jobs another
   * orchestrator owns ({@link StateStore.isMine}), are left to their owner:
   * not cancelled, and their results not answered here.
   * Absent: a single orchestrator, where an unknown execution is unknown.
   */
  isForeign?: (executionId: string) => Promise<boolean>;
}

/** How often a stop tries to take over a job another orchestrator keeps changing. */
const STOP_CLAIM_ATTEMPTS = 3;
const STOP_CLAIM_PAUSE_MS = 200;

/** A node that refused a bid only for want of free capacity is asked again this many times... */
const BUSY_BID_RETRIES = 4;
/** ...after this pause, doubled each time (0.1 + 0.2 + 0.4 + 0.8 s). */
const BUSY_BID_PAUSE_MS = 100;

/**
 * In a cluster, how long log lines of an execution not known here are kept for
 * its record to arrive (the owner's write reaches the others within
 * milliseconds; after a server loss, within seconds), and how many bytes of
 * them in all.
 */
const EARLY_LOG_MS = 5000;
const EARLY_LOG_BYTES = 4 << 20;

/** What {@link Dispatcher} works out once per stored spec. */
interface SpecFacts {
  requirements: JobRequirements;
  /** Equal for jobs that fit on exactly the same nodes when neither has run anywhere yet. */
  likeness: string;
}

/** Submitters whose last placement the fair queue order remembers, at most. */
const SERVED_SUBMITTERS = 10_000;

const ACTIVE: ReadonlySet<ExecutionState> = new Set(["AskForBid", "BidAccepted", "Running"]);

function isActive(e: ExecutionRecord): boolean {
  return ACTIVE.has(e.State);
}

function add(a: Resources, b: Resources, sign = 1): Resources {
  return { cpu: Math.max(0, a.cpu + sign * b.cpu), memory: Math.max(0, a.memory + sign * b.memory) };
}

/**
 * Moves jobs through their lives: asks the scheduler where to place them,
 * bids and runs on nodes over the fabric, tracks node capacity, timeouts,
 * stops, node losses (rescheduling within the retry budget) and results. All
 * decisions are made synchronously on the in-memory state, so two events
 * never race on one job; only the fabric round trips are awaited.
 */
export class Dispatcher implements JobDispatch {
  readonly #o: DispatcherOptions;
  readonly #allocated = new Map<string, Resources>();
  /**
   * What each active execution holds in `#allocated`, so it is given back
   * exactly once: those of the jobs this orchestrator owns, and in a cluster
   * those of the others' jobs as their records are followed ({@link observe}),
   * so no two orchestrators place more on a node than it has.
   */
  readonly #reserved = new Map<string, { jobId: string; nodeId: string; resources: Resources }>();
  readonly #deadlines = new Map<string, NodeJS.Timeout>();
  /**
   * Nodes that left a bid unanswered, or declined it short of disk, and have not
   * been heard from since (see {@link nodeSeen}).
   */
  readonly #askWhenSeen = new Set<string>();
  /** Why the result of an active execution could not be stored here (last attempt), for its timeout's message. */
  readonly #unstored = new Map<string, string>();
  readonly #queueTimers = new Map<string, NodeJS.Timeout>();
  /** Queued jobs in submission order, re-examined whenever capacity or nodes change (in {@link #fairOrder}). */
  readonly #queue = new Set<string>();
  /**
   * When each submitter last had an execution placed here, as a count of
   * placements; least recently served first, the oldest forgotten past
   * SERVED_SUBMITTERS (one forgotten counts as never served).
   */
  readonly #lastServed = new Map<string, number>();
  #placements = 0;
  /** Each stored spec's {@link #factsOf}. */
  readonly #specFacts = new WeakMap<object, SpecFacts>();
  #reexamine: NodeJS.Immediate | undefined;
  #closed = false;
  /**
   * Bids asked again after a restart or takeover that their node did not
   * answer: what they need, and the timer that asks a last time if the node
   * does not register first.
   */
  readonly #awaitingNode = new Map<string, { requirements: JobRequirements; timer: NodeJS.Timeout }>();
  /** One execution's result chunks and manifest are handled in arrival order, one at a time. */
  readonly #resultOrder = new KeyedSerializer();
  readonly #complaints = new LogThrottle();
  /** Log lines of executions whose record has not reached this orchestrator yet, oldest first. */
  readonly #earlyLogs = new Map<string, { nodeId: string; at: number; lines: MessageBody<"logs">[] }>();
  #earlyLogBytes = 0;

  constructor(options: DispatcherOptions) {
    this.#o = options;
  }

  /** Takes up the jobs this orchestrator owns after a (re)start, see {@link adopt}; counts what the others' hold. */
  start(): void {
    for (const e of this.#o.store.executions.values()) {
      if (!this.#o.store.isMine(e.JobID)) this.observe(e);
    }
    this.adopt(
      [...this.#o.store.jobs.values()].filter((j) => this.#o.store.isMine(j.ID)).map((j) => j.ID),
      "an orchestrator restart",
    );
  }

  /**
   * Rebuilds the in-memory view of jobs this orchestrator now owns (after a
   * restart, or taken over from another orchestrator): capacity in use,
   * deadline timers, the queue. Running executions continue on their nodes
   * and their results are accepted here; bids and runs that were in flight
   * when the previous owner stopped are abandoned (the node is told to
   * cancel) and placed again.
   */
  adopt(jobIds: readonly string[], why: string): void {
    const now = Date.now();
    const jobs = jobIds
      .map((id) => this.#o.store.jobs.get(id))
      .filter((j): j is JobRecord => j !== undefined && !TERMINAL_JOB_STATES.has(j.State))
      .sort((a, b) => a.CreateTime - b.CreateTime);
    for (const job of jobs) {
      for (const e of this.#o.store.executionsOf(job.ID)) {
        if (!isActive(e)) continue;
        if (e.State === "Running") {
          this.#reserve(e);
          this.#armDeadline(e, now);
        } else {
          this.#askAgain(job, e, why);
        }
      }
    }
    for (const job of jobs) this.#evaluate(job.ID);
  }

  /**
   * A bid that was in flight when the previous owner stopped: the node is asked
   * again for the same execution, since it may hold it (running, or its result
   * waiting to be delivered) and then says so, and the run goes on. A node that
   * never had it runs it now or declines; a declined bid is placed again.
   * Cancelling it instead threw away a run that had started, or even finished,
   * before the previous owner stored `Running`. A node that does not answer now
   * (after a restart its connection to the new server is still being made) is
   * asked a last time when it registers ({@link reconcile}), or after
   * `askAgainAfterMs` if it does not (its connection stayed up); unanswered
   * again, the bid ends `BidRejected` and the job is placed again. A node that
   * never comes back is LOST, and the execution with it.
   */
  #askAgain(job: JobRecord, e: ExecutionRecord, why: string): void {
    let requirements: JobRequirements;
    try {
      requirements = this.#o.requirements(job);
    } catch {
      // #evaluate fails the job with the reason.
      this.#setExecution(e, "Cancelled", `interrupted by ${why} before it started`);
      void this.#cancelOnNode(e, `interrupted by ${why}`);
      return;
    }
    const asking = this.#setExecution(
      e,
      "AskForBid",
      `interrupted by ${why} before it started; asking the node again`,
    );
    this.#dispatch(job, asking, requirements, (err) => {
      if (this.#o.store.executions.get(asking.ID)?.State !== "AskForBid") return;
      this.#o.log.info(
        { execution: asking.ID, node: asking.NodeID, reason: err.message },
        "the node did not answer the bid asked again; it is asked once more when it registers",
      );
      const timer = setTimeout(() => this.#askLastTime(asking.ID), this.#o.askAgainAfterMs ?? 30_000);
      this.#awaitingNode.set(asking.ID, { requirements, timer });
    });
  }

  /** Bids asked again ({@link askAgain}) whose node has registered: asked a last time. */
  #askOnRegister(nodeId: string): void {
    for (const id of [...this.#awaitingNode.keys()]) {
      const e = this.#o.store.executions.get(id);
      if (e && e.NodeID !== nodeId && e.State === "AskForBid") continue;
      this.#askLastTime(id);
    }
  }

  /** A bid asked again and not answered: asked a last time, if it still waits (unanswered, it ends). */
  #askLastTime(executionId: string): void {
    const awaiting = this.#awaitingNode.get(executionId);
    if (!awaiting) return;
    clearTimeout(awaiting.timer);
    this.#awaitingNode.delete(executionId);
    const e = this.#o.store.executions.get(executionId);
    const job = e && this.#o.store.jobs.get(e.JobID);
    if (!this.#closed && e?.State === "AskForBid" && job && this.#o.store.isMine(job.ID)) {
      this.#dispatch(job, e, awaiting.requirements);
    }
  }

  /**
   * The job is no longer this orchestrator's (taken over): forget its timers
   * and queue place. What its active executions hold stays counted, as for
   * any other orchestrator's job, until they end.
   */
  relinquish(jobId: string): void {
    this.#unqueue(jobId);
    for (const [executionId, r] of this.#reserved) {
      if (r.jobId !== jobId) continue;
      this.#disarm(executionId);
      const e = this.#o.store.executions.get(executionId);
      if (e) this.observe(e);
      else this.#release(executionId);
    }
  }

  /**
   * Another orchestrator's execution changed (its record followed from the
   * shared KV): an active one holds its node's capacity here too, an ended
   * one gives it back and queued jobs are looked at again.
   */
  observe(e: ExecutionRecord): void {
    this.#replayEarlyLogs(e.ID);
    if (isActive(e)) {
      this.#reserve(e);
    } else if (this.#reserved.has(e.ID)) {
      this.#release(e.ID);
      this.#scheduleReexamine();
    }
  }

  close(): void {
    this.#closed = true;
    for (const t of this.#deadlines.values()) clearTimeout(t);
    for (const t of this.#queueTimers.values()) clearTimeout(t);
    for (const { timer } of this.#awaitingNode.values()) clearTimeout(timer);
    if (this.#reexamine) clearImmediate(this.#reexamine);
    this.#deadlines.clear();
    this.#queueTimers.clear();
    this.#awaitingNode.clear();
  }

  /** Capacity in use on each node (active executions), for the API and tests. */
  allocated(nodeId: string): Resources {
    return this.#allocated.get(nodeId) ?? { cpu: 0, memory: 0 };
  }

  enqueue(jobId: string): void {
    this.#evaluate(jobId);
  }

  /**
   * Stops the job. One that another orchestrator of the cluster owns is taken
   * over first (compare-and-set on its record, {@link StateStore.claimJob}),
   * so the stop takes effect here at once whether its owner is up or not;
   * the owner sees its record change and lets the job go.
   */
  async stop(jobId: string, reason: string): Promise<void> {
    for (let attempt = 0; !this.#o.store.isMine(jobId); attempt++) {
      const job = this.#o.store.jobs.get(jobId);
      if (!job || TERMINAL_JOB_STATES.has(job.State)) return;
      if (attempt === STOP_CLAIM_ATTEMPTS) throw jobConflict(jobId);
      const claimed = await this.#o.store.claimJob(
        jobId,
        (stored) => !TERMINAL_JOB_STATES.has(stored.State),
        "stopped there",
      );
      // Lost the race (the owner wrote, or it finished): let the store follow that change, then look again.
      if (!claimed) await new Promise((r) => setTimeout(r, STOP_CLAIM_PAUSE_MS));
      // Won it: unless a concurrent claim overwrote this one (isMine then says so).
      else await this.#o.store.confirmClaims([jobId]);
    }
    const job = this.#o.store.jobs.get(jobId);
    if (!job || TERMINAL_JOB_STATES.has(job.State)) return;
    this.#finishJob(job, "Stopped", reason);
    await this.#o.store.flushJob(jobId);
  }

  /** A node (re)appeared, was approved or became healthy: queued work may fit now. */
  nodeChanged(): void {
    this.#scheduleReexamine();
  }

  /**
   * A node was heard from (a heartbeat): if a bid to it went unanswered, or was
   * declined short of disk, the jobs that wait may be placed there again
   * (scheduler.ts), so the queue is looked at once, not at every heartbeat.
   */
  nodeSeen(nodeId: string): void {
    if (this.#askWhenSeen.delete(nodeId)) this.#scheduleReexamine();
  }

  /**
   * After a node registers, reconcile what it says it holds with what we
   * think it runs: executions we consider running but it does not know are
   * lost; executions it runs that we do not want are cancelled.
   */
  reconcile(nodeId: string, reported: MessageBody<"register">["executions"]): void {
    this.#askOnRegister(nodeId);
    const held = new Set(reported.map((r) => r.executionId));
    for (const e of this.#o.store.unfinishedExecutionsOn(nodeId)) {
      if (e.State === "Running" && !held.has(e.ID) && this.#o.store.isMine(e.JobID)) {
        this.#loseExecution(e, "the node restarted and no longer has this execution");
      }
    }
    for (const r of reported) {
      const e = this.#o.store.executions.get(r.executionId);
      if (!e || e.NodeID !== nodeId) {
        void this.#cancelUnlessForeign(nodeId, r.executionId, e);
      } else if (!this.#o.store.isMine(e.JobID)) {
        // Another orchestrator's job: its owner reconciles it.
      } else if (TERMINAL_EXECUTION_STATES.has(e.State) && e.State !== "Completed" && e.State !== "Failed") {
        void this.#cancelOnNode(e, `execution is ${e.State}`);
      }
    }
    this.#scheduleReexamine();
  }

  async #cancelUnlessForeign(nodeId: string, executionId: string, known: ExecutionRecord | undefined) {
    if (!known && (await this.#o.isForeign?.(executionId).catch(() => false))) return;
    await this.#o.channel.cancel(nodeId, { executionId, reason: "unknown execution" }).catch(() => {});
  }

  /** The node is gone (LOST, deleted or rejected): its executions move elsewhere. */
  nodeLost(node: NodeRecord): void {
    for (const e of this.#o.store.unfinishedExecutionsOn(node.ID)) {
      if (isActive(e) && this.#o.store.isMine(e.JobID)) {
        this.#loseExecution(
          e,
          `node ${node.ID} is ${node.Approval === "REJECTED" ? "REJECTED" : node.Health}`,
        );
      }
    }
  }

  handleStatus(nodeId: string, body: MessageBody<"status">): void {
    const e = this.#owned(nodeId, body.executionId);
    if (!e || !isActive(e)) return;
    if (body.state === "Running") {
      if (e.State !== "Running") this.#setExecution(e, "Running", "running");
      return;
    }
    this.#endExecution(e, body.state, body.error ?? `node reported ${body.state}`);
  }

  /**
   * Stores a log line of any execution known here, whoever owns its job:
   * every orchestrator of a cluster hears every node, so each can serve the
   * logs of any job, and keeps them when it takes the job over. In a cluster a
   * line of an execution not known here yet (a job's first lines can reach the
   * other orchestrators before its owner's record does) is kept until the
   * record arrives ({@link observe}), for a few seconds.
   */
  handleLogs(nodeId: string, body: MessageBody<"logs">): void {
    if (this.#o.isForeign && !this.#o.store.executions.has(body.executionId)) {
      this.#keepEarlyLog(nodeId, body);
      return;
    }
    const e = this.#held(nodeId, body.executionId);
    if (!e) return;
    void this.#o.logs
      .append(e.JobID, {
        Time: Date.now(),
        ExecutionID: e.ID,
        Stream: body.stream,
        Seq: body.seq,
        Data: Buffer.from(body.data, "base64").toString("utf8"),
      })
      .then((outcome) => {
        if (outcome === "capped") {
          this.#o.log.warn(
            { node: nodeId, execution: e.ID, stream: body.stream },
            "the node sent more output than it may keep; its further lines are dropped",
          );
        }
      })
      // Every line fails alike (a full disk, say): one error per 10 s, not one per line.
      .catch((err) =>
        this.#complaints.error(this.#o.log, "", { err, execution: e.ID }, "cannot store log line"),
      );
  }

  /** Keeps a line of an execution not known here yet: up to EARLY_LOG_MS, EARLY_LOG_BYTES in all. */
  #keepEarlyLog(nodeId: string, body: MessageBody<"logs">): void {
    const now = Date.now();
    for (const [id, early] of this.#earlyLogs) {
      if (now - early.at < EARLY_LOG_MS) break;
      this.#takeEarlyLogs(id);
    }
    if (this.#earlyLogBytes + body.data.length > EARLY_LOG_BYTES) return;
    let early = this.#earlyLogs.get(body.executionId);
    if (!early) {
      early = { nodeId, at: now, lines: [] };
      this.#earlyLogs.set(body.executionId, early);
    } else if (early.nodeId !== nodeId) {
      return;
    }
    early.lines.push(body);
    this.#earlyLogBytes += body.data.length;
  }

  /** The record of an execution arrived: the lines kept for it are stored now. */
  #replayEarlyLogs(executionId: string): void {
    const early = this.#takeEarlyLogs(executionId);
    if (!early) return;
    for (const line of early.lines) this.handleLogs(early.nodeId, line);
  }

  #takeEarlyLogs(executionId: string) {
    const early = this.#earlyLogs.get(executionId);
    if (!early) return undefined;
    this.#earlyLogs.delete(executionId);
    for (const line of early.lines) this.#earlyLogBytes -= line.data.length;
    return early;
  }

  /**
   * Stages one result chunk; call in arrival order (chunks and manifest of an
   * execution are serialized). Only for an execution whose result may still be
   * stored: an active one, or one that ended Completed or Failed without its
   * files (the orchestrator failed it past its deadline, say). Chunks for an
   * execution lost, cancelled or refused would stay staged for good, since
   * nothing deletes them after its end.
   */
  handleResultChunk(nodeId: string, body: MessageBody<"result-chunk">): Promise<void> {
    return this.#resultOrder.run(body.executionId, async () => {
      const e = this.#owned(nodeId, body.executionId);
      if (!e) return;
      if (!isActive(e) && !((e.State === "Completed" || e.State === "Failed") && !e.Results)) {
        this.#warn(
          nodeId,
          { execution: e.ID, state: e.State },
          "result chunk for an execution whose result is no longer wanted; ignored",
        );
        return;
      }
      let staged: boolean;
      try {
        staged = await this.#o.results.stageChunk(body);
      } catch (err) {
        // Its manifest is not answered (#notStored): the node sends the whole result again.
        this.#warn(nodeId, { execution: e.ID, err }, "result chunk not staged");
        return;
      }
      if (!staged) {
        this.#warn(
          nodeId,
          { execution: e.ID, file: body.file, index: body.index },
          "bad result chunk ignored",
        );
      }
    });
  }

  /**
   * Stores a result manifest and its staged chunks and answers whether it is
   * stored — only after the files and the execution's new state are durable,
   * because the node deletes its copy when it reads `stored: true`. Runs after
   * the chunks that arrived before it have been staged. Resolves to undefined
   * when the execution is another orchestrator's (its owner answers, not this
   * one), and when this orchestrator cannot store it (a full disk, a store
   * that is down): the node keeps the result and sends it again later.
   */
  handleResult(
    nodeId: string,
    body: MessageBody<"result">,
  ): Promise<MessageBody<"result-reply"> | undefined> {
    return this.#resultOrder.run(body.executionId, async () => {
      // The output the node had not streamed yet: stored (once) by every orchestrator, as
      // `logs` are, and before the execution ends, so followers see it before the end.
      for (const line of body.logs ?? []) this.handleLogs(nodeId, { executionId: body.executionId, ...line });
      const known = this.#o.store.executions.get(body.executionId);
      if (known ? !this.#o.store.isMine(known.JobID) : await this.#o.isForeign?.(body.executionId)) {
        await this.#o.results.discardStaged(body.executionId);
        return undefined;
      }
      try {
        return await this.#storeResult(nodeId, body);
      } catch (err) {
        this.#notStored(nodeId, body.executionId, err);
        return undefined;
      }
    });
  }

  /** A result this orchestrator could not store: logged, and named by its execution's timeout. */
  #notStored(nodeId: string, executionId: string, err: unknown): void {
    this.#o.log.error(
      { err, node: nodeId, execution: executionId },
      "cannot store a result here; the node keeps it and sends it again",
    );
    const e = this.#o.store.executions.get(executionId);
    if (e && isActive(e)) this.#unstored.set(executionId, (err as Error).message);
  }

  async #storeResult(nodeId: string, body: MessageBody<"result">): Promise<MessageBody<"result-reply">> {
    const e = this.#owned(nodeId, body.executionId);
    if (!e) return { stored: false, reason: "unknown execution" };
    if (e.State === "Completed" || e.State === "Failed") {
      // A resend after a lost acknowledgement: already stored.
      if (e.Results || body.files.length === 0) return { stored: true };
    } else if (!isActive(e)) {
      await this.#o.results.discardStaged(e.ID);
      return { stored: false, reason: `execution is ${e.State}; its result is no longer wanted` };
    }
    let files: ExecutionRecord["Results"];
    try {
      files = body.files.length > 0 ? await this.#o.results.commit(e.JobID, body) : [];
    } catch (err) {
      if (!(err instanceof ResultRejected)) throw err;
      this.#warn(nodeId, { execution: e.ID, reason: err.message }, "result rejected");
      return { stored: false, reason: err.message };
    }
    const current = this.#o.store.executions.get(e.ID) ?? e;
    const extra: Partial<ExecutionRecord> = {
      ExitCode: body.exitCode,
      Stdout: body.stdout,
      Stderr: body.stderr,
      StdoutTruncated: body.stdoutTruncated,
      StderrTruncated: body.stderrTruncated,
      Results: files,
    };
    if (isActive(current)) {
      const message = body.state === "Completed" ? `exit code ${body.exitCode}` : (body.error ?? "failed");
      this.#endExecution(current, body.state, message, extra);
    } else {
      this.#o.store.putExecution({ ...current, ...extra });
    }
    await this.#o.store.flushJob(e.JobID);
    return { stored: true };
  }

  // ---- placement ------------------------------------------------------------------------------

  /** `full`: during a pass over the queue, the likenesses of jobs that found no room in it. */
  #evaluate(jobId: string, full?: Set<string>): void {
    if (this.#closed) return;
    const job = this.#o.store.jobs.get(jobId);
    if (!job || TERMINAL_JOB_STATES.has(job.State) || !this.#o.store.isMine(jobId)) {
      this.#unqueue(jobId);
      return;
    }
    let facts: SpecFacts;
    try {
      facts = this.#factsOf(job);
    } catch (err) {
      this.#finishJob(job, "Failed", `cannot read the job's requirements: ${(err as Error).message}`);
      return;
    }
    const { requirements, likeness } = facts;
    const executions = this.#o.store.executionsOf(jobId);
    // A job that has run nowhere yet is excluded from no node: it fits exactly where its like ones fit.
    const likeable = full !== undefined && executions.length === 0;
    if (likeable && full.has(likeness)) return; // still queued, as it was
    const active = executions.filter(isActive);
    const completed = executions.filter((e) => e.State === "Completed").length;
    const firstPlacement = executions.length === 0;
    const wanted: number | "all" =
      job.Type === "ops" && firstPlacement ? "all" : job.Count - completed - active.length;
    if (wanted !== "all" && wanted <= 0) return;
    const found = this.#o.place({
      job,
      executions,
      nodes: [...this.#o.store.nodes.values()],
      allocated: this.#allocated,
    });
    const placement = wanted === "all" ? found : { ...found, nodes: found.nodes.slice(0, wanted) };
    let current = job;
    if (job.Type === "ops" && firstPlacement && placement.nodes.length > 0) {
      current = { ...job, Count: placement.nodes.length };
      this.#o.store.putJob(current);
    }
    if (likeable && placement.nodes.length === 0) full.add(likeness);
    for (const nodeId of placement.nodes) this.#launch(current, nodeId, requirements);
    const stillWanted = wanted === "all" ? placement.nodes.length === 0 : placement.nodes.length < wanted;
    if (stillWanted) {
      this.#queue.add(jobId);
      if (active.length === 0 && placement.nodes.length === 0) {
        current = this.#o.store.setJobState(current, "Queued", placement.reason ?? "waiting for a node");
        this.#armQueueTimeout(current, requirements);
      }
    } else {
      this.#unqueue(jobId);
    }
    if (placement.nodes.length > 0 && current.State !== "Running") {
      this.#o.store.setJobState(current, "Running", "placed");
    }
  }

  #launch(job: JobRecord, nodeId: string, requirements: JobRequirements): void {
    const now = Date.now();
    this.#lastServed.delete(job.Submitter.sub);
    this.#lastServed.set(job.Submitter.sub, ++this.#placements);
    if (this.#lastServed.size > SERVED_SUBMITTERS)
      this.#lastServed.delete(this.#lastServed.keys().next().value!);
    const execution: ExecutionRecord = {
      ID: `e-${randomUUID()}`,
      JobID: job.ID,
      NodeID: nodeId,
      State: "AskForBid",
      StateMessage: "asking the node for a bid",
      Resources: requirements.resources,
      CreateTime: now,
      ModifyTime: now,
    };
    this.#o.store.putExecution(execution);
    this.#o.store.appendEvent({
      Time: now,
      JobID: job.ID,
      ExecutionID: execution.ID,
      NodeID: nodeId,
      Type: "ExecutionStateUpdate",
      State: "AskForBid",
      Message: `placed on ${nodeId}`,
    });
    this.#dispatch(job, execution, requirements);
  }

  /**
   * Holds the execution's capacity and asks its node for a bid that carries the
   * run. A bid request that fails (no answer) ends the execution `BidRejected`,
   * or is handed to `unanswered`.
   */
  #dispatch(
    job: JobRecord,
    execution: ExecutionRecord,
    requirements: JobRequirements,
    unanswered?: (err: Error) => void,
  ): void {
    this.#reserve(execution);
    void this.#bidAndRun(job, execution, requirements, unanswered).catch((err) => {
      this.#o.log.error({ err, execution: execution.ID }, "dispatch failed");
    });
  }

  async #bidAndRun(
    job: JobRecord,
    execution: ExecutionRecord,
    requirements: JobRequirements,
    unanswered = (err: Error) => {
      this.#askWhenSeen.add(execution.NodeID);
      this.#failBeforeStart(execution, `bid request failed: ${err.message}`, { Unanswered: true });
    },
  ): Promise<void> {
    const timeoutMs = requirements.executionTimeoutMs ?? this.#o.executionTimeoutMs;
    /** What the bid and the run both say of the execution. */
    const order = { jobId: job.ID, executionId: execution.ID, spec: job.Spec, submitter: job.Submitter };
    let bid: MessageBody<"bid-reply">;
    let e: ExecutionRecord | undefined;
    for (let attempt = 0; ; attempt++) {
      try {
        bid = await this.#o.channel.bid(execution.NodeID, {
          ...order,
          resources: execution.Resources,
          run: { timeoutMs },
        });
      } catch (err) {
        unanswered(err as Error);
        return;
      }
      e = this.#o.store.executions.get(execution.ID);
      if (e?.State !== "AskForBid") return; // stopped or lost meanwhile
      // Capacity counted here as free may not be free on the node yet (an execution told to
      // cancel is still ending): ask again a few times before the node counts as declining.
      if (bid.accept || !bid.busy || attempt >= BUSY_BID_RETRIES) break;
      await new Promise((resolve) => setTimeout(resolve, BUSY_BID_PAUSE_MS * 2 ** attempt));
      if (this.#closed || this.#o.store.executions.get(execution.ID)?.State !== "AskForBid") return;
    }
    if (!bid.accept) {
      if (bid.lowDisk !== undefined) this.#askWhenSeen.add(e.NodeID);
      this.#endExecution(
        e,
        "BidRejected",
        bid.reason ? `bid rejected: ${bid.reason}` : "bid rejected",
        bid.lowDisk === undefined ? {} : { ShortOfDisk: true },
      );
      return;
    }
    e = this.#setExecution(e, "BidAccepted", "bid accepted");
    if (bid.started) {
      // The bid carried the run and the node started it.
      this.#running(e, timeoutMs);
      return;
    }
    let run: MessageBody<"run-reply">;
    try {
      run = await this.#o.channel.run(e.NodeID, { ...order, timeoutMs });
    } catch (err) {
      this.#failBeforeStart(e, `run request failed: ${(err as Error).message}`);
      return;
    }
    e = this.#o.store.executions.get(execution.ID);
    if (e?.State !== "BidAccepted") return;
    if (!run.accepted) {
      this.#endExecution(e, "BidRejected", `run refused: ${run.reason ?? "no reason given"}`);
      return;
    }
    this.#running(e, timeoutMs);
  }

  #running(e: ExecutionRecord, timeoutMs: number): void {
    const now = Date.now();
    this.#armDeadline(this.#setExecution(e, "Running", "running", { Deadline: now + timeoutMs }), now);
  }

  /** A node that cannot be reached before the run started: try another node, no retry spent. */
  #failBeforeStart(execution: ExecutionRecord, message: string, extra: Partial<ExecutionRecord> = {}): void {
    const e = this.#o.store.executions.get(execution.ID);
    if (!e || !isActive(e)) return;
    this.#o.log.warn({ execution: e.ID, node: e.NodeID }, message);
    this.#endExecution(e, "BidRejected", message, extra);
  }

  // ---- execution and job endings ------------------------------------------------------------

  #setExecution(
    e: ExecutionRecord,
    state: ExecutionState,
    message: string,
    extra: Partial<ExecutionRecord> = {},
  ): ExecutionRecord {
    const wasActive = isActive(e);
    const next = this.#o.store.setExecutionState(e, state, message, extra);
    if (wasActive && !isActive(next)) {
      this.#unstored.delete(e.ID);
      this.#release(e.ID);
      this.#scheduleReexamine();
    }
    return next;
  }

  /** An execution ended: record it and decide what that means for its job. */
  #endExecution(
    e: ExecutionRecord,
    state: ExecutionState,
    message: string,
    extra: Partial<ExecutionRecord> = {},
  ): void {
    this.#setExecution(e, state, message, extra);
    const job = this.#o.store.jobs.get(e.JobID);
    if (!job || TERMINAL_JOB_STATES.has(job.State)) return;
    if (state === "Failed") {
      this.#finishJob(job, "Failed", `execution ${e.ID} on ${e.NodeID} failed: ${message}`);
      return;
    }
    if (state === "BidRejected") {
      if (job.Type === "batch") {
        this.#evaluate(job.ID);
        return;
      }
      // ops runs on every matching node that takes it: one fewer to wait for.
      if (job.Count <= 1) {
        this.#finishJob(job, "Failed", `every matching node declined: ${message}`);
        return;
      }
      this.#o.store.putJob({ ...job, Count: job.Count - 1, ModifyTime: Date.now() });
    }
    const executions = this.#o.store.executionsOf(job.ID);
    const completed = executions.filter((x) => x.State === "Completed").length;
    if (completed >= job.Count && !executions.some(isActive)) {
      this.#finishJob(job, "Completed", `${completed} execution(s) completed`);
    }
  }

  #loseExecution(e: ExecutionRecord, message: string): void {
    this.#setExecution(e, "Lost", message);
    const job = this.#o.store.jobs.get(e.JobID);
    if (!job || TERMINAL_JOB_STATES.has(job.State)) return;
    if (job.Retries >= this.#o.retryBudget) {
      this.#finishJob(job, "Failed", `${message}; retry budget of ${this.#o.retryBudget} spent`);
      return;
    }
    this.#o.store.putJob({ ...job, Retries: job.Retries + 1, ModifyTime: Date.now() });
    this.#o.log.info(
      { job: job.ID, execution: e.ID, retry: job.Retries + 1 },
      "rescheduling a lost execution",
    );
    this.#evaluate(job.ID);
  }

  #finishJob(job: JobRecord, state: "Completed" | "Failed" | "Stopped", message: string): void {
    this.#unqueue(job.ID);
    for (const e of this.#o.store.executionsOf(job.ID)) {
      if (!isActive(e)) continue;
      this.#setExecution(e, "Cancelled", `job ${state}: ${message}`);
      void this.#cancelOnNode(e, message);
    }
    this.#o.store.setJobState(job, state, message);
    this.#o.onJobFinished?.(state);
    this.#o.log.info({ job: job.ID, state, message }, "job finished");
  }

  async #cancelOnNode(e: ExecutionRecord, reason: string): Promise<void> {
    try {
      await this.#o.channel.cancel(e.NodeID, { executionId: e.ID, reason });
    } catch (err) {
      this.#o.log.debug({ err, execution: e.ID }, "cancel not delivered");
    }
  }

  // ---- timers, queue, capacity ----------------------------------------------------------------

  #armDeadline(e: ExecutionRecord, now: number): void {
    if (e.Deadline === undefined) return;
    clearTimeout(this.#deadlines.get(e.ID));
    const grace = this.#o.timeoutGraceMs ?? 5000;
    const t = setTimeout(
      () => {
        this.#deadlines.delete(e.ID);
        const current = this.#o.store.executions.get(e.ID);
        if (!current || !isActive(current) || !this.#o.store.isMine(current.JobID)) return;
        const unstored = this.#unstored.get(e.ID);
        // A node whose result could not be stored has finished: a cancel would make it drop the result.
        if (unstored === undefined) void this.#cancelOnNode(current, "execution timeout");
        this.#endExecution(
          current,
          "Failed",
          unstored === undefined
            ? "execution timeout: the node did not finish in time"
            : `execution timeout: its result came but could not be stored here (${unstored}); the node keeps it and sends it again`,
        );
      },
      Math.max(0, e.Deadline - now) + grace,
    );
    t.unref();
    this.#deadlines.set(e.ID, t);
  }

  #armQueueTimeout(job: JobRecord, requirements: JobRequirements): void {
    if (this.#queueTimers.has(job.ID)) return;
    const timeout = requirements.queueTimeoutMs ?? this.#o.queueTimeoutMs;
    const since = job.QueuedSince ?? Date.now();
    const t = setTimeout(
      () => {
        this.#queueTimers.delete(job.ID);
        const current = this.#o.store.jobs.get(job.ID);
        if (current?.State !== "Queued" || !this.#o.store.isMine(job.ID)) return;
        this.#finishJob(current, "Failed", `queue timeout: ${current.StateMessage}`);
      },
      Math.max(0, since + timeout - Date.now()),
    );
    t.unref();
    this.#queueTimers.set(job.ID, t);
  }

  #unqueue(jobId: string): void {
    this.#queue.delete(jobId);
    const t = this.#queueTimers.get(jobId);
    if (t) clearTimeout(t);
    this.#queueTimers.delete(jobId);
  }

  /** Re-examines queued jobs once per tick however many things changed in it. */
  #scheduleReexamine(): void {
    if (this.#reexamine || this.#queue.size === 0 || this.#closed) return;
    this.#reexamine = setImmediate(() => {
      this.#reexamine = undefined;
      const full = new Set<string>();
      for (const id of this.#fairOrder()) this.#evaluate(id, full);
    });
  }

  /**
   * A job's requirements and its likeness, computed once per stored spec (a
   * job's spec does not change). The likeness is what decides whether a job
   * with no executions yet fits somewhere: its type, the room it asks for, its
   * engines and its label constraints. Within one pass over the queue room
   * only shrinks (placements are made, nothing is given back), so once such a
   * job found no node, the like jobs after it are not looked at: a backlog of
   * 10,000 like jobs costs one placement per pass, not 10,000 (~9 µs each
   * with 10 nodes). Throws what `requirements` throws.
   */
  #factsOf(job: JobRecord): SpecFacts {
    const spec = job.Spec as JobSpec;
    let facts = this.#specFacts.get(spec);
    if (facts === undefined) {
      const requirements = this.#o.requirements(job);
      const { cpu, memory } = requirements.resources;
      const likeness = JSON.stringify([job.Type, cpu, memory, jobEngines(spec), spec.Constraints ?? []]);
      facts = { requirements, likeness };
      this.#specFacts.set(spec, facts);
    }
    return facts;
  }

  /**
   * The queued jobs in the order they may take capacity that came free: those
   * of the submitter with the fewest executions active here first, then of the
   * one served least recently, then in submission order. So a submitter's
   * backlog holds back another's job for one of its own at most, not for all
   * of them; one submitter's jobs keep their order.
   */
  #fairOrder(): string[] {
    const ids = [...this.#queue];
    if (ids.length < 2) return ids;
    const submitterOf = (jobId: string) => this.#o.store.jobs.get(jobId)?.Submitter.sub ?? "";
    const active = new Tally();
    for (const { jobId } of this.#reserved.values()) active.add(submitterOf(jobId));
    return ids
      .map((id, position) => {
        const sub = submitterOf(id);
        return { id, active: active.get(sub), served: this.#lastServed.get(sub) ?? 0, position };
      })
      .sort((a, b) => a.active - b.active || a.served - b.served || a.position - b.position)
      .map(({ id }) => id);
  }

  #reserve(e: ExecutionRecord): void {
    if (this.#reserved.has(e.ID)) return;
    this.#reserved.set(e.ID, { jobId: e.JobID, nodeId: e.NodeID, resources: e.Resources });
    this.#allocated.set(e.NodeID, add(this.allocated(e.NodeID), e.Resources));
  }

  /** Gives back what an execution held here: its node capacity and its deadline timer. */
  #release(executionId: string): void {
    this.#disarm(executionId);
    // Lost, cancelled or never started: no result will be stored, so chunks staged for it go
    // (in order with its result messages). Completed and Failed ones may still get theirs.
    const state = this.#o.store.executions.get(executionId)?.State;
    if (state !== "Completed" && state !== "Failed") {
      void this.#resultOrder
        .run(executionId, () => this.#o.results.discardStaged(executionId))
        .catch((err) => this.#o.log.warn({ err, execution: executionId }, "cannot discard staged chunks"));
    }
    const r = this.#reserved.get(executionId);
    if (!r) return;
    this.#reserved.delete(executionId);
    this.#allocated.set(r.nodeId, add(this.allocated(r.nodeId), r.resources, -1));
  }

  /** Cancels the execution's deadline timer, if it has one here. */
  #disarm(executionId: string): void {
    clearTimeout(this.#deadlines.get(executionId));
    this.#deadlines.delete(executionId);
  }

  /** A warning about what a node sent: at most one line of each per node every 10 s. */
  #warn(nodeId: string, fields: Record<string, unknown>, msg: string): void {
    this.#complaints.warn(this.#o.log, nodeId, { node: nodeId, ...fields }, msg);
  }

  /** The execution if `nodeId` holds it and its job is this orchestrator's to act on. */
  #owned(nodeId: string, executionId: string): ExecutionRecord | undefined {
    const e = this.#held(nodeId, executionId);
    return e && this.#o.store.isMine(e.JobID) ? e : undefined;
  }

  /** The execution if it exists and belongs to `nodeId`; a node cannot touch another's work. */
  #held(nodeId: string, executionId: string): ExecutionRecord | undefined {
    const e = this.#o.store.executions.get(executionId);
    if (!e || e.NodeID !== nodeId) {
      // In a cluster, messages about other orchestrators' executions reach every orchestrator.
      const msg = "message about an execution the node does not hold; ignored";
      if (!e && this.#o.isForeign) this.#o.log.debug({ node: nodeId, execution: executionId }, msg);
      else this.#warn(nodeId, { execution: executionId }, msg);
      return undefined;
    }
    return e;
  }
}
