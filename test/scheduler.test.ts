import "reflect-metadata";
import fc from "fast-check";
import t from "tap";
import { type ExecutionState, type JobSpec, type JobState, parseJobSpec } from "../core/index.js";
import {
  applyPlacements,
  compareJobsForScheduling,
  type SchedulerExecution,
  type SchedulerJob,
  type SchedulerNode,
  schedule,
} from "../orchestrator/scheduler.js";

const GiB = 2 ** 30;
const MODULE = Buffer.from([0, 0x61, 0x73, 0x6d, 1, 0, 0, 0]).toString("base64");

function spec(
  over: Record<string, unknown> = {},
  resources = { CPU: "1", Memory: "1Gi" },
  engine = "wasm",
): JobSpec {
  const params =
    engine === "wasm"
      ? { EntryModule: { Type: "inline", Params: { Content: MODULE } } }
      : { Command: "/bin/echo" };
  return parseJobSpec({
    Name: "j",
    Tasks: [
      {
        Name: "m",
        Engine: { Type: engine, Params: params },
        Resources: resources,
        Timeouts: { QueueTimeout: 60 },
      },
    ],
    ...over,
  });
}

function node(id: string, over: Partial<SchedulerNode> = {}): SchedulerNode {
  return {
    id,
    labels: {},
    approval: "APPROVED",
    health: "HEALTHY",
    capacity: { cpu: 4, memory: 8 * GiB },
    allocated: { cpu: 0, memory: 0 },
    engines: ["wasm", "exec"],
    ...over,
  };
}

function job(s: JobSpec, state: JobState = "Pending", createdAt = 0): SchedulerJob {
  return { id: "job-1", spec: s, state, createdAt };
}

const ex = (id: string, nodeId: string, state: ExecutionState): SchedulerExecution => ({ id, nodeId, state });

t.test("a batch job goes to the least loaded matching node, ties broken by id", async (t) => {
  const nodes = [
    node("c"),
    node("b", { allocated: { cpu: 2, memory: 0 } }),
    node("a"),
    node("pending", { approval: "PENDING" }),
    node("sick", { health: "UNHEALTHY" }),
    node("full-disk", { lowDisk: "/var/lib/shoal has 12.0 MiB free" }),
    node("no-wasm", { engines: ["exec"] }),
    node("us", { labels: { region: "us" } }),
  ];
  const plan = schedule({ job: job(spec({ Count: 2 })), executions: [], nodes, now: 0 });
  t.equal(plan.decision, "place");
  t.equal(plan.jobState, "Running");
  t.same(
    plan.place.map((p) => p.nodeId),
    ["a", "c"],
  );
  t.same(plan.place[0]!.resources, { cpu: 1, memory: GiB });
  t.same(
    plan.verdicts.filter((v) => !v.ok).map((v) => [v.nodeId, v.check]),
    [
      ["full-disk", "disk"],
      ["no-wasm", "engine"],
      ["pending", "approval"],
      ["sick", "health"],
    ],
  );
  const constrained = schedule({
    job: job(spec({ Constraints: [{ Key: "region", Operator: "=", Values: ["us"] }] })),
    executions: [],
    nodes,
    now: 0,
  });
  t.same(
    constrained.place.map((p) => p.nodeId),
    ["us"],
  );
  t.match(constrained.verdicts.find((v) => v.nodeId === "a")!.reason, /region = us not met/);
  t.equal(
    plan.verdicts.find((v) => v.nodeId === "full-disk")!.reason,
    "short of disk: /var/lib/shoal has 12.0 MiB free",
  );
});

t.test("a node that declined is not asked again; one that did not answer is, once seen since", async (t) => {
  const plan = (lastSeen: number, execution: SchedulerExecution) =>
    schedule({ job: job(spec()), executions: [execution], nodes: [node("a", { lastSeen })], now: 0 });
  const unanswered = { ...ex("e1", "a", "BidRejected"), askAgainAfter: 100 };
  t.equal(plan(100, unanswered).decision, "queue", "not seen since: not asked yet");
  t.match(plan(100, unanswered).reason, /a: declined the job/);
  t.same(
    plan(101, unanswered).place.map((p) => p.nodeId),
    ["a"],
    "seen since (a register, a heartbeat): asked again",
  );
  t.equal(plan(101, ex("e1", "a", "BidRejected")).decision, "queue", "a node that declined stays out");
});

