import "reflect-metadata";
import { readFile } from "node:fs/promises";
import { type Logger, pino } from "pino";
import t from "tap";
import {
  connectFabric,
  EnvelopeSigner,
  EnvelopeVerifier,
  FABRIC_CODES,
  type FabricError,
  FabricMessenger,
  PeerCertificateCache,
  type Rate,
  ReplayGuard,
  subjects,
} from "../fabric/index.js";
import { startTestFabric, type TestIdentity } from "./helpers/nats.js";
import { resultMessages } from "./helpers/records.js";

const fabric = await startTestFabric(t, { jetStream: false });
const n1 = await fabric.identity("compute", "n1");
const n2 = await fabric.identity("compute", "n2");
const orch = await fabric.identity("orchestrator", "o1");

async function messenger(
  id: TestIdentity,
  peers: TestIdentity[],
  rate?: Rate,
  logger?: Logger,
): Promise<FabricMessenger> {
  const conn = await connectFabric({
    servers: fabric.url,
    caFile: fabric.caFile,
    certFile: id.certFile,
    keyFile: id.keyFile,
    identity: id.spiffeId,
  });
  t.teardown(() => conn.close());
  const cache = new PeerCertificateCache({ caPem: fabric.caPem, trustDomain: fabric.trustDomain });
  for (const p of peers) cache.add(p.issued.certPem);
  const signer = new EnvelopeSigner({
    keyPem: await readFile(id.keyFile, "utf8"),
    certPem: await readFile(id.certFile, "utf8"),
  });
  const verifier = new EnvelopeVerifier({
    identity: id.spiffeId,
    peers: cache,
    replayGuard: new ReplayGuard(),
  });
  return new FabricMessenger(conn, signer, verifier, logger, rate);
}

const node = await messenger(n1, [orch]);
const node2 = await messenger(n2, [orch]);
const orchestrator = await messenger(orch, [n1, n2]);

t.test("a signed request to a node gets a verified signed reply from that node", async (t) => {
  const sub = await node.subscribeVerified(subjects.computeIn("n1"), (env, reply) => {
    t.equal(env.iss, orch.spiffeId);
    t.equal(env.kind, "cancel");
    reply?.respond("run-reply", { accepted: true });
  });
  t.teardown(() => sub.unsubscribe());
  const reply = await orchestrator.requestSigned(subjects.computeIn("n1"), "cancel", n1.spiffeId, {
    executionId: "e1",
    reason: "test",
  });
  t.equal(reply.iss, n1.spiffeId);
  t.same(reply.body, { accepted: true });
});

t.test("the orchestrator drops what n2 signs on n1's behalf and keeps n1's own", async (t) => {
  const refused: FabricError[] = [];
  const accepted: string[] = [];
  let seen!: () => void;
  const both = new Promise<void>((r) => {
    seen = r;
  });
  const check = () => accepted.length + refused.length === 1 && seen();
  const sub = await orchestrator.subscribeVerified(
    subjects.computeOutAny,
    (env) => {
      accepted.push(env.iss);
      check();
    },
    (err) => {
      refused.push(err);
      check();
    },
  );
  t.teardown(() => sub.unsubscribe());
  // n2 cannot publish on n1's subject at all (broker), so it tries on its own subject with n1's nodeId:
  // accepted as n2's message — the identity comes from the certificate, not the body.
  node2.publishSigned(subjects.computeOut("n2", "heartbeat"), "heartbeat", orch.spiffeId, {
    nodeId: "n1",
    seq: 1,
    allocated: { cpu: 0, memory: 0 },
    running: [],
  });
  await both;
  t.same(accepted, [n2.spiffeId], "attributed to n2, whatever the body says");
  t.same(refused, []);
});

