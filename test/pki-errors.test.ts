import "reflect-metadata";
import { createPrivateKey } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import {
  checkCsr,
  createCsr,
  exportPkcs12,
  generatePrivateKey,
  initPki,
  inspectCertificate,
  openPki,
  readInventory,
} from "../pki/index.js";
import { freshPki, openssl, tempDir } from "./helpers/pki.js";

/** Every file under `dir`, so a test can say nothing new (or partial) was left behind. */
async function tree(dir: string): Promise<string[]> {
  const entries = await fs.readdir(dir, { recursive: true });
  return entries.map(String).sort();
}

t.test("corrupt PEM is refused with SHOAL_PKI_BAD_PEM", async (t) => {
  const { pki } = await freshPki(t);
  t.throws(() => inspectCertificate("hello"), { code: "SHOAL_PKI_BAD_PEM" });
  const lines = pki.caCertPem.split("\n");
  const truncated = [...lines.slice(0, 4), ...lines.slice(-2)].join("\n");
  t.throws(() => inspectCertificate(truncated), { code: "SHOAL_PKI_BAD_PEM" });
  await t.rejects(pki.revoke("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), {
    code: "SHOAL_PKI_BAD_PEM",
  });
});

t.test("a key that does not match its certificate is refused", async (t) => {
  const { dir, pki } = await freshPki(t);
  const a = await pki.issue({ role: "user", id: "a" });
  const b = await pki.issue({ role: "user", id: "b" });
  t.throws(() => exportPkcs12({ certPem: a.certPem, keyPem: b.keyPem!, password: "x" }), {
    code: "SHOAL_PKI_KEY_MISMATCH",
  });
  await fs.writeFile(path.join(dir, "issuer.key"), b.keyPem!, { mode: 0o600 });
  await t.rejects(openPki(dir), { code: "SHOAL_PKI_KEY_MISMATCH" });
});

t.test("a CSR with a bad signature is refused; its key type must be one we sign", async (t) => {
  const { pki } = await freshPki(t);
  const csr = createCsr(generatePrivateKey("ecdsa-p256"), "node");
  t.ok(checkCsr(csr).publicKey);
  const der = Buffer.from(csr.replace(/-----[^-]+-----|\s/g, ""), "base64");
  der[der.length - 3]! ^= 0x01;
  const tampered = `-----BEGIN CERTIFICATE REQUEST-----\n${der.toString("base64")}\n-----END CERTIFICATE REQUEST-----\n`;
  await t.rejects(pki.signCsr(tampered, { role: "compute", id: "n1" }), { code: "SHOAL_PKI_BAD_CSR" });
  await t.rejects(pki.signCsr("junk", { role: "compute", id: "n1" }), { code: "SHOAL_PKI_BAD_PEM" });
  const ed = await openssl([
    "req",
    "-new",
    "-newkey",
    "ed25519",
    "-nodes",
    "-keyout",
    "/dev/null",
    "-subj",
    "/CN=x",
  ]);
  await t.rejects(pki.signCsr(ed.stdout, { role: "compute", id: "n1" }), {
    code: "SHOAL_PKI_UNSUPPORTED_KEY",
  });
  t.same(await pki.list(), [], "nothing was recorded");
});

t.test("unknown roles, key types and reasons have their own codes", async (t) => {
  const { pki } = await freshPki(t);
  // biome-ignore lint/suspicious/noExplicitAny: deliberately wrong input from an untyped caller
  const loose = pki as any;
  await t.rejects(loose.issue({ role: "admin", id: "x" }), { code: "SHOAL_PKI_UNKNOWN_ROLE" });
  await t.rejects(loose.issue({ role: "compute", id: "x", keyType: "dsa-1024" }), {
    code: "SHOAL_PKI_UNKNOWN_KEY_TYPE",
  });
  const root = await tempDir(t);
  // biome-ignore lint/suspicious/noExplicitAny: as above
  await t.rejects(initPki(path.join(root, "p"), { keyType: "ed448" as any }), {
    code: "SHOAL_PKI_UNKNOWN_KEY_TYPE",
  });
  t.same(await tree(root), [], "nothing was created");
  const issued = await pki.issue({ role: "compute", id: "x" });
  await t.rejects(loose.revoke(issued.serial, "lost-it"), { code: "SHOAL_PKI_UNKNOWN_REASON" });
  await t.rejects(pki.revoke("abcdef"), { code: "SHOAL_PKI_UNKNOWN_SERIAL" });
  await t.rejects(pki.issue({ role: "compute", id: "x", dns: ["a.example"] }), {
    code: "SHOAL_PKI_BAD_NAME",
  });
  await t.rejects(pki.issue({ role: "server", dns: ["bad name"] }), { code: "SHOAL_PKI_BAD_NAME" });
  await t.rejects(pki.issue({ role: "server", ip: ["300.1.1.1"] }), { code: "SHOAL_PKI_BAD_NAME" });
});