t.test("nothing fits: queued with reasons, failed after QueueTimeout", async (t) => {
  const nodes = [
    node("small", { capacity: { cpu: 0.5, memory: GiB } }),
    node("full", { allocated: { cpu: 4, memory: 0 } }),
  ];
  const queued = schedule({ job: job(spec()), executions: [], nodes, now: 59_999 });
  t.equal(queued.decision, "queue");
  t.equal(queued.jobState, "Queued");
  t.match(queued.reason, /none of 2 node\(s\).*full: needs 1 CPU, 0 free.*small: needs 1 CPU, 0\.5 free/);
  const failed = schedule({ job: job(spec()), executions: [], nodes, now: 60_000 });
  t.equal(failed.decision, "fail");
  t.match(failed.reason, /within the QueueTimeout of 60 s/);
  const empty = schedule({ job: job(spec()), executions: [], nodes: [], now: 0 });
  t.match(empty.reason, /no compute nodes are registered/);
  const memory = schedule({
    job: job(spec({}, { CPU: "1", Memory: "16Gi" })),
    executions: [],
    nodes: [node("a")],
    now: 0,
  });
  t.match(memory.reason, /needs 16 GiB memory, 8 GiB free/);
});

t.test("batch counts what runs and what completed; extra executions are cancelled when done", async (t) => {
  const nodes = [node("a"), node("b"), node("c")];
  const s = spec({ Count: 2 });
  const running = schedule({ job: job(s, "Running"), executions: [ex("e1", "a", "Running")], nodes, now: 0 });
  t.same(
    running.place.map((p) => p.nodeId),
    ["b"],
    "one more, on a node without this job",
  );
  const waiting = schedule({
    job: job(s, "Running"),
    executions: [ex("e1", "a", "Running"), ex("e2", "b", "AskForBid")],
    nodes,
    now: 0,
  });
  t.equal(waiting.decision, "wait");
  const done = schedule({
    job: job(s, "Running"),
    executions: [ex("e1", "a", "Completed"), ex("e2", "b", "Completed"), ex("e3", "c", "Running")],
    nodes,
    now: 0,
  });
  t.equal(done.decision, "complete");
  t.same(done.cancel, ["e3"]);
  const declined = schedule({
    job: job(s, "Running"),
    executions: [ex("e1", "a", "BidRejected"), ex("e2", "b", "Running")],
    nodes,
    now: 0,
  });
  t.same(
    declined.place.map((p) => p.nodeId),
    ["c"],
    "a node that declined is not asked again",
  );
  const failed = schedule({
    job: job(s, "Running"),
    executions: [ex("e1", "a", "Failed"), ex("e2", "b", "Running")],
    nodes,
    now: 0,
  });
  t.equal(failed.decision, "fail");
  t.same(failed.cancel, ["e2"]);
  t.match(failed.reason, /execution e1 failed on node a/);
  const stopped = schedule({ job: job(s, "Stopped"), executions: [ex("e1", "a", "Running")], nodes, now: 0 });
  t.equal(stopped.decision, "none");
  t.same(stopped.cancel, ["e1"]);
});

t.test("a lost node's executions are marked Lost and replaced while the retry budget lasts", async (t) => {
  const s = spec({ Count: 1 });
  const nodes = [node("a", { health: "LOST" }), node("b")];
  const plan = schedule({
    job: job(s, "Running"),
    executions: [ex("e1", "a", "Running")],
    nodes,
    now: 0,
    retryBudget: 1,
  });
  t.same(plan.lost, ["e1"]);
  t.equal(plan.decision, "place");
  t.same(
    plan.place.map((p) => p.nodeId),
    ["b"],
  );
  const deleted = schedule({
    job: job(s, "Running"),
    executions: [ex("e1", "gone", "Running")],
    nodes: [node("b")],
    now: 0,
  });
  t.same(deleted.lost, ["e1"], "a node that no longer exists is lost too");
  const spent = schedule({
    job: job(s, "Running"),
    executions: [ex("e1", "x", "Lost"), ex("e2", "a", "Running")],
    nodes,
    now: 0,
    retryBudget: 1,
  });
  t.equal(spent.decision, "fail");
  t.same(spent.lost, ["e2"]);
  t.match(spent.reason, /2 execution\(s\) lost with their nodes; the retry budget is 1/);
});

