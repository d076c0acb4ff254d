import { EventEmitter } from "node:events";
import type { JetStreamClient } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { Logger } from "../core/index.js";
import { KvTable } from "./kv-table.js";
import type {
  ExecutionRecord,
  ExecutionState,
  JobEvent,
  JobRecord,
  JobState,
  NodeRecord,
} from "./records.js";

/** The KV buckets the orchestrator keeps its state in. */
export const BUCKETS = {
  jobs: "shoal-jobs",
  executions: "shoal-executions",
  nodes: "shoal-nodes",
  events: "shoal-events",
} as const;

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
  readonly #executionsByJob = new Map<string, Set<string>>();

  private constructor(
    readonly jobs: KvTable<JobRecord>,
    readonly executions: KvTable<ExecutionRecord>,
    readonly nodes: KvTable<NodeRecord>,
    readonly events: KvTable<JobEvent[]>,
  ) {
    this.#emitter.setMaxListeners(0);
    for (const e of executions.values()) this.#index(e);
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
       * In a cluster: this orchestrator's name. Jobs another orchestrator
       * accepted (`JobRecord.Orchestrator`), their executions and history are
       * left in KV but not loaded, so this one never dispatches, times out or
       * reschedules them (e.g. after its own restart).
       */
      owner?: string;
    } = {},
  ): Promise<StateStore> {
    const kvm = new Kvm(js);
    const open = async <T>(bucket: string) =>
      KvTable.open<T>(
        await kvm.create(bucket, { history: 1, replicas: options.replicas ?? 1 }),
        log.child({ bucket }),
      );
    const [jobs, executions, nodes, events] = await Promise.all([
      open<JobRecord>(BUCKETS.jobs),
      open<ExecutionRecord>(BUCKETS.executions),
      open<NodeRecord>(BUCKETS.nodes),
      open<JobEvent[]>(BUCKETS.events),
    ]);
    if (options.owner !== undefined) {
      const foreign = new Set<string>();
      for (const job of jobs.values()) {
        if (job.Orchestrator !== undefined && job.Orchestrator !== options.owner) foreign.add(job.ID);
      }
      for (const id of foreign) {
        jobs.forget(id);
        events.forget(id);
      }
      for (const e of [...executions.values()]) if (foreign.has(e.JobID)) executions.forget(e.ID);
    }
    return new StateStore(jobs, executions, nodes, events);
  }

  putJob(job: JobRecord): void {
    this.jobs.put(job.ID, job);
    this.#emitter.emit(`job:${job.ID}`, { type: "job", job } satisfies StateChange);
    this.#emitter.emit("change", { type: "job", job } satisfies StateChange);
  }

  putExecution(execution: ExecutionRecord): void {
    this.executions.put(execution.ID, execution);
    this.#index(execution);
    const change: StateChange = { type: "execution", execution };
    this.#emitter.emit(`job:${execution.JobID}`, change);
    this.#emitter.emit("change", change);
  }

  putNode(node: NodeRecord): void {
    this.nodes.put(node.ID, node);
    this.#emitter.emit("change", { type: "node", node } satisfies StateChange);
  }

  deleteNode(id: string): void {
    this.nodes.delete(id);
  }

  appendEvent(event: JobEvent): void {
    const history = this.events.get(event.JobID) ?? [];
    this.events.put(event.JobID, [...history, event]);
    this.#emitter.emit(`job:${event.JobID}`, { type: "event", event } satisfies StateChange);
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

  history(jobId: string): JobEvent[] {
    return this.events.get(jobId) ?? [];
  }

  executionsOf(jobId: string): ExecutionRecord[] {
    const ids = this.#executionsByJob.get(jobId);
    if (!ids) return [];
    const out: ExecutionRecord[] = [];
    for (const id of ids) {
      const e = this.executions.get(id);
      if (e) out.push(e);
    }
    return out.sort((a, b) => a.CreateTime - b.CreateTime);
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

  /** Resolves when every change so far is stored in JetStream. */
  async flush(): Promise<void> {
    await Promise.all([this.jobs.flush(), this.executions.flush(), this.nodes.flush(), this.events.flush()]);
  }

  #index(e: ExecutionRecord): void {
    let set = this.#executionsByJob.get(e.JobID);
    if (!set) {
      set = new Set();
      this.#executionsByJob.set(e.JobID, set);
    }
    set.add(e.ID);
  }
}
