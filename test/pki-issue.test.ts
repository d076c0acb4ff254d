import "reflect-metadata";
import { X509Certificate } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import {
  certFingerprint,
  inspectCertificate,
  openPki,
  parseSpiffeId,
  readInventory,
  spiffeId,
  verifyCertificate,
  writeIssued,
} from "../pki/index.js";
import { freshPki, tempDir } from "./helpers/pki.js";

t.test("init makes a root and an issuing CA chained to it", async (t) => {
  const { dir, pki } = await freshPki(t);
  const root = new X509Certificate(await fs.readFile(path.join(dir, "ca.crt")));
  const issuer = new X509Certificate(await fs.readFile(path.join(dir, "issuer.crt")));
  t.ok(root.ca && issuer.ca);
  t.ok(root.verify(root.publicKey), "root is self-signed");
  t.ok(issuer.verify(root.publicKey), "issuer is signed by the root");
  t.equal(pki.rootFingerprint, `sha256:${root.fingerprint256.replace(/:/g, "").toLowerCase()}`);
  t.equal(pki.trustDomain, "shoal.local");
  for (const key of ["ca.key", "issuer.key"]) {
    t.equal((await fs.stat(path.join(dir, key))).mode & 0o777, 0o600, `${key} is 0600`);
  }
  const info = inspectCertificate(pki.issuerCertPem);
  t.equal(info.pathLen, 0);
  t.same(info.keyUsage, ["crlSign", "digitalSignature", "keyCertSign"]);
  t.equal(inspectCertificate(pki.caCertPem).pathLen, 1);
});

t.test("server certificates always carry loopback names and both EKUs", async (t) => {
  const { pki } = await freshPki(t);
  const issued = await pki.issue({ role: "server", dns: ["orch.example.com"], ip: ["10.0.5.16"] });
  const info = inspectCertificate(issued.certPem);
  t.same(info.dns, ["localhost", "orch.example.com"]);
  t.same(info.ips, ["127.0.0.1", "10.0.5.16"]);
  t.same(info.uris, []);
  t.same(info.eku, ["serverAuth", "clientAuth"]);
  t.equal(info.isCa, false);
  t.equal(info.serial, issued.serial);
  t.match(issued.serial, /^[0-9a-f]{31,32}$/);
  t.equal(info.fingerprint, issued.fingerprint);
  t.equal(certFingerprint(issued.certPem), issued.fingerprint);
  t.ok(issued.keyPem?.includes("BEGIN PRIVATE KEY"));
  const leaf = new X509Certificate(issued.certPem);
  t.ok(leaf.checkPrivateKey((await import("node:crypto")).createPrivateKey(issued.keyPem!)));
  t.ok(issued.notBefore.getTime() < Date.now() - 4 * 60_000, "notBefore is backdated");
  const result = verifyCertificate(issued.certPem, {
    caPem: pki.caCertPem,
    host: "10.0.5.16",
    role: "server",
  });
  t.ok(result.ok, JSON.stringify(result));
});

t.test("identity certificates carry only their SPIFFE id and clientAuth", async (t) => {
  const { pki } = await freshPki(t, { trustDomain: "prod.example.com" });
  const issued = await pki.issue({ role: "compute", id: "edge-7" });
  const info = inspectCertificate(issued.certPem);
  t.same(info.sans, ["spiffe://prod.example.com/compute/edge-7"]);
  t.equal(info.spiffeId, issued.spiffeId);
  t.equal(info.subject, "CN=edge-7");
  t.same(info.eku, ["clientAuth"]);
  t.same(parseSpiffeId(issued.spiffeId!), { trustDomain: "prod.example.com", role: "compute", id: "edge-7" });
  t.ok(verifyCertificate(issued.certPem, { caPem: pki.caCertPem, role: "compute" }).ok);
  const wrongRole = verifyCertificate(issued.certPem, { caPem: pki.caCertPem, role: "orchestrator" });
  t.same(!wrongRole.ok && wrongRole.failures.map((f) => f.code), ["SHOAL_PKI_ROLE_MISMATCH"]);
});

t.test("ids that are unsafe in NATS subjects are refused", async (t) => {
  const { pki } = await freshPki(t);
  for (const id of ["a.b", "a*", "a>", "a b", "", "-x", "X".repeat(3)]) {
    await t.rejects(pki.issue({ role: "compute", id }), { code: "SHOAL_PKI_BAD_ID" }, JSON.stringify(id));
  }
  t.throws(() => spiffeId("shoal.local", "compute", "a.b"), { code: "SHOAL_PKI_BAD_ID" });
  t.equal(parseSpiffeId("spiffe://shoal.local/server/x"), undefined);
});

t.test("issued certificates are recorded in the inventory and written with writeIssued", async (t) => {
  const { dir, pki, root } = await freshPki(t);
  const issued = await pki.issue({ role: "user", id: "alice" });
  await writeIssued(path.join(root, "alice"), issued);
  t.equal((await fs.stat(path.join(root, "alice.key"))).mode & 0o777, 0o600);
  t.equal(await fs.readFile(path.join(root, "alice.crt"), "utf8"), issued.certPem);
  const inv = await readInventory(dir);
  t.equal(inv.certificates.length, 1);
  t.equal(inv.certificates[0]?.serial, issued.serial);
  const list = await (await openPki(dir)).list();
  t.match(list, [
    { serial: issued.serial, role: "user", id: "alice", status: "valid", sans: [issued.spiffeId] },
  ]);
});

t.test("tests can mint expired and not-yet-valid certificates", async (t) => {
  const { pki } = await freshPki(t);
  const expired = await pki.issue({
    role: "compute",
    id: "old",
    notBefore: new Date(Date.now() - 3 * 86400_000),
    notAfter: new Date(Date.now() - 86400_000),
  });
  const r = verifyCertificate(expired.certPem, { caPem: pki.caCertPem });
  t.same(!r.ok && r.failures.map((f) => f.code), ["SHOAL_PKI_EXPIRED"]);
  t.equal((await pki.list())[0]?.status, "expired");
});

t.test("a fresh directory without a PKI is reported as such", async (t) => {
  const dir = await tempDir(t);
  await t.rejects(openPki(dir), { code: "SHOAL_PKI_NOT_FOUND" });
});
