import "reflect-metadata";
import type { KeyObject } from "node:crypto";
import t from "tap";
import {
  buildCertificate,
  buildName,
  type CertificateTemplate,
  KeyUsageFlags,
  randomSerial,
  signerFromCertificate,
} from "../pki/certificate-builder.js";
import { buildCrl } from "../pki/crl.js";
import { verifyCertificate } from "../pki/index.js";
import { generatePrivateKey, publicKeyInfo } from "../pki/key-types.js";
import { toPem } from "../pki/pem.js";

// Fixed dates: every certificate here is valid during 2030 only.
const from = new Date("2030-01-01T00:00:00Z");
const until = new Date("2031-01-01T00:00:00Z");
const at = new Date("2030-06-01T00:00:00Z");

interface Made {
  der: Buffer;
  key: KeyObject;
}

function make(
  name: string,
  issuer: Made | undefined,
  extra: Partial<CertificateTemplate> & { org?: string } = {},
): Made {
  const key = generatePrivateKey("ecdsa-p256");
  const template: CertificateTemplate = {
    serial: randomSerial(),
    subject: buildName(name, extra.org),
    publicKey: publicKeyInfo(key),
    notBefore: from,
    notAfter: until,
    keyUsage: KeyUsageFlags.digitalSignature,
    ...extra,
  };
  const der = issuer
    ? buildCertificate(template, signerFromCertificate(issuer.der, issuer.key, "ecdsa-p256"))
    : buildCertificate(template, { selfSigned: key, keyType: "ecdsa-p256" });
  return { der, key };
}

const caUsage = KeyUsageFlags.keyCertSign | KeyUsageFlags.cRLSign;
const pem = (...certs: Made[]) => certs.map((c) => toPem("CERTIFICATE", c.der)).join("");
const codes = (r: ReturnType<typeof verifyCertificate>) => (r.ok ? [] : r.failures.map((f) => f.code));

const root = make("Root", undefined, { ca: { pathLen: 1 }, keyUsage: caUsage });
const issuer = make("Issuer", root, { ca: { pathLen: 0 }, keyUsage: caUsage });
const server = make("srv", issuer, {
  extKeyUsage: ["serverAuth", "clientAuth"],
  dns: ["localhost"],
  ips: ["10.0.5.16"],
});
const compute = make("edge-1", issuer, {
  extKeyUsage: ["clientAuth"],
  uris: ["spiffe://shoal.local/compute/edge-1"],
});
const caPem = pem(root);

t.test("a good chain verifies at a fixed date and reports the path", async (t) => {
  const r = verifyCertificate(pem(server, issuer), { caPem, at, host: "10.0.5.16", role: "server" });
  t.ok(r.ok);
  t.same(
    r.chain.map((c) => c.subject),
    ["CN=srv", "CN=Issuer", "CN=Root"],
  );
  t.ok(
    verifyCertificate(pem(compute, issuer), { caPem, at, role: "compute", trustDomain: "shoal.local" }).ok,
  );
});

t.test("validity windows are checked along the path", async (t) => {
  t.same(codes(verifyCertificate(pem(server, issuer), { caPem, at: new Date("2029-12-31T00:00:00Z") })), [
    "SHOAL_PKI_NOT_YET_VALID",
    "SHOAL_PKI_NOT_YET_VALID",
    "SHOAL_PKI_NOT_YET_VALID",
  ]);
  const r = verifyCertificate(pem(server, issuer), { caPem, at: new Date("2031-02-01T00:00:00Z") });
  t.same(codes(r), ["SHOAL_PKI_EXPIRED", "SHOAL_PKI_EXPIRED", "SHOAL_PKI_EXPIRED"]);
  t.match(!r.ok && r.failures[0]?.fix, /reissue/);
  t.match(!r.ok && r.failures[1]?.fix, /new PKI/);
});

t.test("a chain to another CA, or without its intermediate, is untrusted", async (t) => {
  const otherRoot = make("Other", undefined, { ca: { pathLen: 1 }, keyUsage: caUsage });
  const foreign = verifyCertificate(pem(server, issuer), { caPem: pem(otherRoot), at });
  t.same(codes(foreign), ["SHOAL_PKI_UNTRUSTED"]);
  const missing = verifyCertificate(pem(server), { caPem, at });
  t.same(codes(missing), ["SHOAL_PKI_UNTRUSTED"]);
  t.match(!missing.ok && missing.failures[0]?.fix, /intermediate|ca\.crt/);
  // Same name, different key: the classic impostor root.
  const impostor = make("Root", undefined, { ca: { pathLen: 1 }, keyUsage: caUsage });
  const r = verifyCertificate(pem(server, issuer), { caPem: pem(impostor), at });
  t.same(codes(r), ["SHOAL_PKI_UNTRUSTED"]);
});

t.test("a tampered signature is caught", async (t) => {
  const der = Buffer.from(server.der);
  der[der.length - 5]! ^= 0x01;
  const r = verifyCertificate(pem({ der, key: server.key }, issuer), { caPem, at });
  t.same(codes(r), ["SHOAL_PKI_BAD_SIGNATURE"]);
});

