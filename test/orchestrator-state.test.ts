import "reflect-metadata";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { connect } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { silentLogger } from "../core/index.js";
import { JobService, type JobServiceOptions } from "../orchestrator/job-service.js";
import type { ExecutionRecord, JobEvent, JobRecord } from "../orchestrator/records.js";
import { BUCKETS, HISTORY_KEPT_MS, StateStore } from "../orchestrator/state-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";
import { withFailingPublish, withSlowPublish } from "./helpers/failing-js.js";
import { testNodeService } from "./helpers/node-service.js";
import { eventually, executionRecord, jobRecord } from "./helpers/records.js";

const job = (id: string, createTime: number) => jobRecord(id, createTime);

t.test("state survives a reconnect: memory first, KV behind, coalesced writes", async (t) => {
  const dir = await tempDir(t, "shoal-state-");
  const url = await startJetStream(t, dir);

  const nc = await connect({ servers: url });
  const store = await StateStore.open(jetstream(nc), silentLogger);
  const seen: string[] = [];
  const unwatch = store.watchJob("j-1", (c) => seen.push(c.type));
  let j = job("j-1", 1);
  store.putJob(j);
  j = store.setJobState(j, "Queued", "waiting for a node");
  j = store.setJobState(j, "Running", "placed");
  store.putExecution({
    ID: "e-1",
    JobID: "j-1",
    NodeID: "n1",
    State: "Running",
    StateMessage: "running",
    Resources: { cpu: 0.1, memory: 1024 },
    CreateTime: 2,
    ModifyTime: 2,
  });
  store.putJob(job("j-2", 3));
  store.jobs.delete("j-2");
  await store.flush();
  unwatch();
  t.same(seen, ["job", "job", "event", "job", "event", "execution"], "watchers see every change in order");
  t.equal(j.QueuedSince !== undefined, true, "queueing is timestamped");
  await nc.close();

  // A fresh process reads the same state back.
  const nc2 = await connect({ servers: url });
  t.teardown(() => nc2.close());
  const again = await StateStore.open(jetstream(nc2), silentLogger);
  t.equal(again.jobs.get("j-1")?.State, "Running");
  t.notOk(again.jobs.has("j-2"), "a deleted key stays deleted");
  t.same(
    (await again.history("j-1")).map((e) => e.State),
    ["Queued", "Running"],
  );
  t.same(
    again.executionsOf("j-1").map((e) => e.ID),
    ["e-1"],
    "the job → executions index is rebuilt",
  );
});

t.test("flushes made while a batch is being stored join the next batch, not a batch each", async (t) => {
  const url = await startJetStream(t, await tempDir(t, "shoal-state-"));
  const nc = await connect({ servers: url });
  t.teardown(() => nc.close());
  const js = jetstream(nc);
  // Each write takes 50 ms, as under load: far longer than a turn of the event loop.
  const store = await StateStore.open(withSlowPublish(js, 50), silentLogger);
  t.teardown(() => store.close());
  const jsm = await js.jetstreamManager();
  const writes = async () => (await jsm.streams.info("KV_shoal-jobs")).state.last_seq;
  const before = await writes();
  const j = job("j-1", 1);
  store.putJob(j);
  const flushes = [store.flushJob("j-1")]; // the first batch is on its way
  for (let i = 0; i < 10; i++) {
    await new Promise((r) => setImmediate(r));
    store.putJob({ ...j, StateMessage: `change ${i}` });
    flushes.push(store.flushJob("j-1"));
  }
  await Promise.all(flushes);
  t.equal(store.jobs.get("j-1")?.StateMessage, "change 9");
  t.equal((await writes()) - before, 2, "the first value, then the last: not one batch per turn (11)");
});

/**
 * A store on a JetStream of its own whose writes each take 100 ms (a batch is
 * written long enough to put load on its table, see {@link underLoad}) and
 * whose held changes wait up to a minute; `writes` counts the writes the job
 * buckets have taken.
 */
async function slowStore(t: Test) {
  const url = await startJetStream(t, await tempDir(t, "shoal-state-"));
  const nc = await connect({ servers: url });
  t.teardown(() => nc.close());
  const js = jetstream(nc);
  const jsm = await js.jetstreamManager();
  const store = await StateStore.open(withSlowPublish(js, 100), silentLogger, { holdMs: 60_000 });
  t.teardown(() => store.close());
  const writes = async () => {
    let sum = 0;
    for (const bucket of [BUCKETS.jobs, BUCKETS.executions, BUCKETS.events]) {
      sum += (await jsm.streams.info(`KV_${bucket}`)).state.last_seq;
    }
    return sum;
  };
  return { url, js, store, writes };
}

