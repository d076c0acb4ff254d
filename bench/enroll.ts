/**
 * Time to enroll N compute nodes (default 100) against a real orchestrator
 * (in this process: its HTTPS API, its PKI on disk, the supervised
 * nats-server), each with its own single-use join token and its own data
 * directory: pinned CA fetch, P-256 key, CSR, POST /api/v1/enroll, chain
 * check, tls/ written. Sequentially and 10 at a time, beside the same-run
 * baseline of `Pki.issue` (key + certificate + locked inventory record, no
 * network). Then the time from an enrollment's answer to the broker
 * accepting that identity (the answer now waits for the broker users and
 * reload, so this is the TLS connection itself).
 *
 *   node --import @tapjs/typescript/import bench/enroll.ts [NODES=100]
 */
import "reflect-metadata";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { ensureEnrolled } from "../compute/index.js";
import { createLogger } from "../core/index.js";
import { connectFabric } from "../fabric/index.js";
import { createJoinToken, openPki } from "../pki/index.js";
import { startBenchOrchestrator } from "./loopback-orchestrator.js";

const NODES = Number(process.argv[2] ?? 100);
const CONCURRENCY = 10;
const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-bench-enroll-"));
const logger = createLogger({ level: "error" });

const { orch, ep } = await startBenchOrchestrator(`${dir}/orch`, logger);
const pki = await openPki(ep.pkiDir);

async function enrollOne(name: string): Promise<string> {
  const { token } = await createJoinToken(ep.pkiDir);
  const dataDir = path.join(dir, name);
  await ensureEnrolled({
    dataDir,
    join: { token, caFingerprint: ep.caFingerprint, nodeId: name },
    api: ep.apiUrl,
    orchestrators: [],
    configured: { caCert: "", clientCert: "", clientKey: "" },
    log: logger,
  });
  return dataDir;
}

// Warm-up: JIT, TLS session setup paths.
for (let i = 0; i < 5; i++) await enrollOne(`warm-${i}`);

let t0 = performance.now();
for (let i = 0; i < NODES; i++) await pki.issue({ role: "compute", id: `base-${i}` });
const baselineMs = performance.now() - t0;

t0 = performance.now();
for (let i = 0; i < NODES; i++) await enrollOne(`seq-${i}`);
const sequentialMs = performance.now() - t0;

t0 = performance.now();
let next = 0;
await Promise.all(
  Array.from({ length: CONCURRENCY }, async () => {
    for (let i = next++; i < NODES; i = next++) await enrollOne(`par-${i}`);
  }),
);
const concurrentMs = performance.now() - t0;

// Enrollment answer → the broker lets that identity in (median of 5).
const admitted: number[] = [];
for (let i = 0; i < 5; i++) {
  const name = `admit-${i}`;
  const start = performance.now();
  const dataDir = await enrollOne(name);
  const enrolledAt = performance.now();
  for (;;) {
    const fabric = await connectFabric({
      servers: ep.natsUrl,
      caFile: path.join(dataDir, "tls", "ca.crt"),
      certFile: path.join(dataDir, "tls", "node.crt"),
      keyFile: path.join(dataDir, "tls", "node.key"),
      identity: `spiffe://${pki.trustDomain}/compute/${name}`,
      connectTimeoutMs: 2000,
    }).catch(() => undefined);
    if (fabric) {
      admitted.push(performance.now() - enrolledAt);
      await fabric.close();
      break;
    }
    if (performance.now() - start > 10_000) throw new Error(`${name} not admitted within 10 s`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
admitted.sort((a, b) => a - b);

const per = (ms: number) => (ms / NODES).toFixed(1);
console.log(
  `Pki.issue baseline (${NODES})            ${baselineMs.toFixed(0)} ms  (${per(baselineMs)} ms each)`,
);
console.log(
  `enroll ${NODES} nodes, one after another   ${sequentialMs.toFixed(0)} ms  (${per(sequentialMs)} ms each, ${(sequentialMs / baselineMs).toFixed(1)}× baseline)`,
);
console.log(
  `enroll ${NODES} nodes, ${CONCURRENCY} at a time         ${concurrentMs.toFixed(0)} ms  (${(NODES / (concurrentMs / 1000)).toFixed(0)} nodes/s, ${(concurrentMs / baselineMs).toFixed(1)}× baseline)`,
);
console.log(
  `enrolled → broker admits the identity   median ${admitted[2]!.toFixed(0)} ms, max ${admitted[4]!.toFixed(0)} ms (target ≤ 1000 ms)`,
);

await orch.close();
await fs.rm(dir, { recursive: true, force: true });
