import "reflect-metadata";
import { type ChildProcess, execFile, fork, spawn } from "node:child_process";
import { verify as cryptoVerify, X509Certificate } from "node:crypto";
import { readFile } from "node:fs/promises";
import { cpus, loadavg } from "node:os";
import { createInterface } from "node:readline";
import { promisify } from "node:util";
import { connect, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import {
  connectFabric,
  EnvelopeSigner,
  EnvelopeVerifier,
  FabricMessenger,
  PeerCertificateCache,
  ReplayGuard,
  subjects,
} from "../fabric/index.js";
import { startTestFabric } from "../test/helpers/nats.js";
import { type FromPublisher, HEARTBEAT, type PublisherRun, type ToPublisher } from "./fabric-publisher.js";

// Signed envelopes vs raw mTLS NATS vs plaintext NATS, same payload, same run. The
// receiver (this process) subscribes the way a daemon does (FabricMessenger); a child
// process signs and publishes, so this process's CPU time is what receiving costs.
// Rates are given per wall-clock second and per second of this process's CPU time
// (user + system, all its threads): on a shared machine the CPU-time rate is the
// "per core" figure, and ratios within one run are what compare across runs.
const N = Number(process.env.BENCH_N ?? 20_000);
const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const WINDOW = 2_000;
/** A phase that makes no progress this long is reported, not waited for. */
const STALL_MS = 60_000;
/** Envelope and bare verifies alternate in chunks of this many. */
const CHUNK = 500;

const loadAtStart = loadavg();
const teardowns: (() => unknown)[] = [];
const fabric = await startTestFabric({ teardown: (fn) => teardowns.push(fn) }, { jetStream: false });
const node = await fabric.identity("compute", "n1");
const orch = await fabric.identity("orchestrator", "o1");
const subject = subjects.computeOut("n1", "heartbeat");

const plain = spawn("nats-server", ["-a", "127.0.0.1", "-p", "-1"], { stdio: ["ignore", "ignore", "pipe"] });
teardowns.push(() => plain.kill());
const plainPort = await new Promise<number>((resolve) => {
  createInterface({ input: plain.stderr }).on("line", (l) => {
    const m = /Listening for client connections on .*:(\d+)/.exec(l);
    if (m) resolve(Number(m[1]));
  });
});

// The publisher: same loader flags as this process, never the profiler's.
const child: ChildProcess = fork(new URL("./fabric-publisher.ts", import.meta.url).pathname, [], {
  execArgv: process.execArgv.filter((a) => !a.startsWith("--cpu-prof")),
});
teardowns.push(() => child.kill());
const inbox: FromPublisher[] = [];
let arrived: (() => void) | undefined;
child.on("message", (m: FromPublisher) => {
  inbox.push(m);
  arrived?.();
});
async function expect(type: FromPublisher["type"]): Promise<FromPublisher> {
  for (;;) {
    const i = inbox.findIndex((m) => m.type === type);
    if (i >= 0) return inbox.splice(i, 1)[0] as FromPublisher;
    await new Promise<void>((r) => (arrived = r));
  }
}
const tell = (m: ToPublisher) => child.send(m);
await expect("up");
tell({
  type: "setup",
  setup: {
    plainPort,
    fabricUrl: fabric.url,
    caFile: fabric.caFile,
    certFile: node.certFile,
    keyFile: node.keyFile,
    identity: node.spiffeId,
    aud: orch.spiffeId,
  },
});
await expect("ready");

const plainConn = await connect({ port: plainPort });
const orchConn = await connectFabric({
  servers: fabric.url,
  caFile: fabric.caFile,
  certFile: orch.certFile,
  keyFile: orch.keyFile,
  identity: orch.spiffeId,
});
// Disconnects or slow-consumer events would make a row meaningless: count them and print them.
const connectionEvents: string[] = [];
void (async () => {
  for await (const s of orchConn.status())
    if (s.type !== "closed")
      connectionEvents.push(s.type === "slow-consumer" ? `slow-consumer(${s.pending})` : s.type);
})();
const nodeSigner = new EnvelopeSigner({
  keyPem: await readFile(node.keyFile, "utf8"),
  certPem: await readFile(node.certFile, "utf8"),
});
const orchSigner = new EnvelopeSigner({
  keyPem: await readFile(orch.keyFile, "utf8"),
  certPem: await readFile(orch.certFile, "utf8"),
});
const makeVerifier = () => {
  const peers = new PeerCertificateCache({ caPem: fabric.caPem, trustDomain: fabric.trustDomain });
  peers.add(nodeSigner.chainPem);
  return new EnvelopeVerifier({ identity: orch.spiffeId, peers, replayGuard: new ReplayGuard() });
};

interface Rate {
  /** Per wall-clock second. */
  readonly wall: number;
  /** Per second of this process's CPU time. */
  readonly cpu: number;
}

/** Runs `fn` (which handles `count` items) and returns its wall-clock and CPU-time rates. */
async function timed(count: number, fn: () => unknown): Promise<Rate> {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  await fn();
  const wall = (performance.now() - t0) / 1000;
  const c = process.cpuUsage(c0);
  return { wall: count / wall, cpu: count / ((c.user + c.system) / 1e6) };
}

let failures = 0;
let payloadBytes = 0;

/** The child publishes `run`; this process receives through `subscribe` until all arrived. */
async function delivered(
  run: Omit<PublisherRun, "n" | "subject" | "window">,
  subscribe: (onMessage: () => void) => Promise<Subscription> | Subscription,
): Promise<Rate> {
  tell({ type: "prepare", run: { ...run, n: N, subject, window: WINDOW } });
  const prepared = await expect("prepared");
  if (prepared.type === "prepared") payloadBytes = prepared.bytes;
  let received = 0;
  let done!: () => void;
  const all = new Promise<void>((r) => {
    done = r;
  });
  const sub = await subscribe(() => {
    received++;
    if (received % 1000 === 0) tell({ type: "received", count: received });
    if (received === N) done();
  });
  let seen = -1;
  let watchdog: NodeJS.Timeout | undefined;
  const stalled = new Promise<never>((_, reject) => {
    watchdog = setInterval(() => {
      if (received === seen)
        reject(new Error(`${run.mode} over ${run.transport}: stalled at ${received} of ${N} messages`));
      seen = received;
    }, STALL_MS);
  });
  const rate = await timed(N, async () => {
    tell({ type: "go" });
    await Promise.race([all, stalled]);
  }).finally(() => clearInterval(watchdog));
  await expect("sent");
  sub.unsubscribe();
  return rate;
}

/**
 * A plain subscription, confirmed by the broker before the publisher is told to go
 * (else the first messages can reach the broker before the SUB and are lost).
 */
const rawSubscription = async (nc: NatsConnection, onMessage: () => void) => {
  const sub = nc.subscribe(subject, { callback: onMessage });
  await nc.flush();
  return sub;
};

const verifiedSubscription = (onMessage: () => void) =>
  new FabricMessenger(orchConn, orchSigner, makeVerifier()).subscribeVerified(subject, onMessage, () => {
    failures++;
    onMessage();
  });

type Row =
  | "plaintext"
  | "mtls"
  | "verifiedDelivery"
  | "signedEndToEnd"
  | "verifyOnly"
  | "signOnly"
  | "bareVerify";

async function oneRun(): Promise<Record<Row, Rate>> {
  const r = {} as Record<Row, Rate>;
  r.plaintext = await delivered({ mode: "raw", transport: "plain" }, (on) => rawSubscription(plainConn, on));
  r.mtls = await delivered({ mode: "raw", transport: "mtls" }, (on) => rawSubscription(orchConn.nc, on));
  r.verifiedDelivery = await delivered({ mode: "presigned", transport: "mtls" }, verifiedSubscription);

  const tokens: string[] = [];
  r.signOnly = await timed(N, () => {
    for (let i = 0; i < N; i++) tokens.push(nodeSigner.sign("heartbeat", orch.spiffeId, HEARTBEAT));
  });
  // The crypto ceiling: a bare P-256 verify of each token's signing input and
  // signature (split and decoded beforehand), no envelope code. Measured in chunks
  // alternating with envelope verifies of the same tokens, so both see the same
  // machine load and their ratio holds even when the load moves.
  const key = {
    key: new X509Certificate(nodeSigner.chainPem.split(/(?<=-----END CERTIFICATE-----)/)[0] as string)
      .publicKey,
    dsaEncoding: "ieee-p1363" as const,
  };
  const split = tokens.map((t) => {
    const d2 = t.lastIndexOf(".");
    return { input: Buffer.from(t.slice(0, d2)), sig: Buffer.from(t.slice(d2 + 1), "base64url") };
  });
  const verifier = makeVerifier();
  const spent = { envelope: { wall: 0, cpu: 0 }, bare: { wall: 0, cpu: 0 } };
  const chunk = (into: { wall: number; cpu: number }, fn: () => void) => {
    const c0 = process.cpuUsage();
    const t0 = performance.now();
    fn();
    into.wall += (performance.now() - t0) / 1000;
    const c = process.cpuUsage(c0);
    into.cpu += (c.user + c.system) / 1e6;
  };
  for (let from = 0; from < N; from += CHUNK) {
    const to = Math.min(N, from + CHUNK);
    chunk(spent.envelope, () => {
      for (let i = from; i < to; i++) verifier.verify(tokens[i] as string, { subject });
    });
    chunk(spent.bare, () => {
      for (let i = from; i < to; i++) {
        const t = split[i] as { input: Buffer; sig: Buffer };
        cryptoVerify("sha256", t.input, key, t.sig);
      }
    });
  }
  r.verifyOnly = { wall: N / spent.envelope.wall, cpu: N / spent.envelope.cpu };
  r.bareVerify = { wall: N / spent.bare.wall, cpu: N / spent.bare.cpu };
  // After the verifies, so deliver + verify and the ceiling are measured back to back.
  r.signedEndToEnd = await delivered({ mode: "live", transport: "mtls" }, verifiedSubscription);
  return r;
}

// Warm-up (JIT, TLS buffers, the child's code) so the first measured run is not penalised.
await delivered({ mode: "raw", transport: "mtls" }, (on) => rawSubscription(orchConn.nc, on));
await delivered({ mode: "presigned", transport: "mtls" }, verifiedSubscription);

/**
 * OpenSSL's own P-256 verify rate on this CPU (`openssl speed` divides by the CPU
 * time it used, so other processes' load does not lower it): the ceiling under the
 * bare node:crypto verify. Run before and after the rows; both are printed.
 */
async function opensslVerifyRate(): Promise<number> {
  const { stdout } = await promisify(execFile)("openssl", ["speed", "-seconds", "3", "ecdsap256"]);
  const m = /nistp256\)\s+\S+\s+\S+\s+\S+\s+([\d.]+)/.exec(stdout);
  if (!m) throw new Error(`cannot read the verify rate in openssl speed's output:\n${stdout}`);
  return Number(m[1]);
}

