import "reflect-metadata";
import { X509Certificate } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import { exportPkcs12, inspectCertificate, type KeyType, writeIssued } from "../pki/index.js";
import { freshPki, openssl } from "./helpers/pki.js";

/** Splits PREFIX.crt into leaf and the intermediate openssl takes as -untrusted. */
async function files(root: string, dir: string, name: string, certPem: string) {
  const leaf = path.join(root, `${name}-leaf.pem`);
  const [first] = certPem.split(/(?<=-----END CERTIFICATE-----\n)/);
  await fs.writeFile(leaf, first!);
  return { leaf, ca: path.join(dir, "ca.crt"), issuer: path.join(dir, "issuer.crt") };
}

for (const keyType of ["ecdsa-p256", "ecdsa-p384", "rsa-3072"] as KeyType[]) {
  t.test(`openssl verifies ${keyType} chains through the intermediate`, async (t) => {
    const { dir, pki, root } = await freshPki(t, { keyType });
    for (const req of [{ role: "server" as const }, { role: "compute" as const, id: "edge-1" }]) {
      const issued = await pki.issue(req);
      const f = await files(root, dir, req.role, issued.certPem);
      const purpose = req.role === "server" ? "sslserver" : "sslclient";
      const r = await openssl([
        "verify",
        "-CAfile",
        f.ca,
        "-untrusted",
        f.issuer,
        "-purpose",
        purpose,
        f.leaf,
      ]);
      t.equal(r.code, 0, `${req.role}: ${r.stdout}${r.stderr}`);
      t.match(r.stdout, /: OK/);
      const alone = await openssl(["verify", "-CAfile", f.ca, f.leaf]);
      t.not(alone.code, 0, "without the intermediate the leaf does not verify");
    }
    t.equal(
      inspectCertificate(pki.caCertPem).keyType,
      { "ecdsa-p256": "ECDSA P-256", "ecdsa-p384": "ECDSA P-384", "rsa-3072": "RSA 3072" }[keyType],
    );
  });
}

t.test("openssl agrees on the server SANs and the CA extensions", async (t) => {
  const { dir, pki, root } = await freshPki(t);
  const issued = await pki.issue({
    role: "server",
    dns: ["orch.example.com"],
    ip: ["10.0.5.16", "fd00::16"],
  });
  const f = await files(root, dir, "server", issued.certPem);
  for (const host of ["localhost", "orch.example.com"]) {
    t.match(
      (await openssl(["x509", "-in", f.leaf, "-noout", "-checkhost", host])).stdout,
      /does match/,
      host,
    );
  }
  for (const ip of ["127.0.0.1", "10.0.5.16", "fd00::16"]) {
    t.match((await openssl(["x509", "-in", f.leaf, "-noout", "-checkip", ip])).stdout, /does match/, ip);
  }
  t.match(
    (await openssl(["x509", "-in", f.leaf, "-noout", "-checkhost", "evil.example.com"])).stdout,
    /does NOT match/,
  );
  t.match(
    (await openssl(["x509", "-in", f.leaf, "-noout", "-checkip", "10.0.5.17"])).stdout,
    /does NOT match/,
  );

  const leafText = (await openssl(["x509", "-in", f.leaf, "-noout", "-text"])).stdout;
  t.match(leafText, /X509v3 Basic Constraints: critical\s+CA:FALSE/);
  t.match(leafText, /X509v3 Key Usage: critical\s+Digital Signature/);
  t.match(leafText, /TLS Web Server Authentication, TLS Web Client Authentication/);
  t.match(leafText, /X509v3 Authority Key Identifier/);
  t.notMatch(leafText, /URI:/, "server certificates carry no URI SAN");
  const issuerText = (await openssl(["x509", "-in", f.issuer, "-noout", "-text"])).stdout;
  t.match(issuerText, /CA:TRUE, pathlen:0/);
  t.match(issuerText, /Certificate Sign, CRL Sign/);
  t.match((await openssl(["x509", "-in", f.ca, "-noout", "-text"])).stdout, /CA:TRUE, pathlen:1/);

  const x509 = new X509Certificate(issued.certPem);
  t.equal(x509.serialNumber.toLowerCase().replace(/^0+/, ""), issued.serial);
  t.same(x509.keyUsage, ["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"], "node:crypto sees both EKUs");
  t.equal(x509.ca, false);
  t.ok(new Date(x509.validFrom) < new Date(Date.now() - 4 * 60_000), "notBefore backdated");
});