/**
 * Puts load on the store's three job tables: two jobs, their executions and
 * their history pages being written (each write slowed by the store's
 * JetStream), six writes in batches of two. Resolves, once the batches are on
 * their way, to their flush.
 */
async function underLoad(store: StateStore, id: string): Promise<{ done: Promise<void> }> {
  const ids = [`${id}-a`, `${id}-b`];
  for (const jobId of ids) {
    store.putJob(job(jobId, 0));
    store.putExecution(running(`e-${jobId}`, jobId));
    store.appendEvent({ Time: 0, JobID: jobId, Type: "JobStateUpdate", State: "Pending", Message: "load" });
  }
  const done = Promise.all(ids.map((jobId) => store.flushJob(jobId))).then(() => {});
  await new Promise((r) => setImmediate(r));
  return { done };
}

t.test(
  "under load, a change waits for a flush that names its job, the hold's end or a flush of all",
  async (t) => {
    const { js, store, writes } = await slowStore(t);
    const before = await writes();
    const load = await underLoad(store, "load");
    let j1 = job("j-1", 1);
    store.putJob(j1);
    for (const state of ["Queued", "Running"] as const) {
      await new Promise((r) => setImmediate(r));
      j1 = store.setJobState(j1, state, state);
    }
    await load.done;
    await new Promise((r) => setTimeout(r, 150));
    t.equal(await writes(), before + 6, "only the load was written: the changes made meanwhile are held");
    t.equal(store.jobs.get("j-1")?.State, "Running", "memory has the changes at once");
    await store.flushJob("j-1");
    t.equal(await writes(), before + 8, "the job's flush wrote its record and its history page, once each");
    t.equal((await store.jobs.stored("j-1"))?.State, "Running", "the last value");
    const load2 = await underLoad(store, "load-2");
    store.putJob(job("j-2", 2));
    await load2.done;
    t.notOk(await store.jobs.stored("j-2"), "the other job's change still waits");
    await store.flush();
    t.equal((await store.jobs.stored("j-2"))?.ID, "j-2", "a flush of all wrote it");

    store.putJob(job("j-3", 3)); // no batch being written: no load
    await eventually(
      "the idle change is written",
      async () => (await store.jobs.stored("j-3")) !== undefined,
    );
    t.equal((await store.jobs.stored("j-3"))?.ID, "j-3", "without load, a change goes with the next batch");

    store.putJob(job("j-5", 5));
    const one = store.flushJob("j-5");
    await new Promise((r) => setImmediate(r)); // a batch of one row is being written
    store.putJob(job("j-6", 6));
    await one;
    await eventually(
      "the change made during a batch of one row is written",
      async () => (await store.jobs.stored("j-6")) !== undefined,
    );
    t.equal((await store.jobs.stored("j-6"))?.ID, "j-6", "a batch of one row (one job at a time) is no load");

    const short = await StateStore.open(withSlowPublish(js, 100), silentLogger, { holdMs: 50 });
    t.teardown(() => short.close());
    await underLoad(short, "load-2");
    short.putJob(job("j-4", 4));
    await eventually(
      "the held change is written",
      async () => (await short.jobs.stored("j-4")) !== undefined,
    );
    t.equal((await short.jobs.stored("j-4"))?.ID, "j-4", "written when the hold ended, with no flush");
  },
);

/** Stores `j` as a submission does: the record and its first history event, flushed. */
async function submitted(store: StateStore, j: JobRecord): Promise<void> {
  store.putJob(j);
  store.appendEvent({ Time: 1, JobID: j.ID, Type: "JobStateUpdate", State: "Pending", Message: "submitted" });
  await store.flushJob(j.ID);
}

t.test("under load, a job that ends within the hold costs five KV writes, not ten", async (t) => {
  const { url, store, writes } = await slowStore(t);
  const before = await writes();
  // As the dispatcher goes: submitted (flushed before 201), placed, bid accepted and running, ended (flushed).
  let j = job("j-1", 1);
  await submitted(store, j);
  t.equal(await writes(), before + 2, "submitted: the record and the history page");
  const placed = await underLoad(store, "load-1");
  j = store.setJobState(j, "Running", "placed");
  store.putExecution({ ...running("e-1", "j-1"), State: "AskForBid" });
  await placed.done;
  const bid = await underLoad(store, "load-2");
  let e = store.setExecutionState(store.executions.get("e-1")!, "BidAccepted", "bid accepted");
  e = store.setExecutionState(e, "Running", "running");
  await bid.done;
  store.setExecutionState(e, "Completed", "exit code 0");
  store.setJobState(j, "Completed", "done");
  await store.flushJob("j-1");
  t.equal(
    await writes(),
    before + 2 + 6 + 6 + 3,
    "the two loads, and at the end the job's record, execution and history page, once each",
  );
  const nc2 = await connect({ servers: url });
  t.teardown(() => nc2.close());
  const again = await StateStore.open(jetstream(nc2), silentLogger);
  t.same(
    (await again.history("j-1")).map((ev) => ev.State),
    ["Pending", "Running", "BidAccepted", "Running", "Completed", "Completed"],
    "every state is in the stored history",
  );
});

