import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import { jetstream } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { pino } from "pino";
import t, { type Test } from "tap";
import { silentLogger } from "../core/index.js";
import type { MessageBody } from "../fabric/index.js";
import { Dispatcher, type DispatcherOptions, type NodeChannel } from "../orchestrator/dispatcher.js";
import { jobRequirements } from "../orchestrator/job-requirements.js";
import { LogStore } from "../orchestrator/log-store.js";
import { placeJob } from "../orchestrator/placement.js";
import { ResultsStore } from "../orchestrator/results-store.js";
import { StateStore } from "../orchestrator/state-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";
import { testNodeService } from "./helpers/node-service.js";
import { eventually, jobRecord, resultMessages, storedLines } from "./helpers/records.js";

/**
 * A node that sends result chunks for an execution and never its manifest
 * cannot leave them on the orchestrator's disk: when the execution ends
 * without a result (here: its job is stopped), the real dispatcher deletes
 * what was staged for it, in order with the execution's result messages.
 * The node side is a channel that accepts every bid (the dispatcher's
 * boundary to the fabric), the rest is the orchestrator's own code on a real
 * JetStream.
 */

const MINUTE = 60_000;

type Bid = (node: string, body: MessageBody<"bid">) => Promise<MessageBody<"bid-reply">>;

async function dispatcherWithNode(
  t: Test,
  bid: Bid = async () => ({ accept: true, started: true }),
  extra: Partial<DispatcherOptions> = {},
  cpu?: number,
) {
  const dir = await tempDir(t, "shoal-dispatch-");
  const nc = await connect({ servers: await startJetStream(t, path.join(dir, "js")) });
  t.teardown(() => nc.close());
  const store = await StateStore.open(jetstream(nc), silentLogger);
  t.teardown(() => store.close());
  const nodes = testNodeService(t, store);
  const logs = new LogStore(dir);
  const results = new ResultsStore(dir);
  await Promise.all([logs.init(), results.init()]);
  const cancelled: string[] = [];
  const channel: NodeChannel = {
    bid,
    run: async () => ({ accepted: true }),
    cancel: async (_node, body) => {
      cancelled.push(body.executionId);
    },
  };
  const dispatcher = new Dispatcher({
    store,
    nodes,
    logs,
    results,
    channel,
    log: silentLogger,
    requirements: (job) => jobRequirements(job, { executionTimeoutMs: MINUTE, queueTimeoutMs: MINUTE }),
    place: placeJob,
    queueTimeoutMs: MINUTE,
    executionTimeoutMs: MINUTE,
    retryBudget: 0,
    ...extra,
  });
  t.teardown(() => dispatcher.close());
  await join(nodes, "n1", cpu);
  return { dir, store, nodes, logs, dispatcher, cancelled };
}

/** Registers and approves a node with room for a few small jobs (20 of the default 100m CPU). */
async function join(nodes: ReturnType<typeof testNodeService>, id: string, cpu = 2): Promise<void> {
  nodes.register(
    id,
    {
      nodeId: id,
      chainPem: "",
      labels: {},
      capacity: { cpu, memory: 1 << 30 },
      engines: ["wasm"],
      version: "test",
      executions: [],
    },
    "",
  );
  await nodes.approve(id);
}

const exists = (p: string) =>
  fs.stat(p).then(
    () => true,
    () => false,
  );

t.test("chunks staged for an execution stopped before its result are deleted", async (t) => {
  const { dir, store, dispatcher, cancelled } = await dispatcherWithNode(t);
  store.putJob(jobRecord("j-1", Date.now()));
  dispatcher.enqueue("j-1");
  await eventually("the execution runs on n1", () =>
    store.executionsOf("j-1").some((e) => e.State === "Running" && e.NodeID === "n1"),
  );
  const execution = store.executionsOf("j-1")[0]!;
  const { chunks } = resultMessages(execution.ID, ["12345", "67890"]);
  for (const chunk of chunks) await dispatcher.handleResultChunk("n1", chunk);
  const staging = path.join(dir, "results", ".staging", execution.ID);
  t.equal((await fs.readdir(staging)).length, 2, "the node's chunks are staged");

  await dispatcher.stop("j-1", "stopped by the test");
  t.same(cancelled, [execution.ID], "the node is told to cancel");
  for (let i = 0; i < 100 && (await exists(staging)); i++) await new Promise((r) => setTimeout(r, 20));
  t.notOk(await exists(staging), "what it staged is deleted");
  await dispatcher.handleResultChunk("n1", chunks[0]!);
  t.notOk(await exists(staging), "and a chunk sent after that is not staged");
});

