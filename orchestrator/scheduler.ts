import {
  type Constraint,
  describeConstraint,
  ExecutionState,
  firstUnmetConstraint,
  formatBytes,
  isActiveExecutionState,
  isTerminalJobState,
  type JobSpec,
  JobState,
  jobEngines,
  jobResources,
  queueTimeoutMs,
} from "../core/index.js";

/**
 * The scheduler: pure placement decisions for one job from a snapshot of its
 * executions and the nodes. No I/O, no clock — `now` is passed in — so every
 * decision is reproducible in a test. The caller applies the plan (creates
 * executions, marks lost ones, cancels, sets the job state) and, when
 * scheduling several jobs in one pass, folds each plan's placements into the
 * nodes' `allocated` ({@link applyPlacements}) before the next job, taking
 * jobs in {@link compareJobsForScheduling} order.
 */

/** Lost executions a batch job may replace before it fails. @default 3 */
export const DEFAULT_RETRY_BUDGET = 3;
/** Float slack when adding fractional CPUs. */
const EPSILON = 1e-9;

export type NodeApproval = "APPROVED" | "PENDING" | "REJECTED";
export type NodeHealth = "HEALTHY" | "UNHEALTHY" | "LOST";

export interface SchedulerResources {
  /** CPU cores. */
  cpu: number;
  /** Bytes. */
  memory: number;
}

export interface SchedulerNode {
  id: string;
  labels: Readonly<Record<string, string>>;
  approval: NodeApproval;
  health: NodeHealth;
  capacity: SchedulerResources;
  /** Everything already placed on the node, by every job (including executions not yet reported by heartbeat). */
  allocated: SchedulerResources;
  engines: readonly string[];
  /** Set while the node reports its disk short of room: what is short. */
  lowDisk?: string;
  /** Its last register or heartbeat (ms): a node that declined a bid for a passing reason may be asked again once seen after it. */
  lastSeen?: number;
}

export interface SchedulerExecution {
  id: string;
  nodeId: string;
  state: ExecutionState;
  /**
   * A `BidRejected` for a passing reason (the node did not answer the bid, or its
   * disk was short of room): when that was; the node is asked again once seen after it.
   */
  askAgainAfter?: number;
}

export interface SchedulerJob {
  id: string;
  spec: JobSpec;
  state: JobState;
  /** ms since the epoch. */
  createdAt: number;
  /** When the job last went Queued (ms); defaults to `createdAt`. */
  queuedAt?: number;
}

export interface ScheduleInput {
  job: SchedulerJob;
  executions: readonly SchedulerExecution[];
  nodes: readonly SchedulerNode[];
  /** ms since the epoch. */
  now: number;
  /** @default DEFAULT_RETRY_BUDGET */
  retryBudget?: number;
}

/** Why a node can or cannot take the job (before counting this plan's own placements). */
export interface NodeVerdict {
  nodeId: string;
  ok: boolean;
  /** Which check failed. */
  check?: "approval" | "health" | "disk" | "engine" | "constraint" | "capacity";
  reason?: string;
}

export interface Placement {
  nodeId: string;
  resources: SchedulerResources;
}

/**
 * - `place`: create executions on `place` (the job is Running).
 * - `wait`: nothing to do; executions are under way.
 * - `queue`: nothing fits now; try again when nodes change.
 * - `complete` / `fail`: the job is over (`cancel` lists executions to stop).
 * - `none`: the job was already over.
 */
export type ScheduleDecision = "place" | "wait" | "queue" | "complete" | "fail" | "none";

export interface SchedulePlan {
  decision: ScheduleDecision;
  /** The job's state after the plan is applied. */
  jobState: JobState;
  reason?: string;
  /** New executions, best node first. */
  place: Placement[];
  /** Execution ids whose node is gone, rejected or lost: mark them Lost. */
  lost: string[];
  /** Execution ids to cancel (the job ended, or more ran than needed). */
  cancel: string[];
  /** Every node's verdict, sorted by node id. */
  verdicts: NodeVerdict[];
}