t.test("two executions share a node only when no other node is free", async (t) => {
  const plan = schedule({
    job: job(spec({ Count: 3 })),
    executions: [],
    nodes: [node("a"), node("b")],
    now: 0,
  });
  t.same(plan.place.map((p) => p.nodeId).sort(), ["a", "a", "b"]);
  const partial = schedule({
    job: job(spec({ Count: 3 }, { CPU: "3", Memory: "1Gi" })),
    executions: [],
    nodes: [node("a"), node("b")],
    now: 0,
  });
  t.equal(partial.place.length, 2, "capacity limits it to one per node");
  t.equal(partial.jobState, "Running");
  t.match(partial.reason, /1 more execution\(s\) wait/);
});

t.test("ops jobs run once on every matching node, then complete or fail", async (t) => {
  const s = spec({ Type: "ops", Constraints: [{ Key: "env", Operator: "=", Values: ["edge"] }] });
  const edge = { labels: { env: "edge" } };
  const nodes = [node("a", edge), node("b", edge), node("c"), node("d", { ...edge, approval: "PENDING" })];
  const plan = schedule({ job: job(s), executions: [], nodes, now: 0 });
  t.same(
    plan.place.map((p) => p.nodeId),
    ["a", "b"],
  );
  const running = schedule({
    job: job(s, "Running"),
    executions: [ex("e1", "a", "Completed"), ex("e2", "b", "Running")],
    nodes: [...nodes, node("late", edge)],
    now: 0,
  });
  t.equal(running.decision, "wait", "a node joining later is not added");
  const done = schedule({
    job: job(s, "Running"),
    executions: [ex("e1", "a", "Completed"), ex("e2", "b", "Completed")],
    nodes,
    now: 0,
  });
  t.equal(done.decision, "complete");
  const lost = schedule({
    job: job(s, "Running"),
    executions: [ex("e1", "a", "Completed"), ex("e2", "b", "Running")],
    nodes: nodes.filter((n) => n.id !== "b"),
    now: 0,
  });
  t.equal(lost.decision, "fail");
  t.match(lost.reason, /lost with node\(s\) b/);
  const declined = schedule({
    job: job(s, "Running"),
    executions: [ex("e1", "a", "BidRejected")],
    nodes,
    now: 0,
  });
  t.match(declined.reason, /declined/);
  const none = schedule({
    job: job(spec({ Type: "ops" }, undefined, "exec")),
    executions: [],
    nodes: [node("x", { engines: ["wasm"] })],
    now: 0,
  });
  t.equal(none.decision, "queue");
  t.match(none.reason, /x: no exec engine/);
});

t.test("jobs are taken by priority, then age; placements fold into allocation", async (t) => {
  const low = { ...job(spec({ Priority: 1 }), "Pending", 1), id: "low" };
  const high = { ...job(spec({ Priority: 5 }), "Pending", 2), id: "high" };
  const old = { ...job(spec({ Priority: 5 }), "Pending", 1), id: "old" };
  t.same(
    [low, high, old].sort(compareJobsForScheduling).map((j) => j.id),
    ["old", "high", "low"],
  );
  const nodes = [node("a", { capacity: { cpu: 1, memory: 8 * GiB } })];
  const first = schedule({ job: old, executions: [], nodes, now: 0 });
  const after = applyPlacements(nodes, first.place);
  t.same(after[0]!.allocated, { cpu: 1, memory: GiB });
  t.equal(schedule({ job: high, executions: [], nodes: after, now: 0 }).decision, "queue");
});