/**
 * A job whose bid was in flight (stored `BidAccepted`, not yet `Running`) when
 * its orchestrator stopped, taken up by `dispatcher.start()` as after a restart
 * or a takeover, with the node answering the bid asked again as `reply` says.
 */
async function adoptInterruptedBid(
  t: Test,
  reply: (asked: number) => Promise<MessageBody<"bid-reply">>,
  askAgainAfterMs?: number,
) {
  const asked: string[] = [];
  const { store, nodes, dispatcher, cancelled } = await dispatcherWithNode(
    t,
    async (_node, body) => {
      asked.push(body.executionId);
      return body.executionId === "e-inflight" ? reply(asked.length) : { accept: true, started: true };
    },
    askAgainAfterMs === undefined ? {} : { askAgainAfterMs },
  );
  await join(nodes, "n2"); // where a declined bid can go
  const now = Date.now();
  store.putJob(jobRecord("j-2", now, { State: "Running", StateMessage: "placed" }));
  store.putExecution({
    ID: "e-inflight",
    JobID: "j-2",
    NodeID: "n1",
    State: "BidAccepted",
    StateMessage: "bid accepted",
    Resources: { cpu: 0.1, memory: 64 << 20 },
    CreateTime: now,
    ModifyTime: now,
  });
  dispatcher.start();
  return { store, dispatcher, asked, cancelled };
}

t.test(
  "a bid in flight when its orchestrator stopped is asked again, and a node that holds it goes on",
  async (t) => {
    const { store, asked, cancelled } = await adoptInterruptedBid(t, async () => ({
      accept: true,
      started: true,
    }));
    await eventually("the execution runs", () => store.executions.get("e-inflight")?.State === "Running");
    t.same(asked, ["e-inflight"], "the node is asked for the same execution, once");
    t.same(cancelled, [], "nothing is cancelled on the node");
    t.equal(store.executionsOf("j-2").length, 1, "and nothing runs twice");
    t.equal(store.jobs.get("j-2")?.State, "Running");
  },
);

t.test("a bid in flight that the node now declines is placed again, not failed", async (t) => {
  const { store, asked } = await adoptInterruptedBid(t, async () => ({ accept: false, reason: "not now" }));
  await eventually("a new execution runs on n2", () =>
    store.executionsOf("j-2").some((e) => e.NodeID === "n2" && e.State === "Running"),
  );
  t.equal(store.executions.get("e-inflight")?.State, "BidRejected", "the declined bid ends");
  t.equal(asked[0], "e-inflight", "after the node was asked again");
  t.equal(store.jobs.get("j-2")?.State, "Running", "the job runs again, not Queued behind a failure");
});

t.test("a bid in flight to a node that does not answer yet is asked again when it registers", async (t) => {
  const { store, dispatcher, asked } = await adoptInterruptedBid(t, async (n) => {
    if (n === 1) throw new Error("no responders"); // its connection to the restarted server is not back yet
    return { accept: true, started: true };
  });
  await eventually("the node was asked", () => asked.length === 1);
  await new Promise((r) => setTimeout(r, 100));
  t.equal(store.executions.get("e-inflight")?.State, "AskForBid", "the execution waits for its node");
  t.equal(store.executionsOf("j-2").length, 1, "nothing is placed elsewhere meanwhile");

  dispatcher.reconcile("n1", [{ executionId: "e-inflight", state: "Running" }]);
  await eventually("the execution runs", () => store.executions.get("e-inflight")?.State === "Running");
  t.same(asked, ["e-inflight", "e-inflight"], "asked once more when the node registered");
  t.equal(store.executionsOf("j-2").length, 1, "and nothing runs twice");
});

t.test("a bid in flight to a node that never answers is placed again after its registration", async (t) => {
  const { store, dispatcher } = await adoptInterruptedBid(t, async () => {
    throw new Error("no responders");
  });
  await new Promise((r) => setTimeout(r, 100));
  dispatcher.reconcile("n2", []); // another node's registration changes nothing
  await new Promise((r) => setTimeout(r, 100));
  t.equal(store.executions.get("e-inflight")?.State, "AskForBid");
  dispatcher.reconcile("n1", []);
  await eventually("a new execution runs on n2", () =>
    store.executionsOf("j-2").some((e) => e.NodeID === "n2" && e.State === "Running"),
  );
  t.equal(store.executions.get("e-inflight")?.State, "BidRejected");
  t.match(store.executions.get("e-inflight")?.StateMessage, /bid request failed: no responders/);
  t.equal(store.jobs.get("j-2")?.State, "Running");
});