/** Decides what to do next for one job. Deterministic: the order of `nodes` and `executions` does not matter. */
export function schedule(input: ScheduleInput): SchedulePlan {
  const { job, now } = input;
  const spec = job.spec;
  const need = jobResources(spec);
  const nodes = [...input.nodes].sort((a, b) => compareIds(a.id, b.id));
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const verdicts = nodes.map((n) => judgeNode(n, spec, need));
  const executions = [...input.executions].sort((a, b) => compareIds(a.id, b.id));
  const plan = (p: Omit<SchedulePlan, "verdicts" | "place" | "lost" | "cancel"> & Partial<SchedulePlan>) => ({
    place: [],
    lost: [],
    cancel: [],
    ...p,
    verdicts,
  });

  if (isTerminalJobState(job.state)) {
    const cancel = executions.filter((e) => isActiveExecutionState(e.state)).map((e) => e.id);
    return plan({ decision: "none", jobState: job.state, cancel });
  }

  const lost = executions
    .filter((e) => isActiveExecutionState(e.state) && !isNodeAlive(byId.get(e.nodeId)))
    .map((e) => e.id);
  const lostSet = new Set(lost);
  const current = executions.map((e) => (lostSet.has(e.id) ? { ...e, state: ExecutionState.Lost } : e));
  const active = current.filter((e) => isActiveExecutionState(e.state));
  const completed = current.filter((e) => e.state === ExecutionState.Completed);
  const lostTotal = current.filter((e) => e.state === ExecutionState.Lost).length;
  const failed = current.find((e) => e.state === ExecutionState.Failed);
  const stopActive = active.map((e) => e.id);

  if (failed) {
    return plan({
      decision: "fail",
      jobState: JobState.Failed,
      reason: `execution ${failed.id} failed on node ${failed.nodeId}`,
      lost,
      cancel: stopActive,
    });
  }

  if (spec.Type === "ops") return scheduleOps();
  return scheduleBatch();

  function scheduleBatch(): SchedulePlan {
    const count = spec.Count ?? 1;
    if (completed.length >= count) {
      return plan({ decision: "complete", jobState: JobState.Completed, lost, cancel: stopActive });
    }
    const wanted = count - completed.length - active.length;
    if (wanted <= 0) return plan({ decision: "wait", jobState: JobState.Running, lost });
    const budget = input.retryBudget ?? DEFAULT_RETRY_BUDGET;
    if (lostTotal > budget) {
      return plan({
        decision: "fail",
        jobState: JobState.Failed,
        reason: `${lostTotal} execution(s) lost with their nodes; the retry budget is ${budget}`,
        lost,
        cancel: stopActive,
      });
    }
    // A node that declined is not asked again for this job. One that did not answer (it was
    // reconnecting, say) or was short of disk is, once it has been seen since: else a job
    // placed on a single node at that moment could never run.
    const declined = new Set(
      current
        .filter(
          (e) =>
            e.state === ExecutionState.BidRejected &&
            (e.askAgainAfter === undefined || (byId.get(e.nodeId)?.lastSeen ?? 0) <= e.askAgainAfter),
        )
        .map((e) => e.nodeId),
    );
    const busy = new Set([...active, ...completed].map((e) => e.nodeId));
    const candidates = verdicts
      .filter((v) => v.ok && !declined.has(v.nodeId))
      .map((v) => byId.get(v.nodeId)!);
    const place = placeBatch(candidates, busy, wanted, need);
    if (place.length === wanted) return plan({ decision: "place", jobState: JobState.Running, place, lost });
    const why = summarize(verdicts, declined, busy);
    if (place.length > 0 || active.length > 0) {
      return plan({
        decision: place.length > 0 ? "place" : "wait",
        jobState: JobState.Running,
        reason: `${wanted - place.length} more execution(s) wait for a node: ${why}`,
        place,
        lost,
      });
    }
    return queueOrFail(why, lost);
  }

  function scheduleOps(): SchedulePlan {
    if (current.length === 0) {
      const allocated = new Map<string, SchedulerResources>();
      const place: Placement[] = [];
      for (const v of verdicts) {
        if (v.ok && fits(byId.get(v.nodeId)!, need, allocated))
          place.push(reserve(byId.get(v.nodeId)!, need, allocated));
      }
      if (place.length > 0) return plan({ decision: "place", jobState: JobState.Running, place });
      return queueOrFail(summarize(verdicts, new Set(), new Set()), lost);
    }
    if (active.length > 0) return plan({ decision: "wait", jobState: JobState.Running, lost });
    const lostNodes = current.filter((e) => e.state === ExecutionState.Lost).map((e) => e.nodeId);
    if (lostNodes.length > 0) {
      return plan({
        decision: "fail",
        jobState: JobState.Failed,
        reason: `lost with node(s) ${lostNodes.join(", ")}`,
        lost,
      });
    }
    if (completed.length === 0) {
      return plan({
        decision: "fail",
        jobState: JobState.Failed,
        reason: "every matching node declined the job",
        lost,
      });
    }
    return plan({ decision: "complete", jobState: JobState.Completed, lost });
  }

  function queueOrFail(why: string, lostIds: string[]): SchedulePlan {
    const waited = now - (job.queuedAt ?? job.createdAt);
    const limit = queueTimeoutMs(spec);
    if (waited >= limit) {
      const after =
        limit === 0 ? "and QueueTimeout is 0" : `within the QueueTimeout of ${Math.round(limit / 1000)} s`;
      return plan({
        decision: "fail",
        jobState: JobState.Failed,
        reason: `no node could take the job ${after}: ${why}`,
        lost: lostIds,
      });
    }
    return plan({ decision: "queue", jobState: JobState.Queued, reason: why, lost: lostIds });
  }
}