t.test("under load, a withdrawn job's deletes are not held: they go with the next batch", async (t) => {
  const { store } = await slowStore(t);
  await submitted(store, job("j-1", 1));
  await underLoad(store, "load");
  store.withdrawJob("j-1");
  await eventually(
    "the withdrawn job is deleted",
    async () => (await store.jobs.stored("j-1")) === undefined,
  );
  t.notOk(await store.jobs.stored("j-1"), "the record is deleted, within the minute the store holds changes");
  t.notOk(await store.events.stored("j-1.0"), "and its history page");
});

t.test("a purge sends the key's held write first, so the write does not bring the key back", async (t) => {
  const { store } = await slowStore(t);
  await underLoad(store, "load");
  store.putJob(job("j-1", 1));
  store.setJobState(store.jobs.get("j-1")!, "Running", "placed");
  await store.purgeJob("j-1", []);
  await store.flush();
  t.notOk(await store.jobs.stored("j-1"), "the record is gone");
  t.notOk(await store.events.stored("j-1.0"), "and its history page (a wildcard purge)");
});

function running(id: string, jobId: string): ExecutionRecord {
  return {
    ID: id,
    JobID: jobId,
    NodeID: "n1",
    State: "Running",
    StateMessage: "running",
    Resources: { cpu: 0.1, memory: 1 },
    CreateTime: 1,
    ModifyTime: 1,
  };
}

/** Opens stores of orchestrators named `owner` on one JetStream, each on its own connection. */
async function clusterStores(t: Test, prefix: string): Promise<(owner: string) => Promise<StateStore>> {
  const url = await startJetStream(t, await tempDir(t, prefix));
  return async (owner) => {
    const nc = await connect({ servers: url });
    const store = await StateStore.open(jetstream(nc), silentLogger, { owner });
    t.teardown(async () => {
      store.close();
      await nc.close();
    });
    return store;
  };
}

t.test(
  "in a cluster every orchestrator reads every job and follows the others' writes, but owns only its own",
  async (t) => {
    const open = await clusterStores(t, "shoal-state-owner-");
    const a = await open("orch-a");
    a.putJob({ ...job("j-a", 1), Orchestrator: "orch-a" });
    a.putJob(job("j-legacy", 3));
    a.putExecution(running("e-a", "j-a"));
    a.appendEvent({ Time: 1, JobID: "j-a", Type: "JobStateUpdate", State: "Pending", Message: "submitted" });
    await a.flush();

    const b = await open("orch-b");
    t.same([...b.jobs.values()].map((j) => j.ID).sort(), ["j-a", "j-legacy"], "every job is loaded");
    t.same(
      b.executionsOf("j-a").map((e) => e.ID),
      ["e-a"],
    );
    t.notOk(b.isMine("j-a"), "A's job is not B's to act on");
    t.ok(a.isMine("j-a"));
    t.ok(
      b.isMine("j-legacy") && a.isMine("j-legacy"),
      "a job stored without an owner is everyone's, as before",
    );

    // A's later writes reach B's memory and B's watchers; B's own writes are not echoed back over A's.
    const seen: string[] = [];
    b.watchJob("j-a", (c) => seen.push(c.type));
    a.setJobState(a.jobs.get("j-a")!, "Running", "placed");
    a.putExecution({ ...running("e-a2", "j-a"), State: "AskForBid" });
    await a.flush();
    await eventually(
      "B follows A's writes",
      () => b.executionsOf("j-a").length === 2 && seen.includes("event"),
    );
    t.equal(b.jobs.get("j-a")?.State, "Running");
    t.same(
      (await b.history("j-a")).map((e) => e.State),
      ["Pending", "Running"],
    );
    b.putJob({ ...job("j-b", 4), Orchestrator: "orch-b" });
    await b.flush();
    await eventually("A follows B's new job", () => a.jobs.has("j-b"));
    t.notOk(a.isMine("j-b"));
  },
);