const opensslRates = [await opensslVerifyRate()];
const runs: Record<Row, Rate>[] = [];
for (let i = 0; i < RUNS; i++) runs.push(await oneRun());
opensslRates.push(await opensslVerifyRate());

const LABELS: Record<Row, string> = {
  plaintext: "plaintext NATS pub/sub",
  mtls: "mTLS NATS pub/sub (raw)",
  verifiedDelivery: "signed: deliver+verify (pre-signed)",
  signedEndToEnd: "signed: sign+send+deliver+verify",
  verifyOnly: "envelope verify only (no NATS)",
  signOnly: "sign only (no NATS)",
  bareVerify: "bare P-256 verify (node:crypto)",
};
const fmt = (n: number) => Math.round(n).toLocaleString("en-US");
/** "best (min–max)" over the runs. */
const spread = (xs: number[], f: (n: number) => string) =>
  `${f(Math.max(...xs))} (${f(Math.min(...xs))}–${f(Math.max(...xs))})`;
const ratio = (n: number) => n.toFixed(2);

console.log(
  `fabric bench: ${N} messages of ${payloadBytes} bytes (a signed heartbeat) per row, ${RUNS} runs; publisher in a child process`,
);
console.log("  rates: best (min–max) over the runs; cpu = per second of the receiving process's CPU time");
console.log(`  ${"".padEnd(38)}${"wall msg/s".padEnd(28)}cpu msg/s`);
for (const row of Object.keys(LABELS) as Row[]) {
  console.log(
    `  ${LABELS[row].padEnd(38)}${spread(
      runs.map((r) => r[row].wall),
      fmt,
    ).padEnd(28)}${spread(
      runs.map((r) => r[row].cpu),
      fmt,
    )}`,
  );
}
console.log("  same-run ratios, best (min–max):");
const ratios: [string, (r: Record<Row, Rate>) => number][] = [
  ["deliver+verify cpu rate / bare verify cpu rate", (r) => r.verifiedDelivery.cpu / r.bareVerify.cpu],
  ["envelope verify / bare verify (cpu)", (r) => r.verifyOnly.cpu / r.bareVerify.cpu],
  ["deliver+verify / raw mTLS (wall)", (r) => r.verifiedDelivery.wall / r.mtls.wall],
  ["sign+send+deliver+verify / raw mTLS (wall)", (r) => r.signedEndToEnd.wall / r.mtls.wall],
  ["raw mTLS / plaintext (wall)", (r) => r.mtls.wall / r.plaintext.wall],
];
for (const [label, f] of ratios) console.log(`  ${label.padEnd(50)}${spread(runs.map(f), ratio)}`);