t.test(
  "a bid in flight to a node that stays connected and does not answer is asked a last time, then placed again",
  async (t) => {
    const { store, asked } = await adoptInterruptedBid(
      t,
      async () => {
        throw new Error("timeout");
      },
      300,
    );
    await eventually("the node was asked", () => asked.length === 1);
    t.equal(
      store.executions.get("e-inflight")?.State,
      "AskForBid",
      "the execution waits for its node a while",
    );
    await eventually("a new execution runs on n2", () =>
      store.executionsOf("j-2").some((e) => e.NodeID === "n2" && e.State === "Running"),
    );
    t.equal(asked.filter((id) => id === "e-inflight").length, 2, "asked a last time without a registration");
    t.equal(store.executions.get("e-inflight")?.State, "BidRejected");
    t.match(store.executions.get("e-inflight")?.StateMessage, /bid request failed: timeout/);
    t.equal(store.jobs.get("j-2")?.State, "Running");
  },
);

t.test("what a node sends about executions it does not hold is one warning per 10 s", async (t) => {
  const lines: { msg: string; node?: string; execution?: string; heldBack?: number }[] = [];
  const log = pino({ level: "warn" }, { write: (line: string) => lines.push(JSON.parse(line)) });
  const { dispatcher } = await dispatcherWithNode(t, undefined, { log });
  const logs = (executionId: string) => ({ executionId, stream: "stdout" as const, seq: 0, data: "" });
  for (let i = 0; i < 5; i++) dispatcher.handleLogs("n1", logs(`e-nope-${i}`));
  dispatcher.handleLogs("n2", logs("e-nope"));
  t.same(
    lines.map((l) => [l.msg, l.node, l.execution]),
    [
      ["message about an execution the node does not hold; ignored", "n1", "e-nope-0"],
      ["message about an execution the node does not hold; ignored", "n2", "e-nope"],
    ],
    "the first of each node's, the next four of n1's held back",
  );
});

t.test(
  "no job goes to a node while its heartbeats say its disk is short of room; it does once they stop",
  async (t) => {
    const asked: string[] = [];
    const { store, nodes, dispatcher } = await dispatcherWithNode(t, async (node) => {
      asked.push(node);
      return { accept: true, started: true };
    });
    // As the daemon does: a node's record changing makes the dispatcher look at its queue again.
    const unwatch = store.watchAll((change) => {
      if (change.type === "node") dispatcher.nodeChanged();
    });
    t.teardown(unwatch);
    const lowDisk = "/var/lib/shoal has 12.0 MiB free, less than Compute.Storage.MinFree (256.0 MiB)";
    nodes.heartbeat("n1", { lowDisk });
    t.equal(store.nodes.get("n1")?.LowDisk, lowDisk, "recorded");
    store.putJob(jobRecord("j-1", Date.now()));
    dispatcher.enqueue("j-1");
    await eventually("the job is queued", () => store.jobs.get("j-1")?.State === "Queued");
    t.match(store.jobs.get("j-1")?.StateMessage, `n1: short of disk: ${lowDisk}`);
    t.same(asked, [], "the node is not asked");

    // The node says so in every heartbeat; the record changes at most once per interval (1 s here).
    await eventually("a heartbeat clears it", () => {
      nodes.heartbeat("n1", {});
      return store.nodes.get("n1")?.LowDisk === undefined;
    });
    await eventually("the job runs on n1", () =>
      store.executionsOf("j-1").some((e) => e.State === "Running" && e.NodeID === "n1"),
    );
    t.same(asked, ["n1"]);
  },
);

