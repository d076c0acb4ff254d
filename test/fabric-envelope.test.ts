import "reflect-metadata";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { CompactSign, compactVerify } from "jose";
import t from "tap";
import { fitForManifest, MAX_RESULT_OUTPUT_JSON_BYTES } from "../compute/engine-runner.js";
import { MAX_RESULT_MANIFEST_JSON_BYTES } from "../compute/engines/index.js";
import {
  broadcastAudience,
  DEFAULT_MAX_ENVELOPE_BYTES,
  EnvelopeSigner,
  EnvelopeVerifier,
  FABRIC_CODES,
  type MessageBody,
  PeerCertificateCache,
  RESULT_LOG_TAIL_BYTES,
  ReplayGuard,
  subjects,
} from "../fabric/index.js";
import { type IssuedCertificate, initPki, openPki } from "../pki/index.js";

const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-envelope-"));
t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
await initPki(path.join(dir, "pki"), { trustDomain: "test.local" });
const pki = await openPki(path.join(dir, "pki"));
const n1 = pki.mint({ role: "compute", id: "n1" });
const n2 = pki.mint({ role: "compute", id: "n2" });
const orch = pki.mint({ role: "orchestrator", id: "o1" });
const ORCH = orch.spiffeId as string;
const N1 = n1.spiffeId as string;

const heartbeat: MessageBody<"heartbeat"> = {
  nodeId: "n1",
  seq: 1,
  allocated: { cpu: 0, memory: 0 },
  running: [],
};
const HB = subjects.computeOut("n1", "heartbeat");

function signer(c: IssuedCertificate, now?: () => number) {
  return new EnvelopeSigner({ keyPem: c.keyPem as string, certPem: c.certPem, ...(now ? { now } : {}) });
}

/** The orchestrator's verifier, with n1 and n2 registered. */
function orchestratorVerifier(now: () => number = Date.now) {
  const peers = new PeerCertificateCache({ caPem: pki.caCertPem, trustDomain: "test.local", now });
  peers.add(n1.certPem);
  peers.add(n2.certPem);
  const verifier = new EnvelopeVerifier({
    identity: ORCH,
    peers,
    replayGuard: new ReplayGuard({ now }),
    now,
  });
  return { peers, verifier };
}

/** Signs arbitrary header/claims with jose (a hostile or foreign sender). */
async function joseSign(
  c: IssuedCertificate,
  header: Record<string, unknown>,
  claims: Record<string, unknown>,
) {
  return new CompactSign(new TextEncoder().encode(JSON.stringify(claims)))
    .setProtectedHeader({ alg: "ES256", ...header })
    .sign(createPrivateKey(c.keyPem as string));
}

function claimsFor(extra: Record<string, unknown> = {}) {
  const now = Math.floor(Date.now() / 1000);
  return {
    iss: N1,
    aud: ORCH,
    jti: "j".repeat(22),
    iat: now,
    exp: now + 60,
    typ: "heartbeat",
    body: heartbeat,
    ...extra,
  };
}

t.test("a signed envelope verifies and carries the typed body and sender", async (t) => {
  const { verifier } = orchestratorVerifier();
  const token = signer(n1).sign("heartbeat", ORCH, heartbeat);
  const env = verifier.verify(token, { subject: HB });
  t.equal(env.iss, N1);
  t.equal(env.kind, "heartbeat");
  t.same(env.body, heartbeat);
  t.equal(env.sender.id, "n1");
  t.equal(env.sender.fingerprint, n1.fingerprint);
});

t.test("tokens are standard compact JWS: jose verifies ours, we verify jose's", async (t) => {
  const s = signer(n1);
  const ours = s.sign("heartbeat", ORCH, heartbeat);
  const leaf = new X509Certificate(n1.certPem);
  const { payload, protectedHeader } = await compactVerify(ours, leaf.publicKey);
  t.equal(protectedHeader.alg, "ES256");
  t.equal(protectedHeader["x5t#S256"], s.x5t);
  t.equal(JSON.parse(new TextDecoder().decode(payload)).typ, "heartbeat");
  const { verifier } = orchestratorVerifier();
  const theirs = await joseSign(n1, { "x5t#S256": s.x5t }, claimsFor());
  t.equal(verifier.verify(theirs, { subject: HB }).iss, N1);
});