t.test("a replayed copy of a genuine n1 message is delivered once", async (t) => {
  const accepted: number[] = [];
  let onRefused!: (e: FabricError) => void;
  const refused = new Promise<FabricError>((r) => {
    onRefused = r;
  });
  const sub = await orchestrator.subscribeVerified(
    subjects.computeOut("n1", "heartbeat"),
    (env) => {
      accepted.push((env.body as { seq: number }).seq);
    },
    (err) => onRefused(err),
  );
  t.teardown(() => sub.unsubscribe());
  const token = node.signer.sign("heartbeat", orch.spiffeId, {
    nodeId: "n1",
    seq: 2,
    allocated: { cpu: 0, memory: 0 },
    running: [],
  });
  node.connection.publish(subjects.computeOut("n1", "heartbeat"), token);
  node.connection.publish(subjects.computeOut("n1", "heartbeat"), token);
  t.equal((await refused).code, FABRIC_CODES.SHOAL_ENVELOPE_REPLAY);
  t.same(accepted, [2]);
});

t.test("a handler that throws or rejects is logged and later messages still arrive", async (t) => {
  const lines: { msg: string; kind?: string }[] = [];
  const logger = pino({ level: "error" }, { write: (s: string) => lines.push(JSON.parse(s)) });
  const logged = new FabricMessenger(
    orchestrator.connection,
    orchestrator.signer,
    orchestrator.verifier,
    logger,
  );
  const seqs: number[] = [];
  let third!: () => void;
  const done = new Promise<void>((r) => {
    third = r;
  });
  const sub = await logged.subscribeVerified(subjects.computeOut("n1", "heartbeat"), (env) => {
    const seq = (env.body as { seq: number }).seq;
    seqs.push(seq);
    if (seq === 1) throw new Error("sync failure");
    if (seq === 2) return Promise.reject(new Error("async failure"));
    third();
  });
  t.teardown(() => sub.unsubscribe());
  for (const seq of [1, 2, 3])
    node.publishSigned(subjects.computeOut("n1", "heartbeat"), "heartbeat", orch.spiffeId, {
      nodeId: "n1",
      seq,
      allocated: { cpu: 0, memory: 0 },
      running: [],
    });
  await done;
  await new Promise((r) => setImmediate(r));
  t.same(seqs, [1, 2, 3]);
  t.same(
    lines.map((l) => [l.msg, l.kind]),
    [
      ["handler failed", "heartbeat"],
      ["handler failed", "heartbeat"],
    ],
  );
});

t.test(
  "a messenger given a rate sends in order within it, a request after what was queued before",
  async (t) => {
    const paced = await messenger(n1, [orch], { perSecond: 100, burst: 5 });
    const arrived: string[] = [];
    const subs = await Promise.all([
      orchestrator.subscribeVerified(subjects.computeOut("n1", "logs"), (env) => {
        arrived.push(`logs ${(env.body as { seq: number }).seq}`);
      }),
      orchestrator.subscribeVerified(subjects.computeOut("n1", "result"), (env, reply) => {
        arrived.push(env.kind);
        reply?.respond("result-reply", { stored: true });
      }),
    ]);
    t.teardown(() => {
      for (const sub of subs) sub.unsubscribe();
    });
    const logs = (seq: number) => ({ executionId: "e1", stream: "stdout" as const, seq, data: "" });
    const start = performance.now();
    for (let seq = 0; seq < 20; seq++) {
      paced.publishSigned(subjects.computeOut("n1", "logs"), "logs", orch.spiffeId, logs(seq));
    }
    const inTurn = paced
      .publishSignedInTurn(subjects.computeOut("n1", "logs"), "logs", orch.spiffeId, logs(20))
      .then(() => performance.now() - start);
    const reply = await paced.requestSigned(
      subjects.computeOut("n1", "result"),
      "result",
      orch.spiffeId,
      resultMessages("e1", []).manifest,
    );
    t.equal(reply.kind, "result-reply");
    t.ok((await inTurn) >= 150, "the 16th message past the burst of 5 waits its turn at 100/s");
    t.same(
      arrived,
      [...Array.from({ length: 21 }, (_, i) => `logs ${i}`), "result"],
      "nothing dropped or reordered; the request went after the publishes queued before it",
    );
  },
);