// Where a verified envelope's CPU time goes on the receiving core, per run: the
// signature check, the envelope's other work (decode, claims, replay cache), NATS
// delivery as the raw mTLS row pays it, and what is left (the messenger, and the JS
// between verifies slowing the verify down). The rows of a run are measured one after
// another, so when the load moves between them the rest absorbs it (even below 0).
const us = (x: number) => x.toFixed(1);
console.log(
  "  per verified envelope, µs of the receiver's CPU: signature (bare verify) + envelope work (verify only - bare) + NATS (raw mTLS) + rest = deliver+verify",
);
for (const r of runs) {
  const sig = 1e6 / r.bareVerify.cpu;
  const work = 1e6 / r.verifyOnly.cpu - sig;
  const nats = 1e6 / r.mtls.cpu;
  const total = 1e6 / r.verifiedDelivery.cpu;
  console.log(`    ${us(sig)} + ${us(work)} + ${us(nats)} + ${us(total - sig - work - nats)} = ${us(total)}`);
}
const ossl = Math.max(...opensslRates);
console.log(
  `  openssl speed ecdsap256 (CPU time): ${opensslRates.map(fmt).join(" before, ")} after verifies/s; ` +
    `bare node verify / openssl ${ratio(Math.max(...runs.map((r) => r.bareVerify.cpu)) / ossl)}, ` +
    `deliver+verify / openssl ${ratio(Math.max(...runs.map((r) => r.verifiedDelivery.cpu)) / ossl)}; ` +
    `target 15,000/s = ${ratio(15_000 / ossl)} × openssl`,
);
const loads = (l: number[]) => l.map((x) => x.toFixed(1)).join(" ");
console.log(
  `  load average at start: ${loads(loadAtStart)}, at end: ${loads(loadavg())} on ${cpus().length} CPUs; ` +
    `verification failures: ${failures}; receiver connection events: ${connectionEvents.join(", ") || "none"}`,
);

tell({ type: "exit" });
await orchConn.close();
await plainConn.close();
for (const fn of teardowns.reverse()) await fn();