t.test("init refuses an existing PKI without force, and replaces it with force", async (t) => {
  const { dir, pki } = await freshPki(t);
  await t.rejects(initPki(dir), { code: "SHOAL_PKI_EXISTS" });
  t.equal((await openPki(dir)).rootFingerprint, pki.rootFingerprint, "untouched");
  const replaced = await initPki(dir, { force: true });
  t.not(replaced.rootFingerprint, pki.rootFingerprint);
});

t.test("an unreadable file names itself with SHOAL_FILE_READ", async (t) => {
  const { dir } = await freshPki(t);
  await fs.rm(path.join(dir, "issuer.crt"));
  await fs.mkdir(path.join(dir, "issuer.crt"));
  await t.rejects(openPki(dir), { code: "SHOAL_FILE_READ", message: /issuer\.crt/ });
});

t.test("encrypted CA keys need the right passphrase", async (t) => {
  const { dir } = await freshPki(t, { passphrase: "correct horse" });
  const keyPem = await fs.readFile(path.join(dir, "ca.key"), "utf8");
  t.match(keyPem, /BEGIN ENCRYPTED PRIVATE KEY/);
  t.ok(createPrivateKey({ key: keyPem, passphrase: "correct horse" }), "standard encrypted PKCS#8");
  const decrypted = await openssl([
    "pkey",
    "-in",
    path.join(dir, "issuer.key"),
    "-passin",
    "pass:correct horse",
    "-noout",
  ]);
  t.equal(decrypted.code, 0, decrypted.stderr);
  await t.rejects(openPki(dir), { code: "SHOAL_PKI_PASSPHRASE_REQUIRED" });
  await t.rejects(openPki(dir, { passphrase: "wrong" }), { code: "SHOAL_PKI_BAD_PASSPHRASE" });
  const pki = await openPki(dir, { passphrase: "correct horse" });
  t.ok((await pki.issue({ role: "compute", id: "n" })).certPem);
});

t.test("--days beyond the issuer's validity is refused and nothing is written", async (t) => {
  const root = await tempDir(t);
  const dir = path.join(root, "pki");
  await initPki(dir, { days: 30 });
  const pki = await openPki(dir);
  const before = await tree(root);
  await t.rejects(pki.issue({ role: "compute", id: "n", days: 31 }, { out: path.join(root, "n") }), {
    code: "SHOAL_PKI_VALIDITY",
    fix: /--days 29 or less/,
  });
  await t.rejects(pki.issue({ role: "compute", id: "n", days: 0 }), { code: "SHOAL_PKI_VALIDITY" });
  t.same(await tree(root), before);
  t.same((await readInventory(dir)).certificates, []);
  t.ok(await pki.issue({ role: "compute", id: "n", days: 29 }));
});

t.test("a failed write leaves neither output files nor an inventory entry", async (t) => {
  const { dir, pki, root } = await freshPki(t);
  const before = await tree(root);
  await t.rejects(pki.issue({ role: "compute", id: "n" }, { out: path.join(root, "missing", "n") }), {
    code: "SHOAL_FILE_WRITE",
  });
  t.same(await tree(root), before, "no partial or temporary file");
  t.same((await readInventory(dir)).certificates, []);
});

t.test("a corrupt inventory is reported, not overwritten", async (t) => {
  const { dir, pki } = await freshPki(t);
  await fs.writeFile(path.join(dir, "inventory.json"), "{ not json");
  await t.rejects(pki.issue({ role: "compute", id: "n" }), { code: "SHOAL_PKI_INVENTORY_CORRUPT" });
  t.equal(await fs.readFile(path.join(dir, "inventory.json"), "utf8"), "{ not json");
});