t.test("P-384 and RSA identities sign with ES384 and PS256", async (t) => {
  for (const [keyType, alg] of [
    ["ecdsa-p384", "ES384"],
    ["rsa-3072", "PS256"],
  ] as const) {
    const c = pki.mint({ role: "compute", id: `k-${alg.toLowerCase()}`, keyType });
    const { peers, verifier } = orchestratorVerifier();
    peers.add(c.certPem);
    const s = signer(c);
    t.equal(s.alg, alg);
    const env = verifier.verify(s.sign("heartbeat", ORCH, heartbeat), {
      subject: subjects.computeOut(c.id as string, "heartbeat"),
    });
    t.equal(env.sender.alg, alg);
    const { protectedHeader } = await compactVerify(
      s.sign("heartbeat", ORCH, heartbeat),
      new X509Certificate(c.certPem).publicKey,
    );
    t.equal(protectedHeader.alg, alg, `jose agrees on ${alg}`);
  }
});

t.test("a tampered body is refused", async (t) => {
  const { verifier } = orchestratorVerifier();
  const [h, p, sig] = signer(n1).sign("heartbeat", ORCH, heartbeat).split(".");
  const claims = JSON.parse(Buffer.from(p as string, "base64url").toString());
  claims.body.seq = 99;
  const tampered = `${h}.${Buffer.from(JSON.stringify(claims)).toString("base64url")}.${sig}`;
  t.throws(() => verifier.verify(tampered, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_SIGNATURE });
});

t.test("a signature by another key under n1's certificate is refused", async (t) => {
  const { verifier } = orchestratorVerifier();
  const forged = await joseSign(n2, { "x5t#S256": signer(n1).x5t }, claimsFor());
  t.throws(() => verifier.verify(forged, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_SIGNATURE });
});

t.test("n2 cannot claim to be n1, nor speak on n1's subject", async (t) => {
  const { verifier } = orchestratorVerifier();
  const n2x5t = signer(n2).x5t;
  const claimsN1 = await joseSign(n2, { "x5t#S256": n2x5t }, claimsFor());
  t.throws(() => verifier.verify(claimsN1, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_ISSUER });
  const honest = signer(n2).sign("heartbeat", ORCH, { ...heartbeat, nodeId: "n1" });
  t.throws(() => verifier.verify(honest, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_ROLE });
  t.throws(() => verifier.verify(honest, { subject: subjects.computeIn("n1") }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_ROLE,
  });
  t.throws(() => verifier.verify(honest, { subject: subjects.broadcast("revocation") }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_ROLE,
  });
  t.throws(() => verifier.verify(signer(n2).sign("heartbeat", ORCH, heartbeat), { subject: "_INBOX_n2.x" }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_ROLE,
  });
});

t.test("the kind must match the subject", async (t) => {
  const { verifier } = orchestratorVerifier();
  const status = signer(n1).sign("status", ORCH, { executionId: "e1", state: "Running" });
  t.throws(() => verifier.verify(status, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_KIND });
});

t.test("a replayed jti is refused", async (t) => {
  const { verifier } = orchestratorVerifier();
  const token = signer(n1).sign("heartbeat", ORCH, heartbeat);
  verifier.verify(token, { subject: HB });
  t.throws(() => verifier.verify(token, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_REPLAY });
});

t.test("an expired or future-dated envelope is refused", async (t) => {
  const { verifier } = orchestratorVerifier();
  const old = signer(n1, () => Date.now() - 10 * 60_000).sign("heartbeat", ORCH, heartbeat);
  t.throws(() => verifier.verify(old, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_EXPIRED });
  const future = signer(n1, () => Date.now() + 10 * 60_000).sign("heartbeat", ORCH, heartbeat);
  t.throws(() => verifier.verify(future, { subject: HB }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_NOT_YET_VALID,
  });
  const slightlyAhead = signer(n1, () => Date.now() + 10_000).sign("heartbeat", ORCH, heartbeat);
  t.equal(verifier.verify(slightlyAhead, { subject: HB }).iss, N1, "within the clock skew");
  const forever = await joseSign(
    n1,
    { "x5t#S256": signer(n1).x5t },
    claimsFor({ exp: Math.floor(Date.now() / 1000) + 86400 }),
  );
  t.throws(
    () => verifier.verify(forever, { subject: HB }),
    { code: FABRIC_CODES.SHOAL_ENVELOPE_NOT_YET_VALID },
    "too long a lifetime",
  );
});

