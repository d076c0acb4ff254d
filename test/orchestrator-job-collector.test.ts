import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import { type JetStreamManager, jetstream } from "@nats-io/jetstream";
import { Objm } from "@nats-io/obj";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import fc from "fast-check";
import t, { type Test } from "tap";
import { silentLogger } from "../core/index.js";
import {
  JobCollector,
  kthSmallest,
  MAX_COUNT_SWEEP_INTERVAL_MS,
  MAX_SWEEP_INTERVAL_MS,
  STRAY_GRACE_MS,
} from "../orchestrator/job-collector.js";
import { LogStore } from "../orchestrator/log-store.js";
import { MODULES_BUCKET, ModuleStore } from "../orchestrator/module-store.js";
import type { JobState } from "../orchestrator/records.js";
import { RESULTS_BUCKET, ResultsStore } from "../orchestrator/results-store.js";
import { BUCKETS, StateStore } from "../orchestrator/state-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";
import { eventually, executionRecord, jobRecord, resultMessages, storedLines } from "./helpers/records.js";

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

const execution = (id: string, jobId: string) => executionRecord(id, jobId, "Completed", { time: ENDED });

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
  const open = async (
    owner: string,
    limits: { thresholdMs: number; maxJobs?: number } = { thresholdMs: THRESHOLD },
  ): Promise<Orchestrator> => {
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
      ...limits,
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
    t.same(await b.store.history("j-old"), []);
    t.same(await storedLines(b.logs, "j-old"), [], "B's copy of its logs is removed");
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
    t.same(await storedLines(a.logs, "j-old"), [], "A's logs are removed");

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
  t.same(await storedLines(a.logs, "j-gone"), []);
  t.ok(await exists(path.join(a.dir, "results", "j-kept")), "a stored job's files stay");
  t.equal((await storedLines(a.logs, "j-kept")).length, 1);
  t.ok(await exists(path.join(a.dir, "results", ".staging")), "and so does the staging area");
});

t.test(
  "beyond MaxJobs finished jobs, the ones that ended first are removed, whatever their age",
  async (t) => {
    const { open, inKv } = await cluster(t);
    const a = await open("orch-a", { thresholdMs: 0, maxJobs: 2 });
    for (const [id, ended] of [
      ["j-1", 1_000],
      ["j-3", 3_000],
      ["j-2", 2_000],
    ] as const) {
      a.store.putJob(job(id, "Completed", "orch-a", ended));
    }
    a.store.putJob(job("j-running", "Running", "orch-a", 0));
    a.store.putJob(job("j-queued", "Queued", "orch-a", 0));
    await a.store.flush();

    t.equal(await a.collector.sweep(3_000), 1, "one finished job too many");
    t.same([...a.store.jobs.keys()].sort(), ["j-2", "j-3", "j-queued", "j-running"], "the first to end goes");
    t.notOk(await inKv(BUCKETS.jobs, "j-1"), "purged from KV");
    t.equal(
      await a.collector.sweep(Number.MAX_SAFE_INTEGER),
      0,
      "at the limit, nothing is old enough without a threshold",
    );

    a.store.putJob(job("j-4", "Failed", "orch-a", 4_000));
    a.store.putJob(job("j-5", "Stopped", "orch-a", 5_000));
    await a.store.flush();
    t.equal(await a.collector.sweep(5_000), 2);
    t.same(
      [...a.store.jobs.keys()].sort(),
      ["j-4", "j-5", "j-queued", "j-running"],
      "unfinished jobs never count",
    );

    // With a threshold too: the limit, then the age of those kept.
    const b = await open("orch-b", { thresholdMs: THRESHOLD, maxJobs: 1 });
    await eventually("B follows A's jobs", () => b.store.jobs.size === 4);
    t.equal(await b.collector.sweep(4_000 + THRESHOLD), 1, "j-4 beyond the limit; j-5 not old enough");
    t.same([...b.store.jobs.keys()].sort(), ["j-5", "j-queued", "j-running"]);
    t.equal(await b.collector.sweep(5_000 + THRESHOLD), 1, "then j-5 for its age");
  },
);

