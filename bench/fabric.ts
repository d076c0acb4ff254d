import "reflect-metadata";
import { spawn } from "node:child_process";
import { verify as cryptoVerify, X509Certificate } from "node:crypto";
import { readFile } from "node:fs/promises";
import { cpus, loadavg } from "node:os";
import { createInterface } from "node:readline";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import {
  connectFabric,
  EnvelopeSigner,
  EnvelopeVerifier,
  type MessageBody,
  PeerCertificateCache,
  ReplayGuard,
  subjects,
} from "../fabric/index.js";
import { startTestFabric } from "../test/helpers/nats.js";

// Signed envelopes vs raw mTLS NATS vs plaintext NATS, same payload, same run, one
// process (publisher, subscriber and verifier share one core; nats-server runs beside).
const N = Number(process.env.BENCH_N ?? 40_000);

const teardowns: (() => unknown)[] = [];
const fabric = await startTestFabric({ teardown: (fn) => teardowns.push(fn) }, { jetStream: false });
const node = await fabric.identity("compute", "n1");
const orch = await fabric.identity("orchestrator", "o1");

const heartbeat: MessageBody<"heartbeat"> = {
  nodeId: "n1",
  seq: 1,
  allocated: { cpu: 1.5, memory: 2 ** 30 },
  running: ["e-0001", "e-0002", "e-0003"],
};
const signer = new EnvelopeSigner({
  keyPem: await readFile(node.keyFile, "utf8"),
  certPem: await readFile(node.certFile, "utf8"),
});
const makeVerifier = () => {
  const peers = new PeerCertificateCache({ caPem: fabric.caPem, trustDomain: fabric.trustDomain });
  peers.add(signer.chainPem);
  return new EnvelopeVerifier({ identity: orch.spiffeId, peers, replayGuard: new ReplayGuard() });
};
const subject = subjects.computeOut("n1", "heartbeat");
const sample = signer.sign("heartbeat", orch.spiffeId, heartbeat);
const payload = new TextEncoder().encode(sample);

/** Publishes `count` messages made by `make(i)` and resolves with msgs/s once `sub` received them all. */
async function pubsub(
  pub: NatsConnection,
  sub: NatsConnection,
  make: (i: number) => Uint8Array | string,
  onMsg: (data: Uint8Array) => void = () => {},
): Promise<number> {
  let received = 0;
  let done!: () => void;
  const all = new Promise<void>((r) => {
    done = r;
  });
  const s = sub.subscribe(subject, {
    callback: (_e, m) => {
      onMsg(m.data);
      if (++received === N) done();
    },
  });
  await sub.flush();
  const t0 = performance.now();
  for (let i = 0; i < N; i++) {
    pub.publish(subject, make(i));
    if (i % 1000 === 999) await pub.flush();
  }
  await all;
  const rate = N / ((performance.now() - t0) / 1000);
  s.unsubscribe();
  return rate;
}

// Plaintext NATS, no auth, on a free port.
const plain = spawn("nats-server", ["-a", "127.0.0.1", "-p", "-1"], { stdio: ["ignore", "ignore", "pipe"] });
teardowns.push(() => plain.kill());
const plainPort = await new Promise<number>((resolve) => {
  createInterface({ input: plain.stderr }).on("line", (l) => {
    const m = /Listening for client connections on .*:(\d+)/.exec(l);
    if (m) resolve(Number(m[1]));
  });
});
const pp = await connect({ port: plainPort });
const ps = await connect({ port: plainPort });

const join = (id: typeof node) =>
  connectFabric({
    servers: fabric.url,
    caFile: fabric.caFile,
    certFile: id.certFile,
    keyFile: id.keyFile,
    identity: id.spiffeId,
  });
const nodeConn = await join(node);
const orchConn = await join(orch);

const results: Record<string, number> = {};
// Warm-up (JIT, TLS session, buffers) so the first measured row is not penalised.
await pubsub(pp, ps, () => payload);
await pubsub(nodeConn.nc, orchConn.nc, () => payload);
results.plaintext = await pubsub(pp, ps, () => payload);
results.mtls = await pubsub(nodeConn.nc, orchConn.nc, () => payload);

let verifier = makeVerifier();
let failures = 0;
const verifyMsg = (data: Uint8Array) => {
  try {
    verifier.verify(new TextDecoder().decode(data), { subject });
  } catch {
    failures++;
  }
};
results.signedEndToEnd = await pubsub(
  nodeConn.nc,
  orchConn.nc,
  () => signer.sign("heartbeat", orch.spiffeId, heartbeat),
  verifyMsg,
);
const preSigned = Array.from({ length: N }, () => signer.sign("heartbeat", orch.spiffeId, heartbeat));
verifier = makeVerifier();
results.verifiedDelivery = await pubsub(nodeConn.nc, orchConn.nc, (i) => preSigned[i] as string, verifyMsg);

let t0 = performance.now();
const tokens = Array.from({ length: N }, () => signer.sign("heartbeat", orch.spiffeId, heartbeat));
results.signOnly = N / ((performance.now() - t0) / 1000);
verifier = makeVerifier();
t0 = performance.now();
for (const tok of tokens) verifier.verify(tok, { subject });
results.verifyOnly = N / ((performance.now() - t0) / 1000);

// The crypto ceiling: one bare P-256 verify of the same signing input, no envelope code.
const [h, p, sig] = sample.split(".") as [string, string, string];
const input = Buffer.from(`${h}.${p}`);
const sigBytes = Buffer.from(sig, "base64url");
const publicKey = new X509Certificate(signer.chainPem.split(/(?<=-----END CERTIFICATE-----)/)[0] as string)
  .publicKey;
t0 = performance.now();
for (let i = 0; i < N; i++)
  cryptoVerify("sha256", input, { key: publicKey, dsaEncoding: "ieee-p1363" }, sigBytes);
results.rawVerify = N / ((performance.now() - t0) / 1000);

const fmt = (n: number) => Math.round(n).toLocaleString("en-US").padStart(9);
console.log(`fabric bench: ${N} messages of ${payload.length} bytes (a signed heartbeat), one process`);
console.log(`  plaintext NATS pub/sub            ${fmt(results.plaintext)} msg/s   1.00`);
console.log(
  `  mTLS NATS pub/sub (raw)           ${fmt(results.mtls)} msg/s   ${(results.mtls / results.plaintext).toFixed(2)} of plaintext`,
);
for (const [name, label] of [
  ["signedEndToEnd", "signed: sign+send+deliver+verify"],
  ["verifiedDelivery", "signed: deliver+verify (pre-signed)"],
] as const) {
  const r = results[name] as number;
  console.log(
    `  ${label.padEnd(34)}${fmt(r)} msg/s   ${(r / results.mtls).toFixed(2)} of mTLS, ${(r / results.plaintext).toFixed(2)} of plaintext`,
  );
}
console.log(`  sign only (no NATS)               ${fmt(results.signOnly)} /s`);
console.log(
  `  envelope verify only (no NATS)    ${fmt(results.verifyOnly)} /s   ${(results.verifyOnly / results.rawVerify).toFixed(2)} of bare P-256 verify`,
);
console.log(`  bare P-256 verify (node:crypto)   ${fmt(results.rawVerify)} /s   the ceiling for one core`);
console.log(
  `  load average now: ${loadavg()
    .map((l) => l.toFixed(1))
    .join(" ")} on ${cpus().length} CPUs (absolute numbers are only meaningful on an idle machine)`,
);
console.log(`  verification failures: ${failures}`);

await nodeConn.close();
await orchConn.close();
await pp.close();
await ps.close();
for (const fn of teardowns.reverse()) await fn();