t.test("an envelope for another audience is refused; broadcasts use the trust domain", async (t) => {
  const { verifier } = orchestratorVerifier();
  const toN2 = signer(n1).sign("heartbeat", n2.spiffeId as string, heartbeat);
  t.throws(() => verifier.verify(toN2, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_AUDIENCE });
  // n1 verifies the orchestrator's broadcast.
  const peers = new PeerCertificateCache({ caPem: pki.caCertPem, trustDomain: "test.local" });
  peers.add(orch.certPem);
  const nodeVerifier = new EnvelopeVerifier({ identity: N1, peers, replayGuard: new ReplayGuard() });
  const revocation = { serials: [], fingerprints: [], identities: [] };
  const b = signer(orch).sign("revocation", broadcastAudience("test.local"), revocation);
  t.same(nodeVerifier.verify(b, { subject: subjects.broadcast("revocation") }).body, revocation);
});

t.test("a revoked sender is refused, and cannot be re-added", async (t) => {
  const { peers, verifier } = orchestratorVerifier();
  const token = signer(n1).sign("heartbeat", ORCH, heartbeat);
  t.equal(peers.revoke({ serials: [n1.serial] }), 1);
  t.throws(() => verifier.verify(token, { subject: HB }), { code: FABRIC_CODES.SHOAL_ENVELOPE_REVOKED });
  t.throws(() => peers.add(n1.certPem), { code: FABRIC_CODES.SHOAL_ENVELOPE_REVOKED });
});

t.test("unknown senders, bad chains, oversize and malformed tokens are refused", async (t) => {
  const { verifier, peers } = orchestratorVerifier();
  const stranger = pki.mint({ role: "compute", id: "n3" });
  t.throws(() => verifier.verify(signer(stranger).sign("heartbeat", ORCH, heartbeat), { subject: HB }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_UNKNOWN_SENDER,
  });
  await initPki(path.join(dir, "foreign"), { trustDomain: "test.local" });
  const foreign = (await openPki(path.join(dir, "foreign"))).mint({ role: "compute", id: "n1" });
  t.throws(() => peers.add(foreign.certPem), { code: FABRIC_CODES.SHOAL_ENVELOPE_SENDER_CERT });
  const expired = pki.mint({
    role: "compute",
    id: "old",
    notBefore: new Date(Date.now() - 3 * 86400_000),
    notAfter: new Date(Date.now() - 86400_000),
  });
  t.throws(() => peers.add(expired.certPem), { code: FABRIC_CODES.SHOAL_ENVELOPE_SENDER_CERT });
  const user = pki.mint({ role: "user", id: "alice" });
  t.throws(() => peers.add(user.certPem), { code: FABRIC_CODES.SHOAL_ENVELOPE_SENDER_CERT });
  const small = new EnvelopeVerifier({
    identity: ORCH,
    peers,
    replayGuard: new ReplayGuard(),
    maxBytes: 200,
  });
  t.throws(() => small.verify(signer(n1).sign("heartbeat", ORCH, heartbeat), { subject: HB }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_TOO_LARGE,
  });
  for (const bad of [
    "",
    "a.b",
    "a.b.c.d",
    "!!.!!.!!",
    `${Buffer.from("{}").toString("base64url")}.e30.sig`,
  ]) {
    t.throws(
      () => verifier.verify(bad, { subject: HB }),
      { code: FABRIC_CODES.SHOAL_ENVELOPE_MALFORMED },
      bad,
    );
  }
  const wrongBody = await joseSign(n1, { "x5t#S256": signer(n1).x5t }, claimsFor({ body: { nodeId: 7 } }));
  t.throws(() => verifier.verify(wrongBody, { subject: HB }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_BODY_INVALID,
  });
  t.throws(() => new EnvelopeSigner({ keyPem: n2.keyPem as string, certPem: n1.certPem }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_SIGNER_KEY,
  });
});

