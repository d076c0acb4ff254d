import { describeConstraint } from "../core/index.js";
import type { Resources } from "../fabric/protocol.js";
import type { PlaceFn, Placement } from "./dispatcher.js";
import type { NodeRecord } from "./records.js";

function free(node: NodeRecord, allocated: ReadonlyMap<string, Resources>): Resources {
  const used = allocated.get(node.ID) ?? { cpu: 0, memory: 0 };
  return { cpu: node.Capacity.cpu - used.cpu, memory: node.Capacity.memory - used.memory };
}

/** A tolerance for summed fractional CPUs (0.1 + 0.2 ≠ 0.3). */
const EPSILON = 1e-9;

/**
 * Pure placement: the nodes that may take one more execution of the job —
 * schedulable (APPROVED and HEALTHY), offering its engines, matching its
 * constraints, with the free CPU and memory it asks for, and not excluded —
 * least loaded first (spreads work, ties broken by id for determinism). When
 * fewer fit than wanted, `reason` says why the others did not, counted per
 * cause, e.g. "no node fits: 2 do not match zone = eu; 1 lacks CPU (0.5 free, 1 asked)".
 */
export const placeJob: PlaceFn = ({
  requirements,
  wanted,
  nodes,
  allocated,
  exclude,
  isSchedulable,
}): Placement => {
  const reasons = new Map<string, number>();
  const note = (r: string) => reasons.set(r, (reasons.get(r) ?? 0) + 1);
  const fit: { node: NodeRecord; load: number }[] = [];
  const r = requirements.resources;
  for (const node of nodes) {
    if (exclude.has(node.ID)) continue;
    if (!isSchedulable(node)) {
      note(node.Approval !== "APPROVED" ? `is ${node.Approval}` : `is ${node.Health}`);
      continue;
    }
    const missing = requirements.engines.filter((e) => !node.Engines.includes(e));
    if (missing.length > 0) {
      note(`lacks the ${missing.join(", ")} engine`);
      continue;
    }
    if (!requirements.matches(node.Labels)) {
      note(`does not match ${requirements.constraints.map(describeConstraint).join(", ")}`);
      continue;
    }
    const f = free(node, allocated);
    if (f.cpu + EPSILON < r.cpu) {
      note(`lacks CPU (${r.cpu} asked)`);
      continue;
    }
    if (f.memory < r.memory) {
      note(`lacks memory (${r.memory} bytes asked)`);
      continue;
    }
    const load = Math.max(
      node.Capacity.cpu > 0 ? 1 - f.cpu / node.Capacity.cpu : 1,
      node.Capacity.memory > 0 ? 1 - f.memory / node.Capacity.memory : 1,
    );
    fit.push({ node, load });
  }
  fit.sort((a, b) => a.load - b.load || a.node.ID.localeCompare(b.node.ID));
  const chosen = (wanted === "all" ? fit : fit.slice(0, Math.max(0, wanted))).map((f) => f.node.ID);
  const short = wanted === "all" ? chosen.length === 0 : chosen.length < wanted;
  if (!short) return { nodes: chosen };
  const why = [...reasons].map(([reason, n]) => `${n} node(s) ${reason}`).join("; ");
  return {
    nodes: chosen,
    reason:
      nodes.length === 0
        ? "no compute node has registered"
        : `not enough nodes fit: ${why || "all are busy with this job"}`,
  };
};