t.test(
  "a job whose bid its only node left unanswered runs there once the node is heard from again",
  async (t) => {
    for (const how of ["register", "heartbeat"] as const) {
      let calls = 0;
      const { store, nodes, dispatcher } = await dispatcherWithNode(t, async () => {
        if (calls++ === 0) throw new Error("nobody listens on shoal.compute.n1.in");
        return { accept: true, started: true };
      });
      const unwatch = store.watchAll((change) => {
        if (change.type === "node") dispatcher.nodeChanged();
      });
      t.teardown(unwatch);
      store.putJob(jobRecord("j-1", Date.now()));
      dispatcher.enqueue("j-1");
      await eventually("the job is queued", () => store.jobs.get("j-1")?.State === "Queued");
      const [first] = store.executionsOf("j-1");
      t.match(first, {
        State: "BidRejected",
        Unanswered: true,
        StateMessage: /^bid request failed: nobody listens/,
      });
      await new Promise((r) => setTimeout(r, 5)); // heard from after the failure
      if (how === "register") await join(nodes, "n1");
      else {
        // As the fabric link does with each heartbeat.
        nodes.heartbeat("n1", {});
        dispatcher.nodeSeen("n1");
      }
      await eventually(`the job runs on n1 (${how})`, () =>
        store.executionsOf("j-1").some((e) => e.State === "Running" && e.NodeID === "n1"),
      );
      t.equal(calls, 2, `asked again after its ${how}`);
    }
  },
);

t.test(
  "a node that declined short of disk is asked again once heard from; one that declined outright is not",
  async (t) => {
    for (const lowDisk of ["n1 has 1.0 MiB free", undefined]) {
      let calls = 0;
      const { store, nodes, dispatcher } = await dispatcherWithNode(t, async () =>
        calls++ === 0
          ? { accept: false, reason: "no room on the node", ...(lowDisk === undefined ? {} : { lowDisk }) }
          : { accept: true, started: true },
      );
      store.putJob(jobRecord("j-1", Date.now()));
      dispatcher.enqueue("j-1");
      await eventually("the job is queued", () => store.jobs.get("j-1")?.State === "Queued");
      t.match(store.executionsOf("j-1")[0], {
        State: "BidRejected",
        StateMessage: "bid rejected: no room on the node",
        ...(lowDisk === undefined ? {} : { ShortOfDisk: true }),
      });
      await new Promise((r) => setTimeout(r, 5)); // heard from after the decline
      nodes.heartbeat("n1", {});
      dispatcher.nodeSeen("n1");
      if (lowDisk === undefined) {
        await new Promise((r) => setTimeout(r, 200));
        t.equal(calls, 1, "declined outright: not asked again");
        t.equal(store.jobs.get("j-1")?.State, "Queued");
      } else {
        await eventually("the job runs on n1", () =>
          store.executionsOf("j-1").some((e) => e.State === "Running" && e.NodeID === "n1"),
        );
        t.equal(calls, 2, "short of disk: asked again after its heartbeat");
      }
    }
  },
);

t.test(
  "a node flipping its disk condition in every message changes its record once per heartbeat interval",
  async (t) => {
    const { store, nodes } = await dispatcherWithNode(t);
    let writes = 0;
    const unwatch = store.watchAll((change) => {
      if (change.type === "node") writes++;
    });
    t.teardown(unwatch);
    nodes.heartbeat("n1", { lowDisk: "a" });
    for (let i = 0; i < 100; i++) nodes.heartbeat("n1", i % 2 ? { lowDisk: "b" } : {});
    t.equal(store.nodes.get("n1")?.LowDisk, "a", "the later flips are held back");
    t.equal(writes, 1, "one write");
    await new Promise((r) => setTimeout(r, 1_050));
    nodes.heartbeat("n1", {});
    t.equal(store.nodes.get("n1")?.LowDisk, undefined, "a heartbeat after the interval is taken");
  },
);

t.test("lines that cannot be stored (the logs directory is unusable) are one error per 10 s", async (t) => {
  const lines: { msg: string; execution?: string; err?: { code?: string } }[] = [];
  const log = pino({ level: "warn" }, { write: (line: string) => lines.push(JSON.parse(line)) });
  const { dir, store, dispatcher } = await dispatcherWithNode(t, undefined, { log });
  store.putJob(jobRecord("j-1", Date.now()));
  dispatcher.enqueue("j-1");
  await eventually("the execution runs on n1", () =>
    store.executionsOf("j-1").some((e) => e.State === "Running" && e.NodeID === "n1"),
  );
  const execution = store.executionsOf("j-1")[0]!;
  // Every append now fails: its directory is a file.
  await fs.rm(path.join(dir, "logs"), { recursive: true });
  await fs.writeFile(path.join(dir, "logs"), "");
  const data = Buffer.from("a line\n").toString("base64");
  for (let seq = 0; seq < 5; seq++)
    dispatcher.handleLogs("n1", { executionId: execution.ID, stream: "stdout", seq, data });
  await eventually("the first failure is logged", () => lines.some((l) => l.msg === "cannot store log line"));
  await new Promise((r) => setTimeout(r, 100));
  t.same(
    lines.filter((l) => l.msg === "cannot store log line").map((l) => [l.execution, l.err?.code]),
    [[execution.ID, "ENOTDIR"]],
  );
});