t.test("identity certificates carry exactly one URI SAN for openssl", async (t) => {
  const { dir, pki, root } = await freshPki(t);
  const issued = await pki.issue({ role: "orchestrator", id: "orch-1" });
  const f = await files(root, dir, "orch", issued.certPem);
  const text = (await openssl(["x509", "-in", f.leaf, "-noout", "-ext", "subjectAltName,extendedKeyUsage"]))
    .stdout;
  t.match(text, /URI:spiffe:\/\/shoal\.local\/orchestrator\/orch-1/);
  t.notMatch(text, /DNS:|IP Address:|email:/);
  t.match(text, /TLS Web Client Authentication/);
  t.notMatch(text, /Server Authentication/);
});

t.test("openssl reads the CRL and refuses the revoked certificate with -crl_check", async (t) => {
  const { dir, pki, root } = await freshPki(t);
  const revoked = await pki.issue({ role: "compute", id: "lost" });
  const kept = await pki.issue({ role: "compute", id: "kept" });
  await pki.revoke(revoked.serial, "keyCompromise");
  const crlFile = path.join(root, "crl.pem");
  await fs.writeFile(crlFile, await pki.crl());
  const info = await openssl([
    "crl",
    "-in",
    crlFile,
    "-noout",
    "-text",
    "-CAfile",
    path.join(dir, "issuer.crt"),
  ]);
  t.match(info.stderr + info.stdout, /verify OK/);
  // openssl pads the hex to whole bytes; Shoal's serials carry no leading zero.
  t.match(info.stdout, new RegExp(`Serial Number: 0?${revoked.serial.toUpperCase()}\\b`));
  t.match(info.stdout, /Key Compromise/);
  t.match(info.stdout, /X509v3 CRL Number:\s+1/);

  const r = await files(root, dir, "revoked", revoked.certPem);
  const k = await files(root, dir, "kept", kept.certPem);
  const args = (leaf: string) => [
    "verify",
    "-crl_check",
    "-CRLfile",
    crlFile,
    "-CAfile",
    r.ca,
    "-untrusted",
    r.issuer,
    leaf,
  ];
  const bad = await openssl(args(r.leaf));
  t.not(bad.code, 0);
  t.match(bad.stdout + bad.stderr, /certificate revoked/);
  const good = await openssl(args(k.leaf));
  t.equal(good.code, 0, good.stdout + good.stderr);
});

t.test("openssl opens the PKCS#12 export with the password and no other", async (t) => {
  const { pki, root } = await freshPki(t);
  const issued = await pki.issue({ role: "user", id: "alice" });
  const p12 = path.join(root, "alice.p12");
  await fs.writeFile(
    p12,
    exportPkcs12({ certPem: issued.certPem, keyPem: issued.keyPem!, password: "pw-123" }),
  );
  const ok = await openssl(["pkcs12", "-info", "-in", p12, "-passin", "pass:pw-123", "-nodes"]);
  t.equal(ok.code, 0, ok.stderr);
  t.match(ok.stdout, /subject=CN = alice/);
  t.match(ok.stdout, /BEGIN PRIVATE KEY/);
  t.equal(ok.stdout.match(/BEGIN CERTIFICATE/g)?.length, 2, "leaf and issuing CA");
  const wrong = await openssl(["pkcs12", "-info", "-in", p12, "-passin", "pass:nope", "-nodes"]);
  t.not(wrong.code, 0);
  t.match(wrong.stderr + wrong.stdout, /invalid password|mac verify/i);
});

t.test("a CSR made by openssl is signed with the CA's names, not the CSR's", async (t) => {
  const { dir, pki, root } = await freshPki(t);
  const key = path.join(root, "node.key");
  const csr = path.join(root, "node.csr");
  const r = await openssl([
    "req",
    "-new",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
    key,
    "-out",
    csr,
    "-subj",
    "/CN=evil",
    "-addext",
    "subjectAltName=DNS:evil.example.com,URI:spiffe://shoal.local/orchestrator/root",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
  ]);
  t.equal(r.code, 0, r.stderr);
  const issued = await pki.signCsr(await fs.readFile(csr), { role: "compute", id: "edge-9" });
  t.equal(issued.keyPem, undefined);
  const info = inspectCertificate(issued.certPem);
  t.same(info.sans, ["spiffe://shoal.local/compute/edge-9"]);
  t.equal(info.subject, "CN=edge-9");
  t.equal(info.isCa, false);
  t.same(info.eku, ["clientAuth"]);
  await writeIssued(path.join(root, "node"), issued);
  const f = await files(root, dir, "node", issued.certPem);
  t.equal((await openssl(["verify", "-CAfile", f.ca, "-untrusted", f.issuer, f.leaf])).code, 0);
  const match = await openssl(["x509", "-in", f.leaf, "-noout", "-pubkey"]);
  const keyPub = await openssl(["pkey", "-in", key, "-pubout"]);
  t.equal(match.stdout, keyPub.stdout, "the certificate holds the CSR's key");
});
