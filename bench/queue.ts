/**
 * The dispatcher's pass over its queue with a large backlog: every execution
 * that ends starts one, so with the queue full its cost is paid at the rate
 * jobs end, on the orchestrator's one event loop. JOBS jobs (default 10,000,
 * `Orchestrator.Scheduler.MaxUnfinishedJobs`) are queued on 10 full nodes,
 * on a real JetStream state store, then, in the same run:
 *
 * - a pass over JOBS like jobs (the same spec: one finding no room stands for
 *   the others in that pass);
 * - beside a pass over JOBS jobs that are all unlike (each asks for a different
 *   amount of memory), so each is placed in turn, as every job was before.
 *
 *   npm run bench:queue [-- JOBS=10000]
 */
import "reflect-metadata";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { jetstream } from "@nats-io/jetstream";
import { type JobSpec, silentLogger, wasmJobSpec } from "../core/index.js";
import { Dispatcher } from "../orchestrator/dispatcher.js";
import { jobRequirements } from "../orchestrator/job-requirements.js";
import { LogStore } from "../orchestrator/log-store.js";
import { NodeService } from "../orchestrator/node-service.js";
import { placeJob } from "../orchestrator/placement.js";
import type { JobRecord } from "../orchestrator/records.js";
import { ResultsStore } from "../orchestrator/results-store.js";
import { StateStore } from "../orchestrator/state-store.js";
import { startBenchJetStream } from "./jetstream-server.js";

const JOBS = Number(process.argv[2] ?? 10_000);
const NODES = 10;

/** A dispatcher on a state store in `dir` with NODES nodes, each with room for one 100m execution. */
async function queue(dir: string, label: string) {
  const server = await startBenchJetStream(dir);
  const store = await StateStore.open(jetstream(server.nc), silentLogger);
  const nodes = new NodeService({
    store,
    log: silentLogger,
    manualApproval: false,
    disconnectTimeoutMs: 3_600_000,
    heartbeatIntervalMs: 60_000,
  });
  const logs = new LogStore(dir);
  const results = new ResultsStore(dir);
  await Promise.all([logs.init(), results.init()]);
  const dispatcher = new Dispatcher({
    store,
    nodes,
    logs,
    results,
    channel: {
      bid: async () => ({ accept: true, started: true }),
      run: async () => ({ accepted: true }),
      cancel: async () => {},
    },
    log: silentLogger,
    requirements: (job) => jobRequirements(job, { executionTimeoutMs: 3_600_000, queueTimeoutMs: 3_600_000 }),
    place: placeJob,
    queueTimeoutMs: 3_600_000,
    executionTimeoutMs: 3_600_000,
    retryBudget: 0,
  });
  for (let n = 0; n < NODES; n++) {
    const id = `${label}-n${n}`;
    nodes.register(
      id,
      {
        nodeId: id,
        chainPem: "",
        labels: {},
        capacity: { cpu: 0.1, memory: 1 << 30 },
        engines: ["wasm"],
        version: "bench",
        executions: [],
      },
      "",
    );
  }
  return { store, nodes, dispatcher, server };
}

const module = await fs.readFile("dist/wasm/hello.wasm");
const baseSpec = wasmJobSpec({ name: "bench", module });
const now = Date.now();
/** A job record of `spec`; `memory` (bytes) makes it unlike the others when given. */
function job(id: string, memory?: number): JobRecord {
  const spec: JobSpec =
    memory === undefined
      ? baseSpec
      : {
          ...baseSpec,
          Tasks: baseSpec.Tasks.map((t) => ({ ...t, Resources: { ...t.Resources, Memory: `${memory}` } })),
        };
  return {
    ID: id,
    Name: "bench",
    Namespace: "default",
    Type: "batch",
    Spec: spec,
    Submitter: { sub: "alice", namespace: "default", method: "password" },
    State: "Pending",
    StateMessage: "submitted",
    Count: 1,
    Retries: 0,
    CreateTime: now,
    ModifyTime: now,
  };
}

/** Fills the nodes, queues JOBS jobs (`unlike`: each its own memory) and times passes; the median, in ms. */
async function passMs(label: string, unlike: boolean): Promise<number> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), `shoal-bench-queue-${label}-`));
  const { store, nodes, dispatcher, server } = await queue(dir, label);
  for (let n = 0; n < NODES; n++) {
    store.putJob(job(`${label}-fill-${n}`));
    dispatcher.enqueue(`${label}-fill-${n}`);
  }
  for (let i = 0; i < JOBS; i++) {
    store.putJob(job(`${label}-q${i}`, unlike ? (64 << 20) + i : undefined));
    dispatcher.enqueue(`${label}-q${i}`);
  }
  const queued = [...store.jobs.values()].filter((j) => j.State === "Queued").length;
  if (queued !== JOBS) throw new Error(`${queued} jobs queued, not ${JOBS}`);
  const times: number[] = [];
  for (let r = 0; r < 5; r++) {
    const t0 = performance.now();
    dispatcher.nodeChanged(); // a pass in the next turn of the loop, as an ended execution starts one
    await new Promise((resolve) => setImmediate(resolve));
    await new Promise((resolve) => setImmediate(resolve));
    times.push(performance.now() - t0);
  }
  dispatcher.close();
  nodes.close();
  await store.flushJob("");
  store.close();
  await server.stop();
  await fs.rm(dir, { recursive: true, force: true });
  return times.sort((a, b) => a - b)[2]!;
}

// The unlike run first: it warms the code both share.
const unlikeMs = await passMs("unlike", true);
const likeMs = await passMs("like", false);
console.log(`${JOBS} jobs queued on ${NODES} full nodes, load average ${os.loadavg()[0]!.toFixed(1)}`);
console.log(`${"measure".padEnd(40)} ${"value".padStart(10)} ${"baseline".padStart(10)} ${"×".padStart(6)}`);
console.log(
  `${"a pass over like jobs (unlike: baseline)".padEnd(40)} ${`${likeMs.toFixed(1)} ms`.padStart(10)} ${`${unlikeMs.toFixed(1)} ms`.padStart(10)} ${(unlikeMs / likeMs).toFixed(1).padStart(6)}`,
);