t.test("only CAs may sign, within their path length and key usage", async (t) => {
  const leafSigned = make("sub", server, { extKeyUsage: ["clientAuth"] });
  t.same(codes(verifyCertificate(pem(leafSigned, server, issuer), { caPem, at })), [
    "SHOAL_PKI_NOT_CA",
    "SHOAL_PKI_ISSUER_KEY_USAGE",
    "SHOAL_PKI_PATH_LENGTH",
    "SHOAL_PKI_PATH_LENGTH",
  ]);
  const sub = make("Sub CA", issuer, { ca: { pathLen: 0 }, keyUsage: caUsage });
  const deep = make("deep", sub, { extKeyUsage: ["clientAuth"] });
  // Both the issuing CA (pathLen 0) and the root (pathLen 1) are exceeded.
  const r = verifyCertificate(pem(deep, sub, issuer), { caPem, at });
  t.same(codes(r), ["SHOAL_PKI_PATH_LENGTH", "SHOAL_PKI_PATH_LENGTH"]);
  t.match(
    !r.ok && r.failures[0]?.message,
    /CN=Issuer allows 0 intermediate CA\(s\) below it, but the chain has 1/,
  );
  const noSign = make("No Sign CA", root, { ca: { pathLen: 0 }, keyUsage: KeyUsageFlags.cRLSign });
  const leaf = make("leaf", noSign, { extKeyUsage: ["clientAuth"] });
  t.same(codes(verifyCertificate(pem(leaf, noSign), { caPem, at })), ["SHOAL_PKI_ISSUER_KEY_USAGE"]);
});

t.test("role, EKU, trust domain and host are checked on the leaf", async (t) => {
  t.same(codes(verifyCertificate(pem(compute, issuer), { caPem, at, role: "server" })), ["SHOAL_PKI_EKU"]);
  t.same(codes(verifyCertificate(pem(server, issuer), { caPem, at, role: "user" })), [
    "SHOAL_PKI_ROLE_MISMATCH",
  ]);
  t.same(
    codes(verifyCertificate(pem(compute, issuer), { caPem, at, role: "compute", trustDomain: "prod" })),
    ["SHOAL_PKI_TRUST_DOMAIN_MISMATCH"],
  );
  const r = verifyCertificate(pem(server, issuer), { caPem, at, host: "10.0.5.17" });
  t.same(codes(r), ["SHOAL_PKI_HOST_MISMATCH"]);
  t.equal(!r.ok && r.failures[0]?.message, "valid for localhost, 10.0.5.16 — not 10.0.5.17");
  t.equal(!r.ok && r.failures[0]?.fix, "reissue with --ip 10.0.5.17");
  const byName = verifyCertificate(pem(server, issuer), { caPem, at, host: "node.example.com" });
  t.equal(!byName.ok && byName.failures[0]?.fix, "reissue with --dns node.example.com");
  const signOnly = make("nosig", issuer, {
    keyUsage: KeyUsageFlags.keyEncipherment,
    extKeyUsage: ["clientAuth"],
  });
  t.same(codes(verifyCertificate(pem(signOnly, issuer), { caPem, at })), ["SHOAL_PKI_KEY_USAGE"]);
});

t.test("revocation is checked against a CRL signed by the issuer and in date", async (t) => {
  const signer = signerFromCertificate(issuer.der, issuer.key, "ecdsa-p256");
  const serial = Buffer.from(
    new (await import("node:crypto")).X509Certificate(compute.der).serialNumber,
    "hex",
  )
    .toString("hex")
    .replace(/^0+/, "")
    .toLowerCase();
  const crl = buildCrl(signer, {
    number: 1,
    thisUpdate: new Date("2030-05-01T00:00:00Z"),
    nextUpdate: new Date("2030-07-01T00:00:00Z"),
    entries: [{ serial, revokedAt: new Date("2030-05-01T00:00:00Z"), reason: "keyCompromise" }],
  });
  const r = verifyCertificate(pem(compute, issuer), { caPem, at, crlPem: crl });
  t.same(codes(r), ["SHOAL_PKI_REVOKED"]);
  t.match(!r.ok && r.failures[0]?.message, /keyCompromise/);
  t.ok(verifyCertificate(pem(server, issuer), { caPem, at, crlPem: crl }).ok, "others are not affected");
  t.same(
    codes(
      verifyCertificate(pem(compute, issuer), { caPem, at: new Date("2030-08-01T00:00:00Z"), crlPem: crl }),
    ),
    ["SHOAL_PKI_CRL_INVALID"],
  );
  const otherIssuer = make("Issuer", root, { ca: { pathLen: 0 }, keyUsage: caUsage });
  const forged = buildCrl(signerFromCertificate(otherIssuer.der, otherIssuer.key, "ecdsa-p256"), {
    number: 1,
    thisUpdate: new Date("2030-05-01T00:00:00Z"),
    nextUpdate: new Date("2030-07-01T00:00:00Z"),
    entries: [],
  });
  t.same(codes(verifyCertificate(pem(compute, issuer), { caPem, at, crlPem: forged })), [
    "SHOAL_PKI_CRL_INVALID",
  ]);
  t.throws(() => verifyCertificate(pem(compute, issuer), { caPem, at, crlPem: "not a crl" }), {
    code: "SHOAL_PKI_BAD_CRL",
  });
});