/**
 * Picks `wanted` nodes, least loaded first: first among nodes that hold no
 * execution of this job (spread), then — only when those run out — nodes
 * that already do. Every pick reserves capacity, so a node is never
 * allocated past its capacity.
 */
function placeBatch(
  candidates: readonly SchedulerNode[],
  busy: ReadonlySet<string>,
  wanted: number,
  need: SchedulerResources,
): Placement[] {
  const allocated = new Map<string, SchedulerResources>();
  const place: Placement[] = [];
  const pick = (pool: readonly SchedulerNode[], once: boolean) => {
    const used = new Set<string>();
    while (place.length < wanted) {
      const best = pool
        .filter((n) => !(once && used.has(n.id)) && fits(n, need, allocated))
        .sort(
          (a, b) => loadAfter(a, need, allocated) - loadAfter(b, need, allocated) || compareIds(a.id, b.id),
        )[0];
      if (!best) return;
      used.add(best.id);
      place.push(reserve(best, need, allocated));
    }
  };
  pick(
    candidates.filter((n) => !busy.has(n.id)),
    true,
  );
  pick(candidates, false);
  return place;
}

function allocationOf(
  node: SchedulerNode,
  extra: ReadonlyMap<string, SchedulerResources>,
): SchedulerResources {
  const e = extra.get(node.id);
  return e ? { cpu: node.allocated.cpu + e.cpu, memory: node.allocated.memory + e.memory } : node.allocated;
}

function fits(
  node: SchedulerNode,
  need: SchedulerResources,
  extra: ReadonlyMap<string, SchedulerResources>,
): boolean {
  const a = allocationOf(node, extra);
  return a.cpu + need.cpu <= node.capacity.cpu + EPSILON && a.memory + need.memory <= node.capacity.memory;
}

function reserve(
  node: SchedulerNode,
  need: SchedulerResources,
  extra: Map<string, SchedulerResources>,
): Placement {
  const e = extra.get(node.id) ?? { cpu: 0, memory: 0 };
  extra.set(node.id, { cpu: e.cpu + need.cpu, memory: e.memory + need.memory });
  return { nodeId: node.id, resources: { ...need } };
}

