/**
 * The orchestrator's state store at scale: N finished jobs (each with one
 * execution and the six history events of a run) stored in JetStream KV,
 * then, beside baselines measured in the same run:
 *
 * - loading them, as a restarted orchestrator does (StateStore.open: one
 *   ordered consumer per bucket; of the history only the keys, since every job
 *   here ended), beside reading each key of every bucket with a direct get,
 *   256 at a time (sent all at once, the gets of 20,000 jobs time out);
 * - the newest page of 100 jobs (the jobs table's creation-order index),
 *   beside sorting every job, as listings did before the index;
 * - a node's unfinished executions, read at each register and lost node
 *   (the executions table's grouping by node), beside scanning every
 *   execution, as the dispatcher did before;
 * - the heap the loaded records take per job, for sizing an orchestrator:
 *   jobs are kept for `Orchestrator.JobGC.Threshold` (24 h by default), an
 *   ended job's history only for a minute;
 * - a sweep of the job collector over them all (the one that also gathers
 *   the modules they name, every 5 minutes): the longest the event loop waited
 *   during it, beside the sweep's whole time, which it waited before the
 *   sweep gave it turns.
 *
 *   npm run bench:state [-- JOBS=20000]
 */
import "reflect-metadata";
import { randomUUID } from "node:crypto";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { silentLogger } from "../core/index.js";
import { JobCollector } from "../orchestrator/job-collector.js";
import { LogStore } from "../orchestrator/log-store.js";
import { ModuleStore } from "../orchestrator/module-store.js";
import { type JobRecord, TERMINAL_EXECUTION_STATES } from "../orchestrator/records.js";
import { ResultsStore } from "../orchestrator/results-store.js";
import { BUCKETS, StateStore } from "../orchestrator/state-store.js";
import { startBenchJetStream } from "./jetstream-server.js";

const JOBS = Number(process.argv[2] ?? 20_000);
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) throw new Error("run with node --expose-gc (npm run bench:state does)");

const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-bench-state-"));
const server = await startBenchJetStream(dir);
const js = jetstream(server.nc);

// A finished job's records, as an orchestrator writes them for `job run --wasm`.
const writer = await StateStore.open(js, silentLogger);
const start = Date.now() - JOBS * 10;
for (let i = 0; i < JOBS; i++) {
  const time = start + i * 10;
  const jobId = `j-${randomUUID()}`;
  const executionId = `e-${randomUUID()}`;
  const job: JobRecord = {
    ID: jobId,
    Name: "hello",
    Namespace: "default",
    Type: "batch",
    Spec: {
      Name: "hello",
      Namespace: "default",
      Type: "batch",
      Count: 1,
      Priority: 0,
      Constraints: [],
      Labels: {},
      Meta: {},
      Tasks: [
        {
          Name: "main",
          Engine: {
            Type: "wasm",
            Params: { EntryModule: { Type: "stored", Params: { Digest: `sha256:${"ab".repeat(32)}` } } },
          },
        },
      ],
    },
    Submitter: { sub: "alice", namespace: "default", method: "password" },
    State: "Completed",
    StateMessage: "all executions completed",
    Count: 1,
    Retries: 0,
    CreateTime: time,
    ModifyTime: time + 9,
  };
  writer.putJob(job);
  writer.putExecution({
    ID: executionId,
    JobID: jobId,
    NodeID: "node-1",
    State: "Completed",
    StateMessage: "exit code 0",
    Resources: { cpu: 0.1, memory: 64 << 20 },
    CreateTime: time + 1,
    ModifyTime: time + 8,
    Deadline: time + 600_000,
    ExitCode: 0,
    Stdout: "hello from wasm\n",
    Stderr: "",
  });
  const run = { ExecutionID: executionId, NodeID: "node-1", Type: "ExecutionStateUpdate" } as const;
  for (const event of [
    { Type: "JobStateUpdate", State: "Pending", Message: "submitted" },
    { ...run, State: "AskForBid", Message: "asking node-1" },
    { ...run, State: "BidAccepted", PreviousState: "AskForBid", Message: "node-1 accepted" },
    { ...run, State: "Running", PreviousState: "BidAccepted", Message: "running" },
    { ...run, State: "Completed", PreviousState: "Running", Message: "exit code 0" },
    {
      Type: "JobStateUpdate",
      State: "Completed",
      PreviousState: "Running",
      Message: "all executions completed",
    },
  ] as const) {
    writer.appendEvent({ Time: time, JobID: jobId, ...event });
  }
  if (i % 500 === 499) await writer.flushJob(jobId);
}
await writer.flushJob("");
writer.close();