t.test("in a cluster, lines heard before their execution's record are stored once it arrives", async (t) => {
  const { store, logs, dispatcher } = await dispatcherWithNode(t, undefined, { isForeign: async () => true });
  const line = (executionId: string, seq: number, text: string) => ({
    executionId,
    stream: "stdout" as const,
    seq,
    data: Buffer.from(text).toString("base64"),
  });
  dispatcher.handleLogs("n1", line("e-later", 0, "first\n"));
  dispatcher.handleLogs("n2", line("e-later", 0, "not n2's to write\n"));
  dispatcher.handleLogs("n1", line("e-later", 1, "second\n"));
  dispatcher.handleLogs("n1", line("e-never", 0, "an execution that never comes\n"));
  const now = Date.now();
  store.putJob(jobRecord("j-later", now, { State: "Running", StateMessage: "placed" }));
  const e = {
    ID: "e-later",
    JobID: "j-later",
    NodeID: "n1",
    State: "Running" as const,
    StateMessage: "running",
    Resources: { cpu: 0.1, memory: 64 << 20 },
    CreateTime: now,
    ModifyTime: now,
  };
  store.putExecution(e);
  t.same(await storedLines(logs, "j-later"), [], "nothing is stored before the record is followed");
  dispatcher.observe(e);
  await eventually(
    "the kept lines are stored",
    async () => (await storedLines(logs, "j-later")).length === 2,
  );
  t.same(
    (await storedLines(logs, "j-later")).map((l) => [l.Seq, l.Data]),
    [
      [0, "first\n"],
      [1, "second\n"],
    ],
    "the node's lines, in order; another node's line for it is not kept",
  );
  dispatcher.observe(e);
  await new Promise((r) => setTimeout(r, 50));
  t.equal((await storedLines(logs, "j-later")).length, 2, "kept lines are stored once");
});

t.test(
  "a result's last lines are stored before its execution ends, and once when it is sent again",
  async (t) => {
    const { store, logs, dispatcher } = await dispatcherWithNode(t);
    store.putJob(jobRecord("j-tail", Date.now()));
    dispatcher.enqueue("j-tail");
    await eventually("the execution runs on n1", () =>
      store.executionsOf("j-tail").some((e) => e.State === "Running" && e.NodeID === "n1"),
    );
    const execution = store.executionsOf("j-tail")[0]!;
    const b64 = (text: string) => Buffer.from(text).toString("base64");
    dispatcher.handleLogs("n1", {
      executionId: execution.ID,
      stream: "stdout",
      seq: 0,
      data: b64("streamed\n"),
    });
    // A follower ended by the execution's end (as JobService ends one at the job's) gets every line.
    const ended = new AbortController();
    const stopWatch = store.watchAll((change) => {
      if (change.type === "execution" && change.execution.State === "Completed") ended.abort();
    });
    t.teardown(stopWatch);
    const followed = (async () => {
      const seen: string[] = [];
      for await (const line of logs.follow("j-tail", ended.signal)) seen.push(line.Data);
      return seen;
    })();
    const result: MessageBody<"result"> = {
      ...resultMessages(execution.ID, []).manifest,
      files: [],
      logs: [
        { stream: "stdout", seq: 1, data: b64("last\n") },
        { stream: "stderr", seq: 2, data: b64("warning\n") },
      ],
    };
    t.same(await dispatcher.handleResult("n1", result), { stored: true });
    t.same(
      await followed,
      ["streamed\n", "last\n", "warning\n"],
      "the follower gets the last lines, then ends",
    );
    t.equal(store.executions.get(execution.ID)?.State, "Completed");
    t.same(await dispatcher.handleResult("n1", result), { stored: true }, "a resend is acknowledged");
    t.same(
      (await storedLines(logs, "j-tail")).map((l) => [l.Seq, l.Stream, l.Data]),
      [
        [0, "stdout", "streamed\n"],
        [1, "stdout", "last\n"],
        [2, "stderr", "warning\n"],
      ],
      "each line once, in order",
    );
  },
);