t.test("a claim that a concurrent claim overwrote is let go once read back", async (t) => {
  const open = await clusterStores(t, "shoal-state-claim-");
  const a = await open("orch-a");
  a.putJob({ ...job("j-1", 1), Orchestrator: "orch-a" });
  await a.flush();
  a.close();
  const [b, c] = await Promise.all([open("orch-b"), open("orch-c")]);
  const canTake = (stored: JobRecord) => stored.Orchestrator === "orch-a";
  t.ok(await b.claimJob("j-1", canTake, "test"), "B's claim succeeds");
  // What nats-server 2.9 lets happen in a cluster (nats-io/nats-server#4320): C's claim of the
  // same revision also succeeds, and lands after B's.
  const stored = await c.jobs.storedEntry("j-1");
  t.ok(await c.jobs.compareAndSet("j-1", { ...stored!.value, Orchestrator: "orch-c" }, stored!.revision));
  t.same(await b.confirmClaims(["j-1"], 0), [], "read back, B's claim is let go");
  t.notOk(b.isMine("j-1"), "and B no longer acts on it");
  t.equal(b.jobs.get("j-1")?.Orchestrator, "orch-c");
  t.same(await c.confirmClaims(["j-1"], 0), ["j-1"], "C's write is the last: C keeps it");
});

t.test(
  "takeover: of two claimants exactly one wins (compare-and-set), and the old owner is fenced",
  async (t) => {
    const open = await clusterStores(t, "shoal-state-claim-");
    const a = await open("orch-a");
    let j: JobRecord = { ...job("j-1", 1), Orchestrator: "orch-a" };
    a.putJob(j);
    a.putExecution(running("e-1", "j-1"));
    await a.flush();
    // A stops following the others (as if paused or cut off), so it misses the takeover below.
    a.close();
    const [b, c] = await Promise.all([open("orch-b"), open("orch-c")]);

    const canTake = (stored: JobRecord) => stored.Orchestrator === "orch-a";
    const claims = await Promise.all([
      b.claimJob("j-1", canTake, "test"),
      c.claimJob("j-1", canTake, "test"),
    ]);
    t.equal(claims.filter((x) => x !== undefined).length, 1, "exactly one claim wins");
    const [winner, loser] = claims[0] ? [b, c] : [c, b];
    t.equal((await a.jobs.stored("j-1"))?.Orchestrator, winner.owner, "KV names the winner");
    t.ok(winner.isMine("j-1"));
    await eventually(
      "the loser follows the winner's record",
      () => loser.jobs.get("j-1")?.Orchestrator === winner.owner,
    );
    t.notOk(loser.isMine("j-1"), "the loser does not act on it");
    t.equal(
      await loser.claimJob("j-1", canTake, "test"),
      undefined,
      "a claim on a changed record is refused",
    );
    t.match((await winner.history("j-1")).at(-1)?.Message ?? "", /taken over by orch-\w from orch-a/);

    // A missed the takeover: its next write of the job record is refused by KV (compare-and-set on the
    // revision it last saw), the new owner's record is read back and A no longer counts the job as its own.
    const changes: string[] = [];
    a.watchJob("j-1", (change) => {
      if (change.type === "job") changes.push(change.job.Orchestrator ?? "");
    });
    j = a.setJobState(j, "Failed", "a stale owner's decision");
    await a.flush();
    t.equal((await a.jobs.stored("j-1"))?.State, "Pending", "the stale write did not land");
    await eventually("A sees the new owner", () => a.jobs.get("j-1")?.Orchestrator === winner.owner);
    t.notOk(a.isMine("j-1"), "fenced: A lets the job go");
    t.equal(changes.at(-1), winner.owner, "A's watchers are told");

    // A fence that says "not acting" (a lapsed lease) makes no job the orchestrator's own.
    winner.fence(() => false);
    t.notOk(winner.isMine("j-1"));
  },
);

t.test("in a cluster a register adopts the approval another orchestrator stored", async (t) => {
  const url = await startJetStream(t, await tempDir(t, "shoal-state-approval-"));
  const nc = await connect({ servers: url });
  t.teardown(() => nc.close());
  const service = async (owner: string) => {
    const store = await StateStore.open(jetstream(nc), silentLogger, { owner });
    return { store, nodes: testNodeService(t, store) };
  };
  const [a, b] = [await service("orch-a"), await service("orch-b")];
  const register = {
    nodeId: "n1",
    chainPem: "",
    labels: {},
    capacity: { cpu: 1, memory: 1 },
    engines: ["wasm"],
    version: "test",
    executions: [],
  };
  t.equal(a.nodes.register("n1", register, "").Approval, "PENDING");
  t.equal(b.nodes.register("n1", register, "", await b.store.nodes.stored("n1")).Approval, "PENDING");
  await a.nodes.approve("n1", "admin");
  t.equal(
    b.nodes.register("n1", register, "", await b.store.nodes.stored("n1")).Approval,
    "APPROVED",
    "approved at A, so B answers the node's next register with APPROVED",
  );
});