/** Median of three runs of `fn`, in ms. */
async function median(fn: () => Promise<unknown>): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    await fn();
    times.push(performance.now() - t0);
  }
  return times.sort((a, b) => a - b)[1]!;
}

const kvm = new Kvm(js);
const byGets = await median(async () => {
  for (const bucket of Object.values(BUCKETS)) {
    const kv = await kvm.open(bucket);
    const keys: string[] = [];
    for await (const k of await kv.keys()) keys.push(k);
    for (let i = 0; i < keys.length; i += 256) {
      await Promise.all(keys.slice(i, i + 256).map((k) => kv.get(k).then((e) => e?.json())));
    }
  }
});
const byStream = await median(async () => (await StateStore.open(js, silentLogger)).close());

gc();
const heapBefore = process.memoryUsage().heapUsed;
const store = await StateStore.open(js, silentLogger);
gc();
const heapPerJob = (process.memoryUsage().heapUsed - heapBefore) / store.jobs.size;

const pageNewest = () => {
  const page: JobRecord[] = [];
  for (const { row } of store.jobs.descending()) if (page.push(row) === 100) break;
  return page;
};
const pageSorted = () => [...store.jobs.values()].sort((a, b) => b.CreateTime - a.CreateTime).slice(0, 100);
const time = (fn: () => unknown, runs: number) => {
  const t0 = performance.now();
  for (let i = 0; i < runs; i++) fn();
  return (performance.now() - t0) / runs;
};
const indexed = time(pageNewest, 1000);
const sorted = time(pageSorted, 5);
if (pageNewest()[0]?.ID !== pageSorted()[0]?.ID) throw new Error("the two listings disagree");
// What a register or a lost node reads: the node's unfinished executions (here none, among all of its finished ones).
const onNode = () => store.unfinishedExecutionsOn("node-1");
const onNodeScanned = () =>
  [...store.executions.values()].filter(
    (e) => e.NodeID === "node-1" && !TERMINAL_EXECUTION_STATES.has(e.State),
  );
const nodeIndexed = time(onNode, 1000);
const nodeScanned = time(onNodeScanned, 20);
if (onNode().length !== onNodeScanned().length) throw new Error("the two reads of a node disagree");

// A collector that keeps every job (MaxJobs = all of them): its first sweep reads each job twice, for
// the ones to remove and for the modules they name. Meanwhile, the longest gap between two turns of the loop.
const [logs, results, modules] = [new LogStore(dir), new ResultsStore(dir), new ModuleStore(dir)];
await Promise.all([logs.init(), results.init(), modules.init()]);
const collector = new JobCollector({
  store,
  logs,
  results,
  modules,
  log: silentLogger,
  thresholdMs: 0,
  maxJobs: store.jobs.size,
});
let longestStall = 0;
let sweeping = true;
const ticks = (async () => {
  for (let last = performance.now(); sweeping; ) {
    await new Promise((r) => setImmediate(r));
    const now = performance.now();
    longestStall = Math.max(longestStall, now - last);
    last = now;
  }
})();
const sweepStart = performance.now();
if ((await collector.sweep()) !== 0) throw new Error("the sweep removed jobs");
const sweepMs = performance.now() - sweepStart;
sweeping = false;
await ticks;

const row = (what: string, value: string, baseline: string, ratio: string) =>
  console.log(`${what.padEnd(46)} ${value.padStart(12)} ${baseline.padStart(14)} ${ratio.padStart(8)}`);
const ms = (x: number) => `${x < 10 ? x.toFixed(2) : x.toFixed(0)} ms`;
console.log(`${store.jobs.size} finished jobs in JetStream KV, load average ${os.loadavg()[0]!.toFixed(1)}`);
row("measure", "value", "baseline", "×");
row("load at a restart", ms(byStream), ms(byGets), (byGets / byStream).toFixed(1));
row("newest page of 100 jobs", ms(indexed), ms(sorted), (sorted / indexed).toFixed(0));
row(
  "a node's unfinished executions",
  ms(nodeIndexed),
  ms(nodeScanned),
  (nodeScanned / nodeIndexed).toFixed(0),
);
row(
  "collector sweep: longest wait of the loop",
  ms(longestStall),
  ms(sweepMs),
  (sweepMs / longestStall).toFixed(0),
);
row("heap per ended job (job, execution)", `${(heapPerJob / 1024).toFixed(1)} KiB`, "", "");
row(`  at 1 job/s kept 24 h (86,400 jobs)`, `${((heapPerJob * 86_400) / 2 ** 20).toFixed(0)} MiB`, "", "");

store.close();
await server.stop();
await fs.rm(dir, { recursive: true, force: true });