t.test("sends still waiting their turn when the connection closes are dropped quietly", async (t) => {
  const lines: { level: number; msg: string }[] = [];
  const logger = pino({ level: "debug" }, { write: (line: string) => lines.push(JSON.parse(line)) });
  const paced = await messenger(n1, [orch], { perSecond: 100, burst: 1 }, logger);
  for (let seq = 0; seq < 5; seq++) {
    paced.publishSigned(subjects.computeOut("n1", "logs"), "logs", orch.spiffeId, {
      executionId: "e1",
      stream: "stdout",
      seq,
      data: "",
    });
  }
  await paced.connection.close();
  await new Promise((r) => setTimeout(r, 100));
  const failed = lines.filter((l) => l.msg === "cannot publish");
  t.equal(failed.length, 4, "the four past the burst found the connection closed");
  t.ok(
    failed.every((l) => l.level === 20),
    "at debug, not a warning each",
  );
});

t.test("sends refused while the connection drains on close are logged at debug too", async (t) => {
  const lines: { level: number; msg: string }[] = [];
  const logger = pino({ level: "debug" }, { write: (line: string) => lines.push(JSON.parse(line)) });
  const sender = await messenger(n1, [orch], undefined, logger);
  let closed = false;
  const closing = sender.connection.close().then(() => (closed = true));
  // Once its subscriptions are drained, nats.js refuses publishes for a round
  // trip more before it calls the connection closed: send through all of it.
  for (let seq = 0; !closed && seq < 100_000; seq++) {
    sender.publishSigned(subjects.computeOut("n1", "logs"), "logs", orch.spiffeId, {
      executionId: "e1",
      stream: "stdout",
      seq,
      data: "",
    });
    await new Promise((r) => setImmediate(r));
  }
  await closing;
  const refused = lines.filter((l) => l.msg === "cannot publish");
  t.ok(refused.length > 0, "some sends were refused");
  t.same(
    refused.filter((l) => l.level !== 20),
    [],
    "every refusal at debug",
  );
});

t.test("a message larger than the broker's max_payload is refused with its own code", async (t) => {
  const lines: { level: number; msg: string; err?: { code?: string } }[] = [];
  const logger = pino({ level: "debug" }, { write: (line: string) => lines.push(JSON.parse(line)) });
  const sender = await messenger(n1, [orch], undefined, logger);
  const maxPayload = sender.connection.nc.info!.max_payload;
  t.equal(maxPayload, 1024 * 1024, "the supervised broker allows 1 MiB");
  const body = { executionId: "e1", stream: "stdout" as const, seq: 0, data: "x".repeat(maxPayload) };
  const subject = subjects.computeOut("n1", "logs");
  const tooLarge = { code: FABRIC_CODES.SHOAL_NATS_MAX_PAYLOAD, details: { subject, maxPayload } };
  await t.rejects(
    sender.publishSignedInTurn(subject, "logs", orch.spiffeId, body),
    tooLarge,
    "in turn: rejects",
  );
  await t.rejects(
    sender.requestSigned(subjects.computeOut("n1", "result"), "result", orch.spiffeId, {
      ...resultMessages("e1", []).manifest,
      stdout: "x".repeat(maxPayload),
    }),
    { code: FABRIC_CODES.SHOAL_NATS_MAX_PAYLOAD },
    "a request: rejects",
  );
  sender.publishSigned(subject, "logs", orch.spiffeId, body);
  const warned = lines.find((l) => l.msg === "cannot publish");
  t.equal(warned?.level, 40, "fire and forget: a warning");
  t.equal(warned?.err?.code, FABRIC_CODES.SHOAL_NATS_MAX_PAYLOAD, "naming the code");
  // The connection is still good for messages that fit.
  let seen: (seq: number) => void = () => {};
  const arrived = new Promise<number>((resolve) => {
    seen = resolve;
  });
  const sub = await orchestrator.subscribeVerified(subject, (env) => seen((env.body as { seq: number }).seq));
  t.teardown(() => sub.unsubscribe());
  sender.publishSigned(subject, "logs", orch.spiffeId, { ...body, seq: 7, data: "fits" });
  t.equal(await arrived, 7);
});