t.test("a long history is stored in pages, read back in order and followed by the others", async (t) => {
  const open = await clusterStores(t, "shoal-state-history-");
  const a = await open("orch-a");
  const b = await open("orch-b");
  const id = `j-${"0".repeat(8)}-0000-0000-0000-${"0".repeat(12)}`;
  const start = Date.parse("2026-12-01T00:00:00Z");
  a.putJob(jobRecord(id, start, { Orchestrator: "orch-a" }));
  // About 1.3 MB of events, as a batch job of Count 1000 makes: more than one NATS message may carry.
  const total = 5000;
  for (let i = 0; i < total; i++) {
    a.appendEvent({
      Time: start + i,
      JobID: id,
      ExecutionID: `e-${String(i).padStart(36, "0")}`,
      NodeID: "node-1",
      Type: "ExecutionStateUpdate",
      State: "Running",
      PreviousState: "BidAccepted",
      Message: `event ${i}`,
    });
    if (i % 500 === 499) await a.flush();
  }
  await a.flush();
  const times = async (store: StateStore) => (await store.history(id)).map((e) => e.Time - start);
  const expected = Array.from({ length: total }, (_, i) => i);
  t.same(await times(a), expected);
  await eventually("B follows the whole history", async () => (await b.history(id)).length === total);
  t.same(await times(b), expected, "in order at B");
  t.same(await times(await open("orch-c")), expected, "and after a restart");
});

t.test("a new owner whose copy of the history lags does not overwrite the old owner's events", async (t) => {
  const open = await clusterStores(t, "shoal-state-pages-");
  const a = await open("orch-a");
  const start = Date.now() - 10_000;
  const event = (i: number, by: string): JobEvent => ({
    Time: start + i,
    JobID: "j-1",
    Type: "JobStateUpdate",
    State: "Running",
    Message: `event ${i} by ${by}`,
  });
  a.putJob(jobRecord("j-1", start, { Orchestrator: "orch-a", State: "Running" }));
  a.appendEvent(event(1, "A"));
  a.appendEvent(event(2, "A"));
  await a.flush();
  const b = await open("orch-b");
  t.equal((await b.history("j-1")).length, 2, "B loaded the history so far");
  // B stops following (its history copy lags from here); A records one more event.
  b.close();
  a.appendEvent(event(3, "A"));
  await a.flush();
  // B takes the job over (its claim writes an event) and records one of its own.
  t.ok(await b.claimJob("j-1", () => true, "the test"));
  b.appendEvent(event(20_000, "B"));
  await b.flush();

  const c = await open("orch-c");
  t.same(
    (await c.history("j-1")).map((e) => e.Message.split(":")[0]),
    ["event 1 by A", "event 2 by A", "event 3 by A", "taken over by orch-b from orch-a", "event 20000 by B"],
    "every event of both owners is stored, in time order",
  );
});

t.test("the pages of two owners are merged by time, whichever owner's come first by name", async (t) => {
  const open = await clusterStores(t, "shoal-state-merge-");
  const a = await open("orch-a");
  const start = Date.now() - 10_000;
  const event = (time: number, message: string): JobEvent => ({
    Time: time,
    JobID: "j-1",
    Type: "JobStateUpdate",
    State: "Running",
    Message: message,
  });
  a.putJob(jobRecord("j-1", start, { Orchestrator: "orch-a", State: "Running" }));
  a.appendEvent(event(start + 1, "A early"));
  a.appendEvent(event(start + 30_000, "A late"));
  await a.flush();
  const b = await open("orch-b");
  t.ok(await b.claimJob("j-1", () => true, "the test"));
  b.appendEvent(event(start + 20_000, "B"));
  await b.flush();
  t.same(
    (await (await open("orch-c")).history("j-1")).map((e) => e.Message.split(":")[0]),
    ["A early", "taken over by orch-b from orch-a", "B", "A late"],
  );
});

/** A JetStream client on a fresh server of the test's own. */
async function freshJetStream(t: Test, prefix: string) {
  const nc = await connect({ servers: await startJetStream(t, await tempDir(t, prefix)) });
  t.teardown(() => nc.close());
  return jetstream(nc);
}

/** A job record larger than one NATS message (1 MiB). */
const tooLarge = (id: string) => jobRecord(id, 1, { Spec: { blob: "x".repeat(1100 * 1024) } });