t.test("the replay guard is bounded, scoped per issuer and forgets after exp + skew", async (t) => {
  let now = 1_000_000;
  const guard = new ReplayGuard({ maxEntries: 3, maxPerIssuer: 3, crowdedEntries: 3, now: () => now });
  t.equal(guard.check("a", "j1", now + 100), "fresh");
  t.equal(guard.check("a", "j1", now + 100), "replay");
  t.equal(guard.check("b", "j1", now + 100), "fresh", "another issuer's id is not burned");
  t.equal(guard.check("a", "j2", now + 5000), "fresh");
  t.equal(guard.check("a", "j3", now + 100), "full", "fails closed when full of live entries");
  now += 200;
  t.equal(guard.check("a", "j3", now + 100), "fresh", "expired entries are swept");
  t.equal(
    guard.check("a", "j1", now + 100),
    "fresh",
    "an expired id may be seen again (its envelope no longer verifies)",
  );
  t.ok(guard.size <= 3);
});

t.test("one issuer flooding the replay guard fills only its own share", async (t) => {
  let now = 1_000_000;
  const guard = new ReplayGuard({ maxEntries: 8, now: () => now });
  // The flood: envelopes with the longest lifetime a verifier accepts.
  for (let i = 0; i < 2; i++) t.equal(guard.check("flood", `f${i}`, now + 600_000), "fresh");
  t.equal(guard.check("flood", "f2", now + 600_000), "issuer-full", "a quarter of the guard by default");
  t.equal(guard.check("flood", "f0", now + 600_000), "replay", "its replays are still told apart");
  for (const sender of ["n1", "n2", "n3"]) {
    t.equal(guard.check(sender, "j1", now + 90_000), "fresh", `${sender} is still heard`);
  }
  // Its own entries expire; it is heard again. One whose long-lived head hides expired
  // entries behind it has them found too (at most once a second).
  const mixed = new ReplayGuard({ maxEntries: 100, maxPerIssuer: 2, now: () => now });
  t.equal(mixed.check("m", "long", now + 600_000), "fresh");
  t.equal(mixed.check("m", "short", now + 100), "fresh");
  now += 2000;
  t.equal(mixed.check("m", "next", now + 100), "fresh", "the expired entry behind a live one is dropped");
  t.equal(mixed.check("m", "again", now + 100), "issuer-full");
  now += 600_000;
  t.equal(guard.check("flood", "f3", now + 90_000), "fresh", "heard again once its entries expired");
});

t.test("colluding issuers cannot crowd the others out of the replay guard", async (t) => {
  let now = 1_000_000;
  // Crowded at 80 of 120 entries; each issuer may hold 25.
  const guard = new ReplayGuard({ maxEntries: 120, maxPerIssuer: 25, crowdedEntries: 80, now: () => now });
  const colluders = ["c1", "c2", "c3", "c4"];
  let accepted = 0;
  for (let i = 0; i < 25; i++) {
    for (const c of colluders) if (guard.check(c, `x${i}`, now + 150_000) === "fresh") accepted++;
  }
  t.equal(accepted, 80, "together, under their own shares, they fill it only to the crowded line");
  t.equal(guard.check("c1", "late", now + 150_000), "over-share");
  // An honest sender is heard until it holds the average share: 5 × k ≥ 80 + k at k = 20.
  let honest = 0;
  while (honest < 30 && guard.check("n1", `j${honest}`, now + 90_000) === "fresh") honest++;
  t.equal(honest, 20, "a sender below the average is still heard");
  t.equal(guard.check("n1", "j99", now + 90_000), "over-share");
  t.equal(guard.check("n2", "j0", now + 90_000), "fresh", "a new sender is heard");
  t.equal(guard.check("c2", "x0", now + 150_000), "replay", "replays are still told apart");
  now += 150_000;
  t.equal(guard.check("c1", "late", now + 150_000), "fresh", "heard again once its entries expired");
  const lone = new ReplayGuard({ maxEntries: 10, maxPerIssuer: 10, now: () => now });
  let taken = 0;
  while (taken < 10 && lone.check("a", `j${taken}`, now + 1000) === "fresh") taken++;
  t.equal(taken, 8, "crowded at 80% of the entries by default");
});

