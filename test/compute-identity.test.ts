import "reflect-metadata";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import t from "tap";
import { loadNodeIdentity } from "../compute/index.js";
import { initPki, openPki, writeIssued } from "../pki/index.js";

const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-identity-"));
t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
await initPki(path.join(dir, "pki"), { trustDomain: "test.local" });
const pki = await openPki(path.join(dir, "pki"));
const caCert = path.join(dir, "pki", "ca.crt");

async function issue(name: string, req: Parameters<typeof pki.mint>[0]) {
  const prefix = path.join(dir, name);
  await writeIssued(prefix, pki.mint(req));
  return { caCert, clientCert: `${prefix}.crt`, clientKey: `${prefix}.key` };
}

t.test("the id comes from the certificate's compute SPIFFE id", async (t) => {
  const files = await issue("node-7", { role: "compute", id: "node-7" });
  const identity = await loadNodeIdentity(files);
  t.equal(identity.id, "node-7");
  t.equal(identity.spiffeId, "spiffe://test.local/compute/node-7");
  t.equal(identity.trustDomain, "test.local");
  t.match(identity.fingerprint, /^sha256:[0-9a-f]{64}$/);
});

t.test("refusals name the cause", async (t) => {
  const orch = await issue("orch", { role: "orchestrator", id: "orch-1" });
  await t.rejects(loadNodeIdentity(orch), {
    code: "SHOAL_COMPUTE_IDENTITY",
    message: /SHOAL_PKI_ROLE_MISMATCH/,
  });

  const expired = await issue("old", {
    role: "compute",
    id: "old",
    notBefore: new Date(Date.now() - 3 * 86_400_000),
    notAfter: new Date(Date.now() - 86_400_000),
  });
  await t.rejects(loadNodeIdentity(expired), {
    code: "SHOAL_COMPUTE_IDENTITY",
    message: /SHOAL_PKI_EXPIRED/,
  });

  const a = await issue("a", { role: "compute", id: "a" });
  const b = await issue("b", { role: "compute", id: "b" });
  await t.rejects(loadNodeIdentity({ ...a, clientKey: b.clientKey }), {
    code: "SHOAL_COMPUTE_IDENTITY",
    message: /not the private key/,
  });

  await t.rejects(loadNodeIdentity({ ...a, clientCert: path.join(dir, "missing.crt") }), {
    code: "SHOAL_COMPUTE_IDENTITY",
    message: /missing\.crt/,
  });

  await initPki(path.join(dir, "other"), { trustDomain: "test.local" });
  await t.rejects(loadNodeIdentity({ ...a, caCert: path.join(dir, "other", "ca.crt") }), {
    code: "SHOAL_COMPUTE_IDENTITY",
    message: /SHOAL_PKI_UNTRUSTED/,
  });
});