/** The node's fuller dimension after placing `need`, as a fraction of capacity. */
function loadAfter(
  node: SchedulerNode,
  need: SchedulerResources,
  extra: ReadonlyMap<string, SchedulerResources>,
): number {
  const a = allocationOf(node, extra);
  const ratio = (used: number, cap: number) => (cap > 0 ? used / cap : Number.POSITIVE_INFINITY);
  return Math.max(
    ratio(a.cpu + need.cpu, node.capacity.cpu),
    ratio(a.memory + need.memory, node.capacity.memory),
  );
}

function isNodeAlive(node: SchedulerNode | undefined): boolean {
  return node !== undefined && node.health !== "LOST" && node.approval !== "REJECTED";
}

/** Whether a node could take one execution of the job, judged on its own. */
export function judgeNode(
  node: SchedulerNode,
  spec: JobSpec,
  need: SchedulerResources = jobResources(spec),
): NodeVerdict {
  const no = (check: NonNullable<NodeVerdict["check"]>, reason: string): NodeVerdict => ({
    nodeId: node.id,
    ok: false,
    check,
    reason,
  });
  if (node.approval !== "APPROVED") return no("approval", `not approved (${node.approval})`);
  if (node.health !== "HEALTHY") return no("health", node.health.toLowerCase());
  if (node.lowDisk !== undefined) return no("disk", `short of disk: ${node.lowDisk}`);
  const missing = jobEngines(spec).filter((e) => !node.engines.includes(e));
  if (missing.length > 0) return no("engine", `no ${missing.join(", ")} engine`);
  const unmet: Constraint | undefined = firstUnmetConstraint(node.labels, spec.Constraints);
  if (unmet) return no("constraint", `label constraint ${describeConstraint(unmet)} not met`);
  const freeCpu = node.capacity.cpu - node.allocated.cpu;
  const freeMemory = node.capacity.memory - node.allocated.memory;
  if (need.cpu > freeCpu + EPSILON) {
    return no("capacity", `needs ${need.cpu} CPU, ${Math.max(0, Math.round(freeCpu * 1000) / 1000)} free`);
  }
  if (need.memory > freeMemory) {
    return no(
      "capacity",
      `needs ${formatBytes(need.memory)} memory, ${formatBytes(Math.max(0, freeMemory))} free`,
    );
  }
  return { nodeId: node.id, ok: true };
}

const MAX_REASONS = 5;

function summarize(
  verdicts: readonly NodeVerdict[],
  declined: ReadonlySet<string>,
  busy: ReadonlySet<string>,
): string {
  if (verdicts.length === 0) return "no compute nodes are registered";
  const lines = verdicts.map((v) => {
    if (!v.ok) return `${v.nodeId}: ${v.reason}`;
    if (declined.has(v.nodeId)) return `${v.nodeId}: declined the job`;
    if (busy.has(v.nodeId)) return `${v.nodeId}: full with this job's executions`;
    return `${v.nodeId}: no room left after this plan`;
  });
  const more = lines.length > MAX_REASONS ? `; and ${lines.length - MAX_REASONS} more` : "";
  return `none of ${verdicts.length} node(s) can take it (${lines.slice(0, MAX_REASONS).join("; ")}${more})`;
}

function compareIds(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The nodes with a plan's placements added to `allocated`, for scheduling the next job in the same pass. */
export function applyPlacements(
  nodes: readonly SchedulerNode[],
  placements: readonly Placement[],
): SchedulerNode[] {
  return nodes.map((n) => {
    const mine = placements.filter((p) => p.nodeId === n.id);
    if (mine.length === 0) return n;
    const allocated = { ...n.allocated };
    for (const p of mine) {
      allocated.cpu += p.resources.cpu;
      allocated.memory += p.resources.memory;
    }
    return { ...n, allocated };
  });
}

/** Which job to schedule first when nodes are scarce: higher Priority, then older, then by id. */
export function compareJobsForScheduling(a: SchedulerJob, b: SchedulerJob): number {
  return b.spec.Priority - a.spec.Priority || a.createdAt - b.createdAt || compareIds(a.id, b.id);
}
