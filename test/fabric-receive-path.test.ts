import "reflect-metadata";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { Value } from "@sinclair/typebox/value";
import fc from "fast-check";
import t from "tap";
import {
  BODY_SCHEMAS,
  EnvelopeSigner,
  EnvelopeVerifier,
  FABRIC_CODES,
  isValidBody,
  type MessageBody,
  type MessageKind,
  PeerCertificateCache,
  ReplayGuard,
  subjects,
} from "../fabric/index.js";
import { initPki, openPki } from "../pki/index.js";

// The receive path's caches (verified peers by fingerprint, parsed headers, the
// replay guard's lazy sweep, compiled body checks) must never let through what a
// fresh verifier would refuse.

const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-receive-"));
t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
await initPki(path.join(dir, "pki"), { trustDomain: "test.local" });
const pki = await openPki(path.join(dir, "pki"));
const DAY = 86_400_000;
const n1 = pki.mint({ role: "compute", id: "n1" });
const orch = pki.mint({ role: "orchestrator", id: "o1" });
const ORCH = orch.spiffeId as string;
const HB = subjects.computeOut("n1", "heartbeat");
const heartbeat: MessageBody<"heartbeat"> = {
  nodeId: "n1",
  seq: 1,
  allocated: { cpu: 0, memory: 0 },
  running: [],
};

function setup(now: () => number = Date.now, certPem = n1.certPem, keyPem = n1.keyPem as string) {
  const peers = new PeerCertificateCache({ caPem: pki.caCertPem, trustDomain: "test.local", now });
  const peer = peers.add(certPem);
  const verifier = new EnvelopeVerifier({
    identity: ORCH,
    peers,
    replayGuard: new ReplayGuard({ now }),
    now,
  });
  const signer = new EnvelopeSigner({ keyPem, certPem, now });
  return { peers, peer, verifier, signer };
}

t.test("a cached peer revoked by fingerprint or serial is refused at its next message", async (t) => {
  for (const revoke of [
    (fp: string) => ({ fingerprints: [fp] }),
    () => ({ serials: [n1.serial.toUpperCase()] }),
  ]) {
    const { peers, peer, verifier, signer } = setup();
    verifier.verify(signer.sign("heartbeat", ORCH, heartbeat), { subject: HB });
    // Same header text as the accepted message: the parsed-header cache must not carry the peer.
    const next = signer.sign("heartbeat", ORCH, heartbeat);
    t.equal(peers.revoke(revoke(peer.fingerprint)), 1);
    t.throws(() => verifier.verify(next, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_REVOKED });
    t.throws(() => peers.add(n1.certPem), { code: FABRIC_CODES.SHOAL_ENVELOPE_REVOKED });
  }
});

t.test("a peer removed by identity must present its chain again", async (t) => {
  const { peers, verifier, signer } = setup();
  t.equal(peers.revoke({ identities: [n1.spiffeId as string] }), 1);
  t.throws(() => verifier.verify(signer.sign("heartbeat", ORCH, heartbeat), { subject: HB }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_UNKNOWN_SENDER,
  });
  peers.add(n1.certPem);
  t.ok(verifier.verify(signer.sign("heartbeat", ORCH, heartbeat), { subject: HB }));
});

t.test("a cached certificate that expires is refused without any call to the cache", async (t) => {
  const short = pki.mint({
    role: "compute",
    id: "n1",
    notBefore: new Date(Date.now() - DAY),
    notAfter: new Date(Date.now() + DAY),
  });
  let now = Date.now();
  const { peers, verifier, signer } = setup(() => now, short.certPem, short.keyPem as string);
  t.ok(verifier.verify(signer.sign("heartbeat", ORCH, heartbeat), { subject: HB }), "valid while cached");
  now = short.notAfter.getTime() + 31_000; // past notAfter and the 30 s skew
  t.throws(() => verifier.verify(signer.sign("heartbeat", ORCH, heartbeat), { subject: HB }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_SENDER_CERT,
  });
  // Presenting the expired chain again runs full validation, which refuses it.
  t.throws(() => peers.add(short.certPem), { code: FABRIC_CODES.SHOAL_ENVELOPE_SENDER_CERT });
});