/** A dispatcher whose one node holds `slots` executions of the default 100m CPU, and jobs submitted by name. */
async function fairQueue(t: Test, slots: number) {
  const { store, dispatcher } = await dispatcherWithNode(t, undefined, {}, slots / 10 + 0.05);
  const now = Date.now();
  let submitted = 0;
  const runningOn = (id: string) => store.executionsOf(id).find((e) => e.State === "Running");
  return {
    state: (id: string) => store.jobs.get(id)?.State,
    runningOn,
    submit(id: string, sub: string) {
      store.putJob(
        jobRecord(id, now + submitted++, { Submitter: { sub, namespace: "default", method: "password" } }),
      );
      dispatcher.enqueue(id);
    },
    async complete(id: string) {
      const e = runningOn(id)!;
      t.same(await dispatcher.handleResult(e.NodeID, resultMessages(e.ID, []).manifest), { stored: true });
    },
  };
}

t.test(
  "capacity that comes free goes to the submitter served least, not to the longest backlog",
  async (t) => {
    const { submit, complete, runningOn, state } = await fairQueue(t, 1);
    submit("j-a1", "alice");
    await eventually("alice's first job runs", () => runningOn("j-a1") !== undefined);
    submit("j-a2", "alice");
    submit("j-a3", "alice");
    submit("j-b1", "bob");
    t.same(["j-a2", "j-a3", "j-b1"].map(state), ["Queued", "Queued", "Queued"], "the node is full");

    await complete("j-a1");
    await eventually("a queued job runs", () => ["j-a2", "j-b1"].some((id) => runningOn(id)));
    t.ok(runningOn("j-b1"), "bob's job goes before alice's backlog");
    t.equal(state("j-a2"), "Queued");
    await complete("j-b1");
    await eventually("alice's next job runs", () => runningOn("j-a2") !== undefined);
    t.equal(state("j-a3"), "Queued", "alice's jobs keep their order");
  },
);

t.test("a submitter with fewer executions running goes first, even if served more recently", async (t) => {
  const { submit, complete, runningOn, state } = await fairQueue(t, 3);
  for (const [id, sub] of [
    ["j-b1", "bob"],
    ["j-b2", "bob"],
    ["j-a1", "alice"],
  ] as const) {
    submit(id, sub);
    await eventually(`${id} runs`, () => runningOn(id) !== undefined);
  }
  submit("j-b3", "bob");
  submit("j-a2", "alice");
  t.same(["j-b3", "j-a2"].map(state), ["Queued", "Queued"], "the node is full");
  // Alice was served last, but now runs nothing while bob runs two.
  await complete("j-a1");
  await eventually("a queued job runs", () => ["j-b3", "j-a2"].some((id) => runningOn(id)));
  t.ok(runningOn("j-a2"), "alice's job goes first");
  t.equal(state("j-b3"), "Queued");
});

t.test(
  "a pass over a backlog of like jobs looks for room once, and still places a job of another kind",
  async (t) => {
    const placed: string[] = [];
    const { store, dispatcher } = await dispatcherWithNode(
      t,
      undefined,
      {
        place: (input) => {
          placed.push(input.job.ID);
          return placeJob(input);
        },
      },
      0.16,
    );
    const now = Date.now();
    const submit = (id: string, cpu: string) => {
      const record = jobRecord(id, now + placed.length);
      const spec = record.Spec as { Tasks: { Resources: object }[] };
      const Spec = {
        ...spec,
        Tasks: spec.Tasks.map((task) => ({ ...task, Resources: { CPU: cpu, Memory: "64Mi" } })),
      };
      store.putJob({ ...record, Spec });
      dispatcher.enqueue(id);
    };
    const state = (id: string) => store.jobs.get(id)?.State;
    submit("j-run", "100m");
    submit("j-fill", "50m");
    await eventually("both run", () => state("j-run") === "Running" && state("j-fill") === "Running");
    const like = Array.from({ length: 20 }, (_, i) => `j-like-${i}`);
    for (const id of like) submit(id, "100m");
    submit("j-small", "50m");
    t.ok(
      [...like, "j-small"].every((id) => state(id) === "Queued"),
      "the node is full",
    );

    placed.length = 0;
    const fill = store.executionsOf("j-fill")[0]!;
    await dispatcher.handleResult("n1", resultMessages(fill.ID, []).manifest);
    await eventually("the small job runs in the room that came free", () => state("j-small") === "Running");
    t.ok(
      like.every((id) => state(id) === "Queued"),
      "no like job fits",
    );
    t.same(placed, ["j-like-0", "j-small"], "the first like job was looked at, the others not");
  },
);
