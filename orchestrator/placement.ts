import type { JobSpec } from "../core/index.js";
import type { PlaceFn, Placement } from "./dispatcher.js";
import { schedule } from "./scheduler.js";

const NONE = { cpu: 0, memory: 0 };

/**
 * The dispatcher's placement, decided by the pure scheduler (scheduler.ts) on
 * a snapshot of the job, its executions and the nodes with the capacity in
 * use. Only the placements and the reason are taken: failing, completing,
 * losing and timing out are the dispatcher's own transitions, driven by
 * events (results, node losses, timers) rather than by re-planning.
 */
export const placeJob: PlaceFn = ({ job, executions, nodes, allocated }): Placement => {
  const plan = schedule({
    job: {
      id: job.ID,
      spec: job.Spec as JobSpec,
      state: job.State,
      createdAt: job.CreateTime,
      ...(job.QueuedSince === undefined ? {} : { queuedAt: job.QueuedSince }),
    },
    executions: executions.map((e) => ({
      id: e.ID,
      nodeId: e.NodeID,
      state: e.State,
      ...(e.Unanswered || e.ShortOfDisk ? { askAgainAfter: e.ModifyTime } : {}),
    })),
    nodes: nodes.map((n) => ({
      id: n.ID,
      labels: n.Labels,
      approval: n.Approval,
      health: n.Health,
      capacity: n.Capacity,
      allocated: allocated.get(n.ID) ?? NONE,
      engines: n.Engines,
      lastSeen: n.LastSeen,
      ...(n.LowDisk === undefined ? {} : { lowDisk: n.LowDisk }),
    })),
    now: Date.now(),
    // Lost executions are budgeted by the dispatcher (Orchestrator.Scheduler.RetryBudget).
    retryBudget: Number.POSITIVE_INFINITY,
  });
  return { nodes: plan.place.map((p) => p.nodeId), ...(plan.reason ? { reason: plan.reason } : {}) };
};
