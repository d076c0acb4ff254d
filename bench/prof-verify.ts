import "reflect-metadata";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import {
  EnvelopeSigner,
  EnvelopeVerifier,
  PeerCertificateCache,
  ReplayGuard,
  subjects,
} from "../fabric/index.js";
import { initPki, openPki } from "../pki/index.js";

const dir = mkdtempSync(path.join(tmpdir(), "prof-"));
await initPki(path.join(dir, "pki"), { trustDomain: "test.local" });
const pki = await openPki(path.join(dir, "pki"));
const n = pki.mint({ role: "compute", id: "n1" });
const o = pki.mint({ role: "orchestrator", id: "o1" });
const signer = new EnvelopeSigner({ keyPem: n.keyPem as string, certPem: n.certPem });
const peers = new PeerCertificateCache({ caPem: pki.caCertPem, trustDomain: "test.local" });
peers.add(signer.chainPem);
const verifier = new EnvelopeVerifier({
  identity: o.spiffeId as string,
  peers,
  replayGuard: new ReplayGuard(),
});
const body = {
  nodeId: "n1",
  seq: 1,
  allocated: { cpu: 1.5, memory: 2 ** 30 },
  running: ["e-0001", "e-0002", "e-0003"],
};
const N = 30000;
const subject = subjects.computeOut("n1", "heartbeat");
const toks = Array.from({ length: N }, () => signer.sign("heartbeat", o.spiffeId as string, body));
const c0 = process.cpuUsage();
const t0 = performance.now();
for (const t of toks) verifier.verify(t, { subject });
const c = process.cpuUsage(c0);
console.log(
  "verify",
  N / ((performance.now() - t0) / 1000),
  "wall/s",
  N / ((c.user + c.system) / 1e6),
  "cpu/s",
);