t.test("a history stored whole, before pages, is read first and removed with the job", async (t) => {
  const js = await freshJetStream(t, "shoal-state-legacy-");
  const event = (time: number, state: string): JobEvent => ({
    Time: time,
    JobID: "j-1",
    Type: "JobStateUpdate",
    State: state,
    Message: state,
  });
  const kv = await new Kvm(js).create(BUCKETS.events);
  await kv.put("j-1", JSON.stringify([event(1, "Pending"), event(2, "Running")]));
  const store = await StateStore.open(js, silentLogger);
  store.putJob(jobRecord("j-1", 1, { State: "Running" }));
  store.appendEvent(event(3, "Completed"));
  await store.flush();
  t.same(
    (await store.history("j-1")).map((e) => e.State),
    ["Pending", "Running", "Completed"],
  );
  await store.purgeJob("j-1", []);
  t.equal(await kv.get("j-1"), null, "the whole history is purged");
  t.equal(await kv.get("j-1.0"), null, "and so is the page");
});

t.test(
  "a history is kept in memory while its job runs, and read from KV once it ended a while ago",
  async (t) => {
    const js = await freshJetStream(t, "shoal-state-lazy-");
    const store = await StateStore.open(js, silentLogger);
    const t0 = Date.now();
    let ended = store.setJobState(jobRecord("j-ended", t0, { State: "Pending" }), "Running", "placed", t0);
    ended = store.setJobState(ended, "Completed", "done", t0 + 1);
    store.setJobState(jobRecord("j-running", t0, { State: "Pending" }), "Running", "placed", t0);
    await store.flush();
    t.ok(store.events.has("j-ended.0"), "an ended job's history stays a while");

    // An event a while later lets it go.
    store.appendEvent({
      Time: t0 + HISTORY_KEPT_MS + 2,
      JobID: "j-running",
      Type: "JobStateUpdate",
      State: "Running",
      Message: "still",
    });
    t.notOk(store.events.has("j-ended.0"), "then it leaves memory");
    t.same(
      (await store.history("j-ended")).map((e) => e.State),
      ["Running", "Completed"],
      "and is read from KV when asked for",
    );
    // An event after that goes onto a page of its own.
    store.appendEvent({
      Time: t0 + HISTORY_KEPT_MS + 3,
      JobID: "j-ended",
      Type: "JobStateUpdate",
      State: "Completed",
      Message: "late",
    });
    await store.flush();
    t.same(
      (await store.history("j-ended")).map((e) => e.Message),
      ["placed", "done", "late"],
    );
    t.ok(store.events.has("j-ended.1"));

    // A restart reads only the histories of jobs that have not ended.
    const again = await StateStore.open(js, silentLogger);
    t.ok(again.events.has("j-running.0"), "a running job's history is in memory");
    t.notOk(again.events.has("j-ended.0"), "an ended job's is not");
    t.same(
      (await again.history("j-ended")).map((e) => e.Message),
      ["placed", "done", "late"],
    );
    again.appendEvent({
      Time: t0 + HISTORY_KEPT_MS + 4,
      JobID: "j-running",
      Type: "JobStateUpdate",
      State: "Running",
      Message: "after restart",
    });
    t.same(
      (await again.history("j-running")).map((e) => e.Message),
      ["placed", "still", "after restart"],
    );
    t.ok(again.events.has("j-running.0") && !again.events.has("j-running.1"), "onto the same page");
  },
);

t.test("a follower of a job's history gets each event once, those of the read included", async (t) => {
  const store = await StateStore.open(await freshJetStream(t, "shoal-state-follow-"), silentLogger);
  const jobs = new JobService({ store, log: silentLogger } as unknown as JobServiceOptions);
  let job = store.setJobState(jobRecord("j-1", 1, { State: "Pending" }), "Queued", "waiting", 2);
  const seen: string[] = [];
  const ended = new Promise<string>((resolve) =>
    jobs.follow(
      "j-1",
      (e) => seen.push(e.Message),
      (j) => resolve(j.State),
    ),
  );
  // While the history so far is read.
  job = store.setJobState(job, "Running", "placed", 3);
  store.setJobState(job, "Completed", "done", 4);
  t.equal(await ended, "Completed");
  t.same(seen, ["waiting", "placed", "done"]);
});

