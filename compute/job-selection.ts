import path from "node:path";
import type { Constraint, JobSpec, Source } from "../core/index.js";
import { describeConstraint, firstUnmetConstraint } from "../core/index.js";
import type { Resources, Submitter } from "../fabric/index.js";
import { ENGINE_CODES } from "./engines/errors.js";
import { checkExecCommand } from "./engines/exec-allow-list.js";

/** This node's rules for which jobs it bids on (`Compute.JobSelection.*` and friends). */
export interface JobSelectionPolicy {
  /** Engines this node runs: `wasm` always, `exec` only when `Compute.Engines.Exec.Allow` is not empty. */
  engines: readonly string[];
  /** `Compute.Engines.Exec.Allow` resolved to real paths (ExecAllowList): the only programs an `exec` job may run. */
  execAllow: readonly string[];
  /** `Compute.Labels`, matched against the job's constraints. */
  labels: Readonly<Record<string, string>>;
  /** `Compute.JobSelection.Locality`: `local` refuses jobs whose host inputs are not on this node. @default "anywhere" */
  locality: "anywhere" | "local";
  /** `Compute.JobSelection.RejectStatelessJobs`. @default false */
  rejectStatelessJobs: boolean;
  /** `Compute.JobSelection.AllowedSubmitters`: user names or SPIFFE ids; empty means anyone the API authorized. */
  allowedSubmitters: readonly string[];
  /** `Compute.Inputs.AllowedPaths`: host paths jobs may mount. */
  allowedInputPaths: readonly string[];
}

/** One host file a job reads, as the selection policy sees it. */
export interface DemandInput {
  /** `input` for the task's InputSources, `module` for a wasm module read from the host. */
  role: "input" | "module";
  /** The source type: `inline`, `localFile` or `localDirectory`. */
  type: string;
  /** For sources read from this host: the absolute path. */
  localPath?: string;
  /** For sources read from this host: whether the path exists here (looked up by the caller). */
  present?: boolean;
}

/** What a job asks of a node, extracted from its spec and the bid. */
export interface JobDemand {
  engine: string;
  /** For `exec`: the command to run, as the job wrote it. */
  command?: string;
  /** For `exec`: the command's real path on this node (looked up by the caller); unset when it does not exist. */
  commandRealPath?: string;
  inputs: readonly DemandInput[];
  constraints: readonly Constraint[];
  submitter: Submitter;
  resources: Resources;
}

/**
 * What a validated job spec demands. Host paths are returned with `present`
 * and `commandRealPath` unset; the caller looks them up (I/O stays out of the policy).
 */
export function jobDemand(spec: JobSpec, submitter: Submitter, resources: Resources): JobDemand {
  const task = spec.Tasks[0]!;
  const inputs: DemandInput[] = task.InputSources.map((i) => sourceDemand("input", i.Source));
  if (task.Engine.Type === "wasm") inputs.push(sourceDemand("module", task.Engine.Params.EntryModule));
  return {
    engine: task.Engine.Type,
    ...(task.Engine.Type === "exec" ? { command: task.Engine.Params.Command } : {}),
    inputs,
    constraints: spec.Constraints,
    submitter,
    resources,
  };
}

function sourceDemand(role: DemandInput["role"], source: Source): DemandInput {
  return {
    role,
    type: source.Type,
    ...(source.Type !== "inline" && source.Params.SourcePath !== undefined
      ? { localPath: source.Params.SourcePath }
      : {}),
  };
}

/** Which rule refused a bid. */
export type BidCheck =
  | "engine"
  | "command"
  | "submitter"
  | "stateless"
  | "locality"
  | "input-path"
  | "constraints"
  | "capacity"
  | "spec";

export type BidDecision = { accept: true } | { accept: false; check: BidCheck; reason: string };

function refuse(check: BidCheck, reason: string): BidDecision {
  return { accept: false, check, reason };
}

/** True when `candidate` is `root` or inside it (lexically; the executor resolves links again). */
export function isPathWithin(candidate: string, root: string): boolean {
  if (!path.isAbsolute(candidate) || !path.isAbsolute(root)) return false;
  const rel = path.relative(path.resolve(root), path.resolve(candidate));
  return rel === "" || (!rel.startsWith("..") && !path.isAbsolute(rel));
}

/**
 * Decides whether this node bids on a job: a pure function of the policy, what
 * the job demands and the capacity still free. A refusal names the rule and
 * says why, for the orchestrator's execution history.
 */
export function decideBid(policy: JobSelectionPolicy, demand: JobDemand, free: Resources): BidDecision {
  // Exec refusals carry the engine's code, so the execution's history says what the engine would.
  const execRefused = `${ENGINE_CODES.SHOAL_ENGINE_EXEC_NOT_ALLOWED}: `;
  if (!policy.engines.includes(demand.engine)) {
    const exec = demand.engine === "exec";
    return refuse(
      "engine",
      `${exec ? execRefused : ""}engine ${JSON.stringify(demand.engine)} is not enabled on this node${exec ? " (set Compute.Engines.Exec.Allow to enable it)" : ""}`,
    );
  }
  if (demand.engine === "exec") {
    const check = checkExecCommand(policy.execAllow, demand.command ?? "", demand.commandRealPath);
    if (!check.ok) {
      return refuse(
        "command",
        `${execRefused}command ${JSON.stringify(demand.command ?? "")} ${check.reason}`,
      );
    }
  }
  if (policy.allowedSubmitters.length > 0 && !policy.allowedSubmitters.includes(demand.submitter.sub)) {
    return refuse(
      "submitter",
      `submitter ${JSON.stringify(demand.submitter.sub)} is not in Compute.JobSelection.AllowedSubmitters`,
    );
  }
  if (policy.rejectStatelessJobs && !demand.inputs.some((i) => i.role === "input")) {
    return refuse("stateless", "the job has no inputs and Compute.JobSelection.RejectStatelessJobs is true");
  }
  for (const input of demand.inputs) {
    const localPath = input.localPath;
    if (localPath === undefined) continue;
    if (!policy.allowedInputPaths.some((root) => isPathWithin(localPath, root))) {
      return refuse("input-path", `${input.role} path ${localPath} is not under Compute.Inputs.AllowedPaths`);
    }
    if (policy.locality === "local" && input.present === false) {
      return refuse(
        "locality",
        `${input.role} path ${localPath} is not on this node and Compute.JobSelection.Locality is local`,
      );
    }
  }
  const unmet = firstUnmetConstraint(policy.labels, demand.constraints);
  if (unmet) return refuse("constraints", `this node's labels do not satisfy ${describeConstraint(unmet)}`);
  if (demand.resources.cpu > free.cpu || demand.resources.memory > free.memory) {
    return refuse(
      "capacity",
      `not enough free capacity: job needs cpu ${demand.resources.cpu}, memory ${demand.resources.memory}; free cpu ${free.cpu}, memory ${free.memory}`,
    );
  }
  return { accept: true };
}
