/**
 * Job throughput and latency: submit → Completed of a trivial WASM job over
 * the HTTPS API, with an orchestrator and 4 compute nodes (in this process,
 * talking over the real mTLS fabric), beside the raw NATS request/reply RTT
 * of the same broker measured in the same run.
 *
 *   node --import @tapjs/typescript/import bench/jobs.ts [JOBS=500]
 */
import "reflect-metadata";
import { promises as fs } from "node:fs";
import { Agent, request } from "node:https";
import os from "node:os";
import path from "node:path";
import { ComputeNode } from "../compute/index.js";
import { createLogger, loadConfig, wasmJobSpec } from "../core/index.js";
import { connectFabric } from "../fabric/index.js";
import { Orchestrator } from "../orchestrator/index.js";
import { openPki, writeIssued } from "../pki/index.js";

const JOBS = Number(process.argv[2] ?? 500);
const NODES = 4;
const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-bench-"));
const logger = createLogger({ level: "error" });

const config = await loadConfig({
  env: {},
  overrides: [
    `DataDir=${dir}/orch`,
    "API.Port=0",
    "API.Host=127.0.0.1",
    "Orchestrator.Port=0",
    "Orchestrator.Host=127.0.0.1",
  ],
});
const orch = new Orchestrator({ config, logger, version: "bench", print: () => {} });
const ep = await orch.start();
const pki = await openPki(ep.pkiDir);
const nodes: ComputeNode[] = [];
for (let i = 0; i < NODES; i++) {
  const prefix = `${dir}/n${i}/identity`;
  await fs.mkdir(path.dirname(prefix), { recursive: true });
  await writeIssued(prefix, await pki.issue({ role: "compute", id: `n${i}` }));
}
await new Promise((r) => setTimeout(r, 1500)); // the broker picks up the new identities
for (let i = 0; i < NODES; i++) {
  const c = await loadConfig({
    env: {},
    overrides: [
      `DataDir=${dir}/n${i}`,
      `Compute.Orchestrators=${ep.natsUrl}`,
      `Compute.TLS.CACert=${ep.caFile}`,
      `Compute.TLS.ClientCert=${dir}/n${i}/identity.crt`,
      `Compute.TLS.ClientKey=${dir}/n${i}/identity.key`,
    ],
  });
  const node = new ComputeNode({ config: c, logger });
  await node.start();
  nodes.push(node);
}

// Baseline: raw NATS request/reply RTT over an mTLS connection to the same broker.
const idPrefix = `${dir}/bench-rtt`;
await writeIssued(idPrefix, await pki.issue({ role: "orchestrator", id: "bench" }));
await new Promise((r) => setTimeout(r, 1500));
const fabric = await connectFabric({
  servers: ep.natsUrl,
  caFile: ep.caFile,
  certFile: `${idPrefix}.crt`,
  keyFile: `${idPrefix}.key`,
  identity: `spiffe://${pki.trustDomain}/orchestrator/bench`,
});
const echo = fabric.nc.subscribe("shoal.broadcast.bench-rtt", {
  callback: (_e, m) => {
    m.respond(m.data);
  },
});
const rtts: number[] = [];
for (let i = 0; i < 2000; i++) {
  const t0 = performance.now();
  await fabric.nc.request("shoal.broadcast.bench-rtt", "x", { timeout: 2000 });
  rtts.push(performance.now() - t0);
}
echo.unsubscribe();

const agent = new Agent({ ca: await fs.readFile(ep.caFile), keepAlive: true });
const call = (method: string, p: string, body?: unknown) =>
  new Promise<string>((resolve, reject) => {
    const req = request(
      `${ep.apiUrl}/api/v1/${p}`,
      { method, agent, headers: body ? { "content-type": "application/json" } : {} },
      (res) => {
        let text = "";
        res.on("data", (d) => {
          text += d;
        });
        res.on("end", () => resolve(text));
      },
    );
    req.on("error", reject);
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
const spec = wasmJobSpec({ name: "bench", module: await fs.readFile("dist/wasm/hello.wasm") });

/** Submits one job and waits for its final state on the streaming history endpoint. */
async function runOne(): Promise<number> {
  const t0 = performance.now();
  const { JobID } = JSON.parse(await call("PUT", "orchestrator/jobs", { Job: spec })) as { JobID: string };
  const text = await call("GET", `orchestrator/jobs/${JobID}/history?follow=true`);
  const last = JSON.parse(text.trim().split("\n").at(-1)!) as { Job: { State: string } };
  if (last.Job.State !== "Completed") throw new Error(`job ${JobID} ended ${last.Job.State}`);
  return performance.now() - t0;
}

for (let i = 0; i < 20; i++) await runOne(); // warm-up (WASM compile caches, JIT)
const latencies: number[] = [];
for (let i = 0; i < JOBS; i++) latencies.push(await runOne());
const start = performance.now();
let next = 0;
await Promise.all(
  Array.from({ length: 32 }, async () => {
    while (next++ < JOBS) await runOne();
  }),
);
const throughput = JOBS / ((performance.now() - start) / 1000);

const pct = (xs: number[], p: number) =>
  [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * p))]!;
const rttP50 = pct(rtts, 0.5);
const p50 = pct(latencies, 0.5);
const p99 = pct(latencies, 0.99);
console.log(
  `raw NATS request/reply RTT      p50 ${rttP50.toFixed(3)} ms  p99 ${pct(rtts, 0.99).toFixed(3)} ms`,
);
console.log(
  `job submit→Completed (${JOBS})   p50 ${p50.toFixed(2)} ms (${(p50 / rttP50).toFixed(1)}× RTT, target ≤ 10 ms)  p99 ${p99.toFixed(2)} ms (target ≤ 50 ms)`,
);
console.log(`sustained, 32 clients, ${NODES} nodes  ${throughput.toFixed(0)} jobs/s (target ≥ 300)`);

await fabric.close();
agent.destroy();
for (const n of nodes) await n.close();
await orch.close();
await fs.rm(dir, { recursive: true, force: true });