// Property tests: random clusters, random jobs.
const arbNode = fc.record({
  id: fc.string({ minLength: 1, maxLength: 4 }),
  approval: fc.constantFrom("APPROVED", "APPROVED", "APPROVED", "PENDING", "REJECTED") as fc.Arbitrary<
    SchedulerNode["approval"]
  >,
  health: fc.constantFrom("HEALTHY", "HEALTHY", "HEALTHY", "UNHEALTHY", "LOST") as fc.Arbitrary<
    SchedulerNode["health"]
  >,
  cpuCap: fc.integer({ min: 0, max: 16_000 }),
  cpuUsed: fc.integer({ min: 0, max: 16_000 }),
  memCap: fc.integer({ min: 0, max: 64 }),
  memUsed: fc.integer({ min: 0, max: 64 }),
  zone: fc.constantFrom("a", "b"),
  exec: fc.boolean(),
});
const arbNodes = fc.uniqueArray(arbNode, { selector: (n) => n.id, maxLength: 12 }).map((list) =>
  list.map(
    (n): SchedulerNode => ({
      id: n.id,
      labels: { zone: n.zone },
      approval: n.approval,
      health: n.health,
      capacity: { cpu: n.cpuCap / 1000, memory: n.memCap * GiB },
      allocated: { cpu: Math.min(n.cpuUsed, n.cpuCap) / 1000, memory: Math.min(n.memUsed, n.memCap) * GiB },
      engines: n.exec ? ["wasm", "exec"] : ["wasm"],
    }),
  ),
);
const arbSpec = fc
  .record({
    ops: fc.boolean(),
    count: fc.integer({ min: 1, max: 20 }),
    milli: fc.integer({ min: 1, max: 8000 }),
    gib: fc.integer({ min: 1, max: 16 }),
    zone: fc.option(fc.constantFrom("a", "b"), { nil: undefined }),
  })
  .map((r) =>
    spec(
      {
        ...(r.ops ? { Type: "ops" } : { Count: r.count }),
        ...(r.zone ? { Constraints: [{ Key: "zone", Operator: "=", Values: [r.zone] }] } : {}),
      },
      { CPU: `${r.milli}m`, Memory: `${r.gib}Gi` },
    ),
  );

t.test("property: a node is never allocated past its capacity", async (t) => {
  fc.assert(
    fc.property(arbNodes, arbSpec, (nodes, s) => {
      const plan = schedule({ job: job(s), executions: [], nodes, now: 0 });
      for (const n of applyPlacements(nodes, plan.place)) {
        const before = nodes.find((x) => x.id === n.id)!;
        if (n === before) continue;
        if (n.allocated.cpu > n.capacity.cpu + 1e-9 || n.allocated.memory > n.capacity.memory) return false;
      }
      return plan.place.every((p) => plan.verdicts.find((v) => v.nodeId === p.nodeId)?.ok);
    }),
  );
  t.pass("no over-allocation in random clusters");
});

t.test("property: batch executions spread over distinct nodes when enough nodes fit", async (t) => {
  fc.assert(
    fc.property(arbNodes, arbSpec, (nodes, s) => {
      fc.pre(s.Type === "batch");
      const plan = schedule({ job: job(s), executions: [], nodes, now: 0 });
      const fitting = plan.verdicts.filter((v) => v.ok).length;
      const used = new Set(plan.place.map((p) => p.nodeId));
      if (plan.place.length > (s.Count ?? 1)) return false;
      if (fitting >= (s.Count ?? 1)) return used.size === plan.place.length && plan.place.length === s.Count;
      return used.size === fitting; // every fitting node gets one before any gets two
    }),
  );
  t.pass("spread holds");
});

t.test("property: ops places exactly one execution on each matching node", async (t) => {
  fc.assert(
    fc.property(arbNodes, arbSpec, (nodes, s) => {
      fc.pre(s.Type === "ops");
      const plan = schedule({ job: job(s), executions: [], nodes, now: 0 });
      const placed = plan.place.map((p) => p.nodeId).sort();
      const matching = plan.verdicts
        .filter((v) => v.ok)
        .map((v) => v.nodeId)
        .sort();
      return JSON.stringify(placed) === JSON.stringify(matching);
    }),
  );
  t.pass("one per matching node");
});

t.test("property: the plan does not depend on the order of nodes or executions", async (t) => {
  fc.assert(
    fc.property(arbNodes, arbSpec, fc.nat(), (nodes, s, seed) => {
      const shuffled = [...nodes].sort(
        (a, b) => ((a.id.charCodeAt(0) * 31 + seed) % 7) - ((b.id.charCodeAt(0) * 31 + seed) % 7),
      );
      const executions = nodes.slice(0, 2).map((n, i) => ex(`e${i}`, n.id, "Running"));
      const a = schedule({ job: job(s, "Running"), executions, nodes, now: 0 });
      const b = schedule({
        job: job(s, "Running"),
        executions: [...executions].reverse(),
        nodes: shuffled,
        now: 0,
      });
      return JSON.stringify(a) === JSON.stringify(b);
    }),
  );
  t.pass("deterministic");
});