t.test("a cached certificate is refused before its notBefore", async (t) => {
  const future = pki.mint({
    role: "compute",
    id: "n1",
    notBefore: new Date(Date.now() + DAY),
    notAfter: new Date(Date.now() + 3 * DAY),
  });
  let now = Date.now() + 2 * DAY;
  const { verifier, signer } = setup(() => now, future.certPem, future.keyPem as string);
  now = future.notBefore.getTime() - 31_000;
  t.throws(() => verifier.verify(signer.sign("heartbeat", ORCH, heartbeat), { subject: HB }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_SENDER_CERT,
  });
});

t.test("a subject seen before still admits only its own sender and kind", async (t) => {
  const { peers, verifier, signer } = setup();
  const n2 = pki.mint({ role: "compute", id: "n2" });
  peers.add(n2.certPem);
  const signer2 = new EnvelopeSigner({ keyPem: n2.keyPem as string, certPem: n2.certPem });
  t.ok(verifier.verify(signer.sign("heartbeat", ORCH, heartbeat), { subject: HB }));
  t.throws(() => verifier.verify(signer2.sign("heartbeat", ORCH, heartbeat), { subject: HB }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_ROLE,
  });
  t.throws(
    () =>
      verifier.verify(signer.sign("status", ORCH, { executionId: "e1", state: "Running" }), { subject: HB }),
    { code: FABRIC_CODES.SHOAL_ENVELOPE_KIND },
  );
  const reply = signer.sign("run-reply", ORCH, { accepted: true });
  t.ok(verifier.verify(reply, { subject: "_INBOX_o1.abc.1", expectedIss: n1.spiffeId as string }));
  t.throws(
    () =>
      verifier.verify(signer.sign("run-reply", ORCH, { accepted: true }), {
        subject: "_INBOX_n9.abc.2",
        expectedIss: n1.spiffeId as string,
      }),
    { code: FABRIC_CODES.SHOAL_ENVELOPE_ROLE },
  );
});

t.test("bytes and text verify alike; one altered byte is refused; the size limit counts bytes", async (t) => {
  const { peers, verifier, signer } = setup();
  const token = signer.sign("heartbeat", ORCH, heartbeat);
  const bytes = new TextEncoder().encode(token);
  // As NATS hands it over: a view into a larger buffer.
  const framed = new Uint8Array(bytes.length + 20);
  framed.set(bytes, 10);
  const env = verifier.verify(framed.subarray(10, 10 + bytes.length), { subject: HB });
  t.same(env.body, heartbeat);
  t.throws(() => verifier.verify(token, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_REPLAY });
  const other = new TextEncoder().encode(signer.sign("heartbeat", ORCH, heartbeat));
  const i = other.indexOf(0x2e) + 5;
  other[i] = other[i] === 0x41 ? 0x42 : 0x41;
  t.throws(() => verifier.verify(other, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_SIGNATURE });
  const small = new EnvelopeVerifier({
    identity: ORCH,
    peers,
    replayGuard: new ReplayGuard(),
    maxBytes: 600,
  });
  const wide = "é".repeat(400); // 400 characters, 800 bytes
  t.throws(() => small.verify(wide, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_TOO_LARGE });
  t.throws(() => verifier.verify(new Uint8Array([0x61, 0x2e, 0x62]), { subject: HB }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_MALFORMED,
  });
});

t.test("envelopes decoded in the shared scratch buffer and past it keep their own bodies", async (t) => {
  const { verifier, signer } = setup();
  // Claims longer than the 64 KiB the scratch buffer decodes take their own buffer.
  const big = {
    ...heartbeat,
    running: Array.from({ length: 2500 }, (_, i) => `e-${String(i).padStart(30, "0")}`),
  };
  const small = { ...heartbeat, seq: 2, running: ["e-1"] };
  const bigToken = signer.sign("heartbeat", ORCH, big);
  t.ok(bigToken.length > 90_000, "past the scratch buffer");
  const first = verifier.verify(new TextEncoder().encode(signer.sign("heartbeat", ORCH, small)), {
    subject: HB,
  });
  const second = verifier.verify(bigToken, { subject: HB });
  const third = verifier.verify(signer.sign("heartbeat", ORCH, heartbeat), { subject: HB });
  t.same(first.body, small, "a body does not change when the next envelope is decoded");
  t.same(second.body, big);
  t.same(third.body, heartbeat);
  // A character inside the signature (the last one carries bits the decoder drops).
  const at = bigToken.length - 10;
  const tampered = `${bigToken.slice(0, at)}${bigToken[at] === "A" ? "B" : "A"}${bigToken.slice(at + 1)}`;
  t.throws(() => verifier.verify(tampered, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_SIGNATURE });
});