t.test("a verifier refuses a flooding sender's envelopes, not the others'", async (t) => {
  const peers = new PeerCertificateCache({ caPem: pki.caCertPem, trustDomain: "test.local" });
  peers.add(n1.certPem);
  peers.add(n2.certPem);
  const verifier = new EnvelopeVerifier({
    identity: ORCH,
    peers,
    replayGuard: new ReplayGuard({ maxEntries: 4 }),
  });
  const beat = (c: IssuedCertificate, nodeId: string) =>
    signer(c).sign("heartbeat", ORCH, { ...heartbeat, nodeId });
  t.ok(verifier.verify(beat(n1, "n1"), { subject: HB }));
  t.throws(() => verifier.verify(beat(n1, "n1"), { subject: HB }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_REPLAY,
    message: /as many unexpired envelopes as one sender may/,
  });
  t.ok(
    verifier.verify(beat(n2, "n2"), { subject: subjects.computeOut("n2", "heartbeat") }),
    "another node is heard",
  );
  const crowded = new EnvelopeVerifier({
    identity: ORCH,
    peers,
    replayGuard: new ReplayGuard({ maxEntries: 5, maxPerIssuer: 5, crowdedEntries: 2 }),
  });
  for (let i = 0; i < 2; i++) crowded.verify(beat(n1, "n1"), { subject: HB });
  t.throws(() => crowded.verify(beat(n1, "n1"), { subject: HB }), {
    code: FABRIC_CODES.SHOAL_ENVELOPE_REPLAY,
    message: /more than its share of a crowded replay cache/,
  });
});

t.test(
  "the largest result a node can make fits in one envelope, whatever its output's characters",
  async (t) => {
    const { verifier } = orchestratorVerifier();
    // Each character of CJK text is three UTF-8 bytes; a control character is six escaped.
    const cjk = fitForManifest("漢".repeat(300_000), MAX_RESULT_OUTPUT_JSON_BYTES);
    const control = fitForManifest("\u0001".repeat(300_000), MAX_RESULT_OUTPUT_JSON_BYTES);
    t.ok(cjk.cut && control.cut);
    // Result files up to their list's budget: 1000 entries, each as long as fits.
    const digest = "0".repeat(64);
    const entry = (i: number, width: number) => ({
      name: `${i}`.padStart(width, "é"),
      size: 2 ** 30,
      sha256: digest,
      chunks: [digest, digest, digest, digest],
    });
    let width = 1;
    const list = (w: number) => Array.from({ length: 1000 }, (_, i) => entry(i, w));
    while (Buffer.byteLength(JSON.stringify(list(width + 1))) <= MAX_RESULT_MANIFEST_JSON_BYTES) width++;
    const tail = "A".repeat(Math.ceil(RESULT_LOG_TAIL_BYTES / 3) * 4);
    const result: MessageBody<"result"> = {
      executionId: `e-${"0".repeat(36)}`,
      state: "Failed",
      exitCode: -1,
      error: "SHOAL_ENGINE_OUTPUT_LIMIT: the program wrote more than 64 MiB to one stream",
      stdout: cjk.text,
      stderr: control.text,
      stdoutTruncated: true,
      stderrTruncated: true,
      files: list(width),
      logs: [
        { stream: "stdout", seq: 1_000_000, data: tail },
        { stream: "stderr", seq: 1_000_001, data: tail },
      ],
    };
    const token = signer(n1).sign("result", ORCH, result);
    t.ok(token.length <= DEFAULT_MAX_ENVELOPE_BYTES, `${token.length} bytes`);
    t.equal(verifier.verify(token, { subject: subjects.computeOut("n1", "result") }).kind, "result");
  },
);
