import "reflect-metadata";
import { createPrivateKey, createPublicKey, X509Certificate } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import t, { type Test } from "tap";
import { CertificateRenewer } from "../compute/certificate-renewal.js";
import type { ComputeError } from "../compute/errors.js";
import { loadNodeIdentity, type NodeIdentity } from "../compute/node-identity.js";
import { BACKDATE_MS, certificateRenewalTime, writeIssued } from "../pki/index.js";
import { freshPki } from "./helpers/pki.js";

t.test(
  "renewal time: RenewBefore ahead of expiry, never before two thirds of the real lifetime",
  async (t) => {
    const issued = new Date("2026-01-01T00:00:00Z").getTime();
    const h = 3_600_000;
    const at = (lifeMs: number, renewBeforeMs: number) =>
      certificateRenewalTime(
        new Date(issued - BACKDATE_MS),
        new Date(issued + lifeMs),
        renewBeforeMs,
      ).getTime() - issued;
    t.equal(at(24 * h, 8 * h), 16 * h, "24 h certificate, RenewBefore 8 h: at 16 h");
    t.equal(at(24 * h, 2 * h), 22 * h, "a shorter RenewBefore is honoured");
    t.equal(Math.round(at(20_000, 8 * h)), 13_333, "20 s certificate: at two thirds, not in a loop");
    t.equal(at(365 * 24 * h, 8 * h), 365 * 24 * h - 8 * h, "a long certificate: RenewBefore ahead");
  },
);

/** A compute identity on disk for `id`, valid `lifeMs` from now. */
async function nodeFiles(t: Test, lifeMs: number) {
  const { pki, root } = await freshPki(t);
  const prefix = path.join(root, "node", "tls", "node");
  await fs.mkdir(path.dirname(prefix), { recursive: true });
  const first = await pki.issue({ role: "compute", id: "n1", notAfter: new Date(Date.now() + lifeMs) });
  await writeIssued(prefix, first);
  const files = {
    caCert: path.join(pki.dir, "ca.crt"),
    clientCert: `${prefix}.crt`,
    clientKey: `${prefix}.key`,
  };
  return { pki, first, files, identity: await loadNodeIdentity(files) };
}

t.test("renew: a new key, the same identity, files replaced atomically (key 0600)", async (t) => {
  const { pki, first, files, identity } = await nodeFiles(t, 60_000);
  const renewed: NodeIdentity[] = [];
  const renewer = new CertificateRenewer({
    identity,
    renewBeforeMs: 8 * 3_600_000,
    request: async (csrPem) =>
      (await pki.signCsr(csrPem, { role: "compute", id: "n1", notAfter: new Date(Date.now() + 20_000) }))
        .certPem,
    onRenewed: async (i) => {
      renewed.push(i);
    },
    onExpired: () => t.fail("not expired"),
  });
  t.teardown(() => renewer.close());
  const outcome = await renewer.renewNow();
  t.ok(outcome.ok, "renewed");
  t.equal(renewed.length, 1, "the node was told");
  const now = renewed[0]!;
  t.equal(now.spiffeId, identity.spiffeId, "same identity");
  t.not(now.fingerprint, identity.fingerprint, "a new certificate");
  const keyPem = await fs.readFile(files.clientKey, "utf8");
  t.not(keyPem, first.keyPem, "a new key on disk");
  t.equal((await fs.stat(files.clientKey)).mode & 0o777, 0o600);
  const leaf = new X509Certificate(await fs.readFile(files.clientCert));
  t.ok(
    leaf.publicKey
      .export({ type: "spki", format: "der" })
      .equals(createPublicKey(createPrivateKey(keyPem)).export({ type: "spki", format: "der" })),
    "the certificate is the new key's",
  );
  t.same(
    (await fs.readdir(path.dirname(files.clientKey))).sort(),
    ["node.crt", "node.key"],
    "nothing staged is left",
  );
  t.ok(renewer.renewAt.getTime() < now.notAfter.getTime(), "the next renewal is before expiry");
});

t.test("a chain for another identity is refused and the files are kept", async (t) => {
  const { pki, first, files, identity } = await nodeFiles(t, 60_000);
  const renewer = new CertificateRenewer({
    identity,
    renewBeforeMs: 1000,
    request: async (csrPem) => (await pki.signCsr(csrPem, { role: "compute", id: "someone-else" })).certPem,
    onRenewed: async () => {
      t.fail("must not switch");
    },
    onExpired: () => t.fail("not expired"),
  });
  t.teardown(() => renewer.close());
  const outcome = await renewer.renewNow();
  t.notOk(outcome.ok);
  if (!outcome.ok) t.equal((outcome.error as ComputeError).code, "SHOAL_COMPUTE_IDENTITY");
  t.equal(await fs.readFile(files.clientKey, "utf8"), first.keyPem, "the key is unchanged");
  t.equal(await fs.readFile(files.clientCert, "utf8"), first.certPem, "the certificate is unchanged");
});

t.test(
  "an orchestrator offline until expiry: retries with backoff, then SHOAL_COMPUTE_CERT_EXPIRED",
  async (t) => {
    const { files, identity } = await nodeFiles(t, 2500);
    let attempts = 0;
    // The renewer's timers do not hold the process open (a daemon's connection does); this does.
    const keepAlive = setInterval(() => {}, 1000);
    t.teardown(() => clearInterval(keepAlive));
    const expired = new Promise<ComputeError>((resolve) => {
      const renewer = new CertificateRenewer({
        identity,
        renewBeforeMs: 8 * 3_600_000,
        retryBaseMs: 200,
        request: async () => {
          attempts++;
          throw new Error("no orchestrator answers");
        },
        onRenewed: async () => {
          t.fail("nothing to renew with");
        },
        onExpired: resolve,
      });
      t.teardown(() => renewer.close());
      renewer.start();
    });
    const error = await expired;
    t.equal(error.code, "SHOAL_COMPUTE_CERT_EXPIRED");
    t.match(error.message, files.clientCert, "names the certificate");
    t.match(error.fix ?? "", /--join TOKEN --ca-fingerprint/, "says how to re-enroll");
    t.ok(attempts >= 2 && attempts < 20, `retried with backoff (${attempts} attempts)`);
  },
);
