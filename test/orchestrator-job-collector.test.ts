import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import { type JetStreamManager, jetstream } from "@nats-io/jetstream";
import { Objm } from "@nats-io/obj";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { silentLogger } from "../core/index.js";
import { JobCollector } from "../orchestrator/job-collector.js";
import { LogStore } from "../orchestrator/log-store.js";
import { MODULES_BUCKET, ModuleStore } from "../orchestrator/module-store.js";
import type { ExecutionRecord, JobState } from "../orchestrator/records.js";
import { RESULTS_BUCKET, ResultsStore } from "../orchestrator/results-store.js";
import { BUCKETS, StateStore } from "../orchestrator/state-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";
import { eventually, jobRecord, resultMessages } from "./helpers/records.js";

/**
 * Job garbage collection against a real nats-server: orchestrators of a
 * cluster (stores with owners on one JetStream) forget expired jobs, the
 * owner purges them from KV and the object store without leaving delete
 * markers, and nothing unfinished or recent is touched.
 */
const THRESHOLD = 60_000;
const ENDED = 1_000;

const job = (id: string, state: JobState, owner: string, modifyTime = ENDED) =>
  jobRecord(id, modifyTime, { State: state, StateMessage: state, Orchestrator: owner });

function execution(id: string, jobId: string): ExecutionRecord {
  return {
    ID: id,
    JobID: jobId,
    NodeID: "n1",
    State: "Completed",
    StateMessage: "exit code 0",
    Resources: { cpu: 0.1, memory: 1 },
    CreateTime: ENDED,
    ModifyTime: ENDED,
  };
}

interface Orchestrator {
  dir: string;
  store: StateStore;
  logs: LogStore;
  results: ResultsStore;
  modules: ModuleStore;
  collector: JobCollector;
  nc: NatsConnection;
}

/** Orchestrators named `owner` on one JetStream, each with its own connection, data directory and collector. */
async function cluster(t: Test) {
  const root = await tempDir(t, "shoal-job-gc-");
  const url = await startJetStream(t, path.join(root, "js"));
  const admin = await connect({ servers: url });
  t.teardown(() => admin.close());
  const jsm: JetStreamManager = await jetstream(admin).jetstreamManager();
  const open = async (owner: string): Promise<Orchestrator> => {
    const nc = await connect({ servers: url });
    const js = jetstream(nc);
    const store = await StateStore.open(js, silentLogger, { owner });
    t.teardown(async () => {
      store.close();
      await nc.close();
    });
    const dir = path.join(root, owner);
    const jsm = await js.jetstreamManager();
    const shared = { objects: await new Objm(js).create(RESULTS_BUCKET), jsm };
    const logs = new LogStore(dir);
    const results = new ResultsStore(dir, shared);
    const modules = new ModuleStore(dir, { objects: await new Objm(js).create(MODULES_BUCKET), jsm });
    await Promise.all([logs.init(), results.init(), modules.init()]);
    const collector = new JobCollector({
      store,
      logs,
      results,
      modules,
      log: silentLogger,
      thresholdMs: THRESHOLD,
    });
    return { dir, store, logs, results, modules, collector, nc };
  };
  /** Whether anything, a delete marker included, is stored under the key. */
  const inKv = async (bucket: string, key: string) =>
    (await jsm.streams.getMessage(`KV_${bucket}`, { last_by_subj: `$KV.${bucket}.${key}` })) !== null;
  const objects = async () => (await jsm.streams.info(`OBJ_${RESULTS_BUCKET}`)).state.messages;
  return { open, inKv, objects };
}

/** Stores a finished job of `owner` at `o`: its execution, history, a result file and a log line. */
async function finishedJob(o: Orchestrator, jobId: string, owner: string) {
  o.store.putJob(job(jobId, "Completed", owner));
  o.store.appendEvent({
    Time: ENDED,
    JobID: jobId,
    Type: "JobStateUpdate",
    State: "Completed",
    Message: "done",
  });
  const executionId = `e-${jobId}`;
  const { chunks, manifest } = resultMessages(executionId, [`result of ${jobId}`]);
  for (const c of chunks) await o.results.stageChunk(c);
  const files = await o.results.commit(jobId, manifest);
  o.store.putExecution({ ...execution(executionId, jobId), Results: files });
  await o.logs.append(jobId, {
    Time: ENDED,
    ExecutionID: executionId,
    Stream: "stdout",
    Seq: 0,
    Data: "line",
  });
  await o.store.flush();
  return { executionId, file: files[0]! };
}

const exists = (p: string) =>
  fs.stat(p).then(
    () => true,
    () => false,
  );