t.test("in a cluster, a late event on a history let go is read from KV, not sent again whole", async (t) => {
  const open = await clusterStores(t, "shoal-state-late-");
  const a = await open("orch-a");
  const b = await open("orch-b");
  const t0 = Date.now();
  let ended = a.setJobState(
    { ...jobRecord("j-a", t0, { State: "Pending" }), Orchestrator: "orch-a" },
    "Running",
    "placed",
    t0,
  );
  ended = a.setJobState(ended, "Completed", "done", t0 + 1);
  await a.flush();
  await eventually(
    "B follows the end",
    () => b.jobs.get("j-a")?.State === "Completed" && b.events.has("j-a.orch-a.0"),
  );
  // B lets the history go with its next event a while later.
  b.putJob({ ...jobRecord("j-b", t0), Orchestrator: "orch-b" });
  b.appendEvent({
    Time: t0 + HISTORY_KEPT_MS + 2,
    JobID: "j-b",
    Type: "JobStateUpdate",
    State: "Running",
    Message: "b",
  });
  t.notOk(b.events.has("j-a.orch-a.0"));
  const sent: string[] = [];
  b.watchJob("j-a", (c) => {
    if (c.type === "event") sent.push(c.event.Message);
  });
  a.appendEvent({
    Time: t0 + 2,
    JobID: "j-a",
    Type: "ExecutionStateUpdate",
    State: "Cancelled",
    Message: "late",
  });
  await a.flush();
  await eventually("B reads the late event", async () => (await b.history("j-a")).length === 3);
  t.same(sent, [], "the page is not sent to B's watchers again");
  t.notOk(b.events.has("j-a.orch-a.0"), "nor kept in B's memory");
});

t.test("a value too large for a NATS message fails its flush once, and no later write", async (t) => {
  const store = await StateStore.open(await freshJetStream(t, "shoal-state-large-"), silentLogger);
  store.putJob(tooLarge("j-huge"));
  await t.rejects(store.flush(), { message: /max_payload/ });
  store.putJob(jobRecord("j-small", 2));
  await store.flush();
  t.ok(await store.jobs.stored("j-small"), "later writes are stored");
  t.equal(await store.jobs.stored("j-huge"), undefined);
});

t.test("a job's flush reports its own records' failure, not another job's written beside it", async (t) => {
  const store = await StateStore.open(await freshJetStream(t, "shoal-state-flush-"), silentLogger);
  // Two submissions in one tick: their writes go in one batch.
  store.putJob(tooLarge("j-huge"));
  store.appendEvent({
    Time: 1,
    JobID: "j-huge",
    Type: "JobStateUpdate",
    State: "Pending",
    Message: "submitted",
  });
  store.putJob(jobRecord("j-small", 2));
  store.appendEvent({
    Time: 2,
    JobID: "j-small",
    Type: "JobStateUpdate",
    State: "Pending",
    Message: "submitted",
  });
  const [huge, small] = await Promise.allSettled([store.flushJob("j-huge"), store.flushJob("j-small")]);
  t.equal(huge.status, "rejected", "the job that could not be stored is told so");
  t.equal(small.status, "fulfilled", "the one stored is not");
  t.ok(await store.jobs.stored("j-small"));
  t.equal(await store.jobs.stored("j-huge"), undefined);
});

t.test("a failed write's retry never overwrites a newer value of its key written meanwhile", async (t) => {
  let slow = true;
  const js = await freshJetStream(t, "shoal-state-retry-");
  // The first write of j-1 fails after 300 ms; the one made meanwhile goes through.
  const store = await StateStore.open(
    withFailingPublish(js, (subject) => (slow && subject === "$KV.shoal-jobs.j-1" ? 300 : undefined)),
    silentLogger,
  );
  t.teardown(() => store.close());
  store.putJob(jobRecord("j-1", 1, { StateMessage: "first" }));
  await new Promise((r) => setTimeout(r, 50));
  slow = false;
  store.putJob(jobRecord("j-1", 1, { StateMessage: "second" }));
  // The first fails at 300 ms; its retry, 250 ms later, would land after the second.
  await new Promise((r) => setTimeout(r, 900));
  await store.flush();
  t.equal((await store.jobs.stored("j-1"))?.StateMessage, "second");
});

/** The stores of two orchestrators of a cluster, orch-a and orch-b, on one JetStream; `open` opens more. */
async function cluster(t: Test, prefix: string) {
  const url = await startJetStream(t, await tempDir(t, prefix));
  const nc = await connect({ servers: url });
  t.teardown(() => nc.close());
  const open = async (owner: string) => {
    const store = await StateStore.open(jetstream(nc), silentLogger, { owner });
    t.teardown(() => store.close());
    return store;
  };
  return { open, a: await open("orch-a"), b: await open("orch-b") };
}

