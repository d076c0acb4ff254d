import "reflect-metadata";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import t from "tap";
import { AUTH_CODES, Authenticator, MemoryAuthStore, UserDirectory } from "../auth/index.js";
import { initPki, openPki, PKI_FILES } from "../pki/index.js";

const dir = await mkdtemp(path.join(os.tmpdir(), "shoal-auth-mtls-"));
t.teardown(() => rm(dir, { recursive: true, force: true }));
await initPki(path.join(dir, "ca"), { trustDomain: "shoal.local" });
await initPki(path.join(dir, "other-ca"), { trustDomain: "shoal.local" });
const pki = await openPki(path.join(dir, "ca"));
const otherPki = await openPki(path.join(dir, "other-ca"));
const caPem = await readFile(path.join(dir, "ca", PKI_FILES.rootCert), "utf8");

let crl: string | undefined;
const directory = new UserDirectory(new MemoryAuthStore(), { hash: { logN: 14 } });
await directory.ensureBuiltinRoles();
await directory.addUser({ name: "alice", roles: ["reader"], namespace: "team-a" });
const auth = new Authenticator({
  methods: ["mtls"],
  directory,
  mtls: { caPem, trustDomain: "shoal.local", crlPem: () => crl },
});

t.test("a user certificate from the fabric CA maps spiffe://td/user/<name> to that user", async (t) => {
  const { certPem } = await pki.issue({ role: "user", id: "alice" });
  t.same(await auth.mtls(certPem), {
    id: "alice",
    kind: "user",
    roles: ["reader"],
    namespace: "team-a",
    method: "mtls",
    uid: (await directory.getUser("alice"))?.uid,
  });
});

t.test("certificates that are not fabric user identities are refused", async (t) => {
  const compute = await pki.issue({ role: "compute", id: "alice" });
  await t.rejects(auth.mtls(compute.certPem), { code: AUTH_CODES.SHOAL_AUTH_CERT_REJECTED, status: 401 });
  const foreign = await otherPki.issue({ role: "user", id: "alice" });
  await t.rejects(auth.mtls(foreign.certPem), { code: AUTH_CODES.SHOAL_AUTH_CERT_REJECTED });
  await t.rejects(auth.mtls("not a certificate"), { code: AUTH_CODES.SHOAL_AUTH_CERT_REJECTED });
  const expired = await pki.issue({
    role: "user",
    id: "alice",
    notBefore: new Date(Date.now() - 3 * 86_400_000),
    notAfter: new Date(Date.now() - 86_400_000),
  });
  await t.rejects(auth.mtls(expired.certPem), { code: AUTH_CODES.SHOAL_AUTH_CERT_REJECTED });
});

t.test("a valid certificate of an unknown or disabled user is refused", async (t) => {
  const bob = await pki.issue({ role: "user", id: "bob" });
  await t.rejects(auth.mtls(bob.certPem), { code: AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS });
  await directory.addUser({ name: "carol", roles: [] });
  await directory.setDisabled("carol", true);
  const carol = await pki.issue({ role: "user", id: "carol" });
  await t.rejects(auth.mtls(carol.certPem), { code: AUTH_CODES.SHOAL_AUTH_USER_DISABLED });
});

t.test("a revoked certificate is refused once the CRL lists it", async (t) => {
  const cert = await pki.issue({ role: "user", id: "alice" });
  t.equal((await auth.mtls(cert.certPem)).id, "alice");
  await pki.revoke(cert.serial, "keyCompromise");
  crl = await pki.crl();
  await t.rejects(auth.mtls(cert.certPem), { code: AUTH_CODES.SHOAL_AUTH_CERT_REJECTED });
});