t.test("the limit picks the jobs that ended first among many, ties included", async (t) => {
  const { open } = await cluster(t);
  const a = await open("orch-a", { thresholdMs: 0, maxJobs: 150 });
  // 200 jobs ended 10 ms apart, stored in a shuffled order; two of them ended at 1,490, the cutoff.
  const ends = Array.from({ length: 200 }, (_, i) => 1_000 + i * 10);
  ends[50] = 1_490;
  for (let i = ends.length - 1; i > 0; i--) {
    const j = (i * 7919) % (i + 1);
    [ends[i], ends[j]] = [ends[j]!, ends[i]!];
  }
  for (const [i, ended] of ends.entries()) a.store.putJob(job(`j-${i}`, "Completed", "orch-a", ended));
  await a.store.flush();
  t.equal(await a.collector.sweep(10_000), 50);
  const kept = [...a.store.jobs.values()].map((j) => j.ModifyTime).sort((x, y) => x - y);
  t.equal(kept.length, 150);
  t.same(kept.slice(0, 2), [1_490, 1_510], "one of the two that ended at the cutoff is kept, and all after");
  t.equal(kept.at(-1), 2_990);
});

t.test("sweeps come often enough for the limit; strays wait an hour without a threshold", async (t) => {
  const { open } = await cluster(t);
  const interval = async (thresholdMs: number, maxJobs?: number) =>
    (await open(`orch-${thresholdMs}-${maxJobs}`, { thresholdMs, ...(maxJobs ? { maxJobs } : {}) })).collector
      .intervalMs;
  t.equal(await interval(1_000), 250, "a quarter of the threshold");
  t.equal(await interval(24 * 3_600_000), MAX_SWEEP_INTERVAL_MS);
  t.equal(await interval(24 * 3_600_000, 10), MAX_COUNT_SWEEP_INTERVAL_MS);
  t.equal(await interval(0, 10), MAX_COUNT_SWEEP_INTERVAL_MS);

  const a = await open("orch-a", { thresholdMs: 0, maxJobs: 10 });
  // A module no job names goes at the second collection, 5 minutes apart whatever the sweeps.
  const digest = `sha256:${"ab".repeat(32)}`;
  await a.modules.put(digest, Buffer.from("\0asm\x01\0\0\0"));
  const start = Date.now();
  for (const at of [0, MAX_COUNT_SWEEP_INTERVAL_MS, MAX_SWEEP_INTERVAL_MS - 1])
    await a.collector.sweep(start + at);
  t.ok(await a.modules.has(digest), "frequent sweeps collect modules at the usual pace");
  await a.collector.sweep(start + MAX_SWEEP_INTERVAL_MS);
  t.notOk(await a.modules.has(digest), "then it goes");
  await a.logs.append("j-gone", { Time: ENDED, ExecutionID: "e-1", Stream: "stdout", Seq: 0, Data: "x" });
  t.equal(await a.collector.removeStrays(Date.now() + STRAY_GRACE_MS - 60_000), 0, "recent files stay");
  t.equal(await a.collector.removeStrays(Date.now() + STRAY_GRACE_MS), 1);
  t.same(await storedLines(a.logs, "j-gone"), []);
});

t.test("kthSmallest is the k-th value of the sorted array, whatever the order and the repeats", async (t) => {
  fc.assert(
    fc.property(
      fc.array(fc.integer({ min: 0, max: 20 }), { minLength: 1, maxLength: 60 }),
      fc.nat(),
      (values, n) => {
        const k = n % values.length;
        const sorted = [...values].sort((a, b) => a - b);
        return kthSmallest(Float64Array.from(values), k) === sorted[k];
      },
    ),
    { numRuns: 2000 },
  );
  t.pass("2,000 arrays");
});