t.test(
  "each node's unfinished executions are indexed as they change, followed, forgotten and reloaded",
  async (t) => {
    const { open, a, b } = await cluster(t, "shoal-state-by-node-");
    const on = (store: StateStore, node: string) =>
      store
        .unfinishedExecutionsOn(node)
        .map((e) => e.ID)
        .sort();
    const execution = (id: string, jobId: string, node: string, state: ExecutionRecord["State"]) =>
      executionRecord(id, jobId, state, { node, time: 1 });
    for (const id of ["j-1", "j-2"]) a.putJob({ ...job(id, 1), Orchestrator: "orch-a" });
    a.putExecution(execution("e-1", "j-1", "n1", "Running"));
    a.putExecution(execution("e-2", "j-1", "n1", "Completed"));
    a.putExecution(execution("e-3", "j-2", "n2", "BidAccepted"));
    t.same(on(a, "n1"), ["e-1"], "ended executions are not a node's");
    t.same(on(a, "n2"), ["e-3"]);
    t.same(on(a, "n3"), []);

    const e1 = a.executions.get("e-1")!;
    a.setExecutionState(e1, "Completed", "exit code 0");
    t.same(on(a, "n1"), [], "an execution that ends leaves its node's");
    a.putExecution(execution("e-4", "j-2", "n1", "AskForBid"));
    await a.flush();
    await eventually(
      "B follows A's executions",
      () => on(b, "n1").join() === "e-4" && on(b, "n2").join() === "e-3",
    );

    a.forgetJob("j-2");
    t.same([on(a, "n1"), on(a, "n2")], [[], []], "a job forgotten takes its executions along");
    const c = await open("orch-c");
    t.same([on(c, "n1"), on(c, "n2")], [["e-4"], ["e-3"]], "rebuilt when the state is loaded");
  },
);

t.test("each orchestrator's unfinished jobs are indexed by owner as they change hands and end", async (t) => {
  const { a, b } = await cluster(t, "shoal-state-by-owner-");
  const owners = (store: StateStore) => store.ownersOfUnfinishedJobs().sort().join();
  const of = (store: StateStore, owner: string) =>
    store
      .unfinishedJobsOf(owner)
      .map((j) => j.ID)
      .sort()
      .join();
  b.putJob({ ...job("j-1", 1), State: "Running", Orchestrator: "orch-b" });
  b.putJob({ ...job("j-2", 1), State: "Queued", Orchestrator: "orch-b" });
  b.putJob({ ...job("j-3", 1), State: "Completed", Orchestrator: "orch-b" });
  a.putJob({ ...job("j-4", 1), State: "Pending", Orchestrator: "orch-a" });
  await b.flush();
  await eventually("A follows B's jobs", () => of(a, "orch-b") === "j-1,j-2");
  t.equal(owners(a), "orch-a,orch-b", "a finished job names no owner here");

  t.ok(await a.claimJob("j-2", () => true, "test"), "A takes j-2 over");
  t.equal(of(a, "orch-a"), "j-2,j-4");
  const j1 = b.jobs.get("j-1")!;
  b.setJobState(j1, "Failed", "lost");
  await b.flush();
  await eventually("A follows j-1's end", () => owners(a) === "orch-a");
  t.equal(of(a, "orch-b"), "", "an owner whose jobs all ended is no longer one");
});

t.test(
  "jobs and executions are counted by state as they change, are followed, forgotten and reloaded",
  async (t) => {
    const { open, a, b } = await cluster(t, "shoal-state-tally-");
    const sorted = (tally: ReadonlyMap<string, number>) => Object.fromEntries([...tally].sort());
    const counts = (store: StateStore) => ({
      jobs: sorted(store.jobs.tally("state")),
      executions: sorted(store.executions.tally("state")),
    });
    let j1: JobRecord = { ...job("j-1", 1), Orchestrator: "orch-a" };
    a.putJob(j1);
    a.putJob({ ...job("j-2", 1), Orchestrator: "orch-a" });
    a.putExecution(executionRecord("e-1", "j-1", "Running"));
    t.same(counts(a), { jobs: { Pending: 2 }, executions: { Running: 1 } });
    j1 = a.setJobState(j1, "Completed", "done");
    a.setExecutionState(a.executions.get("e-1")!, "Completed", "exit code 0");
    t.same(
      counts(a),
      { jobs: { Pending: 1, Completed: 1 }, executions: { Completed: 1 } },
      "a change moves a count",
    );
    await a.flush();
    await eventually("B counts A's writes", () => JSON.stringify(counts(b)) === JSON.stringify(counts(a)));
    a.forgetJob("j-1");
    t.same(counts(a), { jobs: { Pending: 1 }, executions: {} }, "a job forgotten is no longer counted");
    t.same(
      counts(await open("orch-c")),
      { jobs: { Pending: 1, Completed: 1 }, executions: { Completed: 1 } },
      "a load counts",
    );
  },
);