t.test("the replay guard sweeps lazily but never forgets a live id, and stays bounded", async (t) => {
  let now = 1_000_000;
  const guard = new ReplayGuard({ maxEntries: 1000, now: () => now });
  for (let i = 0; i < 100; i++) t.equal(guard.check("a", `old${i}`, now + 100), "fresh");
  t.equal(guard.check("a", "live", now + 60_000), "fresh");
  now += 500;
  t.equal(guard.check("a", "live", now + 60_000), "replay");
  t.equal(guard.size, 101, "no sweep within the interval");
  now += 1000;
  t.equal(guard.check("a", "old1", now + 100), "fresh", "an expired id is forgotten");
  t.equal(guard.size, 2, "the sweep dropped the expired entries");
  t.equal(guard.check("a", "live", now + 60_000), "replay", "a live id survives the sweep");
});

t.test(
  "a full replay guard looks past an issuer's long-lived head, and drops issuers with no ids",
  async (t) => {
    let now = 1_000_000;
    const guard = new ReplayGuard({ maxEntries: 3, maxPerIssuer: 3, now: () => now });
    t.equal(guard.check("a", "long", now + 60_000), "fresh");
    t.equal(guard.check("a", "short1", now + 100), "fresh");
    t.equal(guard.check("b", "short2", now + 100), "fresh");
    t.equal(guard.check("c", "j", now + 100), "full");
    now += 1500;
    t.equal(guard.check("c", "j", now + 100), "fresh", "the expired ids behind a's live head were swept");
    t.equal(guard.size, 2);
    t.equal(guard.check("a", "long", now + 60_000), "replay", "the live head stays");
    t.equal(guard.check("b", "short2", now + 100), "fresh", "b's expired id is forgotten");
  },
);

t.test("compiled body checks agree with the schemas", async (t) => {
  const kinds = Object.keys(BODY_SCHEMAS) as MessageKind[];
  fc.assert(
    fc.property(fc.constantFrom(...kinds), fc.anything(), (kind, body) => {
      return isValidBody(kind, body) === Value.Check(BODY_SCHEMAS[kind], body);
    }),
    { numRuns: 500 },
  );
  // Value.Create cannot make a string that must match a pattern: such bodies get a sample here.
  const samples: Partial<Record<MessageKind, unknown>> = {
    module: { executionId: "e-1", digest: `sha256:${"0".repeat(64)}`, offset: 0 },
  };
  for (const kind of kinds) {
    const sample = samples[kind] ?? Value.Create(BODY_SCHEMAS[kind]);
    t.equal(isValidBody(kind, sample), Value.Check(BODY_SCHEMAS[kind], sample), kind);
  }
  t.ok(isValidBody("heartbeat", heartbeat));
  t.notOk(isValidBody("heartbeat", { ...heartbeat, seq: -1 }));
});

t.test("a register body's labels must follow the operator's label rules", async (t) => {
  const register = {
    ...Value.Create(BODY_SCHEMAS.register),
    labels: { zone: "eu", "topology.io/rack": "r1" },
  };
  t.ok(isValidBody("register", register));
  const labelled = (labels: Record<string, string>) => isValidBody("register", { ...register, labels });
  t.notOk(labelled({ "bad key": "x" }), "a key with a space");
  t.notOk(labelled({ _hidden: "x" }), "a key not starting with a letter or digit");
  t.notOk(labelled({ ["k".repeat(129)]: "x" }), "a key of 129 characters");
  t.notOk(labelled({ zone: "v".repeat(257) }), "a value of 257 characters");
  t.notOk(labelled(Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, "v"]))), "65 labels");
});