t.test(
  "the owner purges an expired job everywhere; the others forget it; nothing else is touched",
  async (t) => {
    const { open, inKv, objects } = await cluster(t);
    const a = await open("orch-a");
    const b = await open("orch-b");
    const { executionId, file } = await finishedJob(a, "j-old", "orch-a");
    const expiredAt = ENDED + THRESHOLD;
    a.store.putJob(job("j-running", "Running", "orch-a"));
    a.store.putJob(job("j-queued", "Queued", "orch-a"));
    a.store.putJob(job("j-recent", "Failed", "orch-a", expiredAt - 1));
    await a.store.flush();
    await eventually(
      "B follows A's jobs",
      () => b.store.jobs.size === 4 && b.store.executionsOf("j-old").length === 1,
    );
    // B heard the job's logs too.
    await b.logs.append("j-old", {
      Time: ENDED,
      ExecutionID: executionId,
      Stream: "stdout",
      Seq: 0,
      Data: "line",
    });

    t.equal(await b.collector.sweep(expiredAt - 1), 0, "not before the threshold");
    t.equal(await b.collector.sweep(expiredAt), 1, "B forgets A's expired job");
    t.notOk(b.store.jobs.has("j-old"));
    t.same(b.store.executionsOf("j-old"), []);
    t.same(b.store.history("j-old"), []);
    t.same(await b.logs.read("j-old"), [], "B's copy of its logs is removed");
    t.ok(await inKv(BUCKETS.jobs, "j-old"), "but only its owner purges it");
    t.ok(await inKv(BUCKETS.events, "j-old.orch-a.0"), "its history too (A's page of it)");
    t.equal(await objects(), 2, "its result file stays in the object store (a chunk and a description)");

    t.equal(await a.collector.sweep(expiredAt), 1, "A removes its expired job");
    t.notOk(a.store.jobs.has("j-old"));
    for (const [bucket, key] of [
      [BUCKETS.jobs, "j-old"],
      [BUCKETS.events, "j-old.orch-a.0"],
      [BUCKETS.executions, executionId],
    ] as const) {
      t.notOk(await inKv(bucket, key), `${bucket} holds nothing of it, not even a delete marker`);
    }
    t.equal(await objects(), 0, "its result file is purged from the object store");
    t.equal(await b.results.open("j-old", executionId, file), undefined);
    t.notOk(await exists(path.join(a.dir, "results", "j-old")), "A's result files are removed");
    t.same(await a.logs.read("j-old"), [], "A's logs are removed");

    for (const o of [a, b]) {
      t.same([...o.store.jobs.values()].map((j) => j.ID).sort(), ["j-queued", "j-recent", "j-running"]);
    }
    for (const id of ["j-queued", "j-recent", "j-running"])
      t.ok(await inKv(BUCKETS.jobs, id), `${id} is kept`);
    t.equal(await a.collector.sweep(expiredAt), 0, "a second sweep finds nothing");

    const c = await open("orch-c");
    t.same(
      [...c.store.jobs.values()].map((j) => j.ID).sort(),
      ["j-queued", "j-recent", "j-running"],
      "a restart loads none of it",
    );
  },
);

t.test("a job whose owner is gone is purged by another orchestrator at twice the threshold", async (t) => {
  const { open, inKv, objects } = await cluster(t);
  // Its owner stored it and never ran a collector again.
  const gone = await open("orch-gone");
  const b = await open("orch-b");
  await finishedJob(gone, "j-orphan", "orch-gone");
  await eventually("B follows it", () => b.store.executionsOf("j-orphan").length === 1);

  t.equal(await b.collector.sweep(ENDED + THRESHOLD), 1, "forgotten at the threshold");
  t.notOk(b.store.jobs.has("j-orphan"));
  t.equal(await b.collector.sweep(ENDED + 2 * THRESHOLD - 1), 0);
  t.ok(await inKv(BUCKETS.jobs, "j-orphan"), "its owner had until twice the threshold");
  await b.collector.sweep(ENDED + 2 * THRESHOLD);
  t.notOk(await inKv(BUCKETS.jobs, "j-orphan"), "then B purges it");
  t.notOk(await inKv(BUCKETS.executions, "e-j-orphan"));
  t.equal(await objects(), 0, "with its result file");

  // An orchestrator that starts after twice the threshold purges such a job at once.
  await finishedJob(gone, "j-orphan-2", "orch-gone");
  const c = await open("orch-c");
  t.equal(await c.collector.sweep(ENDED + 2 * THRESHOLD), 1);
  t.notOk(await inKv(BUCKETS.jobs, "j-orphan-2"));
  t.equal(await objects(), 0);
});

t.test("a job whose purge fails is kept for the next sweep", async (t) => {
  const { open, inKv } = await cluster(t);
  const a = await open("orch-a");
  await finishedJob(a, "j-old", "orch-a");
  await a.nc.close();
  t.equal(await a.collector.sweep(ENDED + THRESHOLD), 0);
  t.ok(a.store.jobs.has("j-old"), "still known here");
  t.ok(await inKv(BUCKETS.jobs, "j-old"), "and stored");
  t.ok(await exists(path.join(a.dir, "results", "j-old")), "its files are kept");
});

t.test("files of jobs no longer stored, untouched for the threshold, are removed at start", async (t) => {
  const { open } = await cluster(t);
  const a = await open("orch-a");
  await finishedJob(a, "j-kept", "orch-a");
  // Left by a job purged while this orchestrator was down.
  await fs.mkdir(path.join(a.dir, "results", "j-gone", "e-1"), { recursive: true });
  await a.logs.append("j-gone", { Time: ENDED, ExecutionID: "e-1", Stream: "stdout", Seq: 0, Data: "x" });

  // Files untouched for less than the threshold may be a live job's that the store has not loaded yet.
  t.equal(await a.collector.removeStrays(), 0, "recent files stay");
  t.ok(await exists(path.join(a.dir, "results", "j-gone")));
  t.equal(await a.collector.removeStrays(Date.now() + THRESHOLD), 1);
  t.notOk(await exists(path.join(a.dir, "results", "j-gone")));
  t.same(await a.logs.read("j-gone"), []);
  t.ok(await exists(path.join(a.dir, "results", "j-kept")), "a stored job's files stay");
  t.equal((await a.logs.read("j-kept")).length, 1);
  t.ok(await exists(path.join(a.dir, "results", ".staging")), "and so does the staging area");
});
