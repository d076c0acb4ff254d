import type { X509Certificate } from "node:crypto";
import { isIP } from "node:net";
import { AsnConvert } from "@peculiar/asn1-schema";
import { Certificate } from "@peculiar/asn1-x509";
import { type CertInfo, describeCertificate } from "./certificate-info.js";
import { parseCrl } from "./crl.js";
import { PKI_CODES, type VerifyFailure } from "./errors.js";
import { verifyDer } from "./key-types.js";
import { readCertificates } from "./pem.js";
import { isIdentityRole, parseSpiffeId, type Role } from "./spiffe.js";

export type { VerifyFailure } from "./errors.js";

export interface VerifyOptions {
  /** PEM of the trusted root(s): the `ca.crt` of the fabric. */
  caPem: string | Uint8Array;
  /** A host name or IP address the certificate must be valid for. */
  host?: string;
  /** The role the certificate must fit: server needs serverAuth; identities need clientAuth and their SPIFFE role. */
  role?: Role;
  /** The trust domain an identity's SPIFFE id must be in. */
  trustDomain?: string;
  /** A CRL from the issuing CA; a listed certificate fails. */
  crlPem?: string | Uint8Array;
  /** The time to verify at. @default now */
  at?: Date;
}

export type VerifyResult =
  | { ok: true; leaf: CertInfo; chain: CertInfo[] }
  | { ok: false; failures: VerifyFailure[]; leaf: CertInfo; chain: CertInfo[] };

/** At most this many certificates between leaf and anchor; Shoal's own chains have one. */
const MAX_PATH = 6;

interface Node {
  cert: X509Certificate;
  info: CertInfo;
}

function node(cert: X509Certificate): Node {
  return { cert, info: describeCertificate(cert) };
}

/** `child` names `parent` as its issuer (DN, and key id when both carry one). */
function namesIssuer(child: Node, parent: Node): boolean {
  if (child.cert.issuer !== parent.cert.subject) return false;
  const aki = child.info.authorityKeyId;
  const ski = parent.info.subjectKeyId;
  return !aki || !ski || aki === ski;
}

function signedBy(child: Node, parent: Node): boolean {
  try {
    return child.cert.verify(parent.cert.publicKey);
  } catch {
    return false;
  }
}

function label(n: Node, isLeaf: boolean): string {
  return isLeaf ? `the certificate (${n.info.subject})` : `the CA certificate ${n.info.subject}`;
}

/**
 * Full path validation of `chainPem` (leaf first, then intermediates) against the
 * roots in `caPem`: signatures, validity windows, CA flag and path length, issuer
 * key usage, EKU and SPIFFE role, host name/IP and CRL revocation. Every failed
 * check is reported with its code, a message naming the cause and how to fix it.
 * Throws only for input that cannot be parsed (SHOAL_PKI_BAD_PEM, SHOAL_PKI_BAD_CRL).
 */
export function verifyCertificate(chainPem: string | Uint8Array, opts: VerifyOptions): VerifyResult {
  const at = opts.at ?? new Date();
  const given = readCertificates(chainPem, "the certificate").map(node);
  const anchors = readCertificates(opts.caPem, "the CA file").map(node);
  const leaf = given[0]!;
  const failures: VerifyFailure[] = [];
  const fail = (code: VerifyFailure["code"], message: string, fix: string) =>
    failures.push({ code, message, fix });

  // Build the path leaf → ... → anchor.
  const path: Node[] = [leaf];
  let anchored = anchors.some((a) => a.cert.raw.equals(leaf.cert.raw));
  while (!anchored && path.length <= MAX_PATH) {
    const current = path[path.length - 1]!;
    const anchor = anchors.find((a) => namesIssuer(current, a));
    if (anchor) {
      if (!signedBy(current, anchor)) {
        fail(
          PKI_CODES.SHOAL_PKI_UNTRUSTED,
          `${label(current, current === leaf)} names ${anchor.info.subject} as issuer, but the CA given is a different CA with that name (its key did not sign it)`,
          "verify with the ca.crt of the PKI that issued this certificate, or reissue it from this CA",
        );
        break;
      }
      path.push(anchor);
      anchored = true;
      break;
    }
    const next = given.find((c) => !path.includes(c) && namesIssuer(current, c));
    if (!next) {
      fail(
        PKI_CODES.SHOAL_PKI_UNTRUSTED,
        `${label(current, current === leaf)} was issued by ${current.info.issuer}, which does not chain to the CA given (${anchors.map((a) => a.info.subject).join("; ")})`,
        current === leaf
          ? "verify with the ca.crt of the PKI that issued it, or reissue the certificate from this CA (`shoal pki issue`)"
          : "include the intermediate (issuer.crt) after the leaf in the certificate file, as `shoal pki issue` writes it",
      );
      break;
    }
    if (!signedBy(current, next)) {
      fail(
        PKI_CODES.SHOAL_PKI_BAD_SIGNATURE,
        `the signature on ${label(current, current === leaf)} does not verify with the key of ${next.info.subject}`,
        "the certificate was altered or mixed with another CA's issuer.crt; reissue it",
      );
    }
    path.push(next);
  }
  if (!anchored && path.length > MAX_PATH && failures.length === 0) {
    fail(
      PKI_CODES.SHOAL_PKI_PATH_LENGTH,
      `the chain is longer than ${MAX_PATH} certificates`,
      "reissue the certificate",
    );
  }

  // Validity windows, along the whole path.
  path.forEach((n, i) => {
    const what = label(n, i === 0);
    if (at.getTime() < n.info.notBefore.getTime()) {
      fail(
        PKI_CODES.SHOAL_PKI_NOT_YET_VALID,
        `${what} is not valid until ${n.info.notBefore.toISOString()} (now ${at.toISOString()})`,
        "check this machine's clock (NTP), or wait until the certificate's start date",
      );
    } else if (at.getTime() > n.info.notAfter.getTime()) {
      fail(
        PKI_CODES.SHOAL_PKI_EXPIRED,
        `${what} expired ${n.info.notAfter.toISOString()} (now ${at.toISOString()})`,
        i === 0
          ? "reissue it (`shoal pki issue ...` or let the node renew) and reload the service"
          : "the CA has expired: create a new PKI (`shoal pki init`) and reissue every certificate",
      );
    }
  });

  // CA constraints of every issuer in the path.
  for (let i = 1; i < path.length; i++) {
    const n = path[i]!;
    if (!n.info.isCa) {
      fail(
        PKI_CODES.SHOAL_PKI_NOT_CA,
        `${n.info.subject} signed ${path[i - 1]!.info.subject} but is not a CA (no basicConstraints cA=TRUE)`,
        "only the issuing CA may sign certificates; reissue the certificate with `shoal pki issue`",
      );
    }
    if (n.info.keyUsage && !n.info.keyUsage.includes("keyCertSign")) {
      fail(
        PKI_CODES.SHOAL_PKI_ISSUER_KEY_USAGE,
        `${n.info.subject} may not sign certificates (key usage: ${n.info.keyUsage.join(", ")})`,
        "use a CA whose key usage includes keyCertSign, e.g. the issuer made by `shoal pki init`",
      );
    }
    // Intermediates below this CA in the path (self-issued certificates would not count; Shoal makes none).
    const below = i - 1;
    if (n.info.pathLen !== undefined && below > n.info.pathLen) {
      fail(
        PKI_CODES.SHOAL_PKI_PATH_LENGTH,
        `${n.info.subject} allows ${n.info.pathLen} intermediate CA(s) below it, but the chain has ${below}`,
        "issue the certificate from the issuing CA directly",
      );
    }
  }

  checkLeaf(leaf.info, leaf.cert, opts, fail);

  if (opts.crlPem !== undefined && path.length > 1) checkCrl(opts.crlPem, leaf, path[1]!, at, fail);

  const chain = path.map((n) => n.info);
  return failures.length === 0
    ? { ok: true, leaf: leaf.info, chain }
    : { ok: false, failures, leaf: leaf.info, chain };
}

type Fail = (code: VerifyFailure["code"], message: string, fix: string) => void;

function checkLeaf(info: CertInfo, cert: X509Certificate, opts: VerifyOptions, fail: Fail): void {
  if (info.keyUsage && !info.keyUsage.includes("digitalSignature")) {
    fail(
      PKI_CODES.SHOAL_PKI_KEY_USAGE,
      `the certificate's key usage (${info.keyUsage.join(", ")}) does not allow digital signatures, which TLS needs`,
      "reissue it with `shoal pki issue`",
    );
  }
  const role = opts.role;
  if (role !== undefined) {
    const needed = role === "server" ? "serverAuth" : "clientAuth";
    if (info.eku.length > 0 && !info.eku.includes(needed)) {
      fail(
        PKI_CODES.SHOAL_PKI_EKU,
        `a ${role} certificate needs the ${needed} extended key usage; this one has ${info.eku.join(", ")}`,
        `reissue it with \`shoal pki issue ${role}\`, which sets ${needed}`,
      );
    }
    if (isIdentityRole(role)) {
      const parsed = info.spiffeId ? parseSpiffeId(info.spiffeId) : undefined;
      if (!parsed) {
        fail(
          PKI_CODES.SHOAL_PKI_ROLE_MISMATCH,
          `a ${role} identity needs the URI SAN spiffe://<trust-domain>/${role}/<id>; this certificate has ${info.sans.join(", ") || "no SANs"}`,
          `issue an identity certificate: \`shoal pki issue ${role} --id ID\``,
        );
      } else {
        if (parsed.role !== role) {
          fail(
            PKI_CODES.SHOAL_PKI_ROLE_MISMATCH,
            `the certificate is a ${parsed.role} identity (${info.spiffeId}), not a ${role}`,
            `use the node's ${role} certificate, or issue one with \`shoal pki issue ${role} --id ${parsed.id}\``,
          );
        }
        if (opts.trustDomain !== undefined && parsed.trustDomain !== opts.trustDomain) {
          fail(
            PKI_CODES.SHOAL_PKI_TRUST_DOMAIN_MISMATCH,
            `the identity ${info.spiffeId} is in trust domain ${parsed.trustDomain}, not ${opts.trustDomain}`,
            "issue the certificate from this fabric's PKI, or set PKI.TrustDomain to match",
          );
        }
      }
    }
  }
  if (opts.host !== undefined) {
    const host = opts.host.trim().replace(/^\[(.*)\]$/, "$1");
    const ip = isIP(host) !== 0;
    // node:crypto applies RFC 6125 matching; subject "never" ignores the CN as browsers do.
    const matched = ip
      ? cert.checkIP(host) !== undefined
      : cert.checkHost(host, { subject: "never" }) !== undefined;
    if (!matched) {
      const names = [...info.dns, ...info.ips];
      fail(
        PKI_CODES.SHOAL_PKI_HOST_MISMATCH,
        `valid for ${names.join(", ") || "no host names or addresses"} — not ${host}`,
        `reissue with ${ip ? "--ip" : "--dns"} ${host}`,
      );
    }
  }
}

function checkCrl(crlPem: string | Uint8Array, leaf: Node, issuer: Node, at: Date, fail: Fail): void {
  const crl = parseCrl(crlPem, "the CRL");
  const issuerSubject = AsnConvert.serialize(
    AsnConvert.parse(issuer.cert.raw, Certificate).tbsCertificate.subject,
  );
  const sameIssuer = Buffer.from(AsnConvert.serialize(crl.issuer)).equals(Buffer.from(issuerSubject));
  if (!sameIssuer || !verifyDer(issuer.cert.publicKey, crl.signatureOid, crl.tbs, crl.signature)) {
    fail(
      PKI_CODES.SHOAL_PKI_CRL_INVALID,
      `the CRL is not signed by ${issuer.info.subject}, the issuer of the certificate`,
      "use the CRL of the PKI that issued the certificate (`shoal pki crl --dir DIR --out FILE`)",
    );
    return;
  }
  if (
    crl.thisUpdate.getTime() > at.getTime() ||
    (crl.nextUpdate && crl.nextUpdate.getTime() < at.getTime())
  ) {
    fail(
      PKI_CODES.SHOAL_PKI_CRL_INVALID,
      `the CRL is out of date (valid ${crl.thisUpdate.toISOString()} to ${crl.nextUpdate?.toISOString() ?? "-"})`,
      "make a fresh CRL with `shoal pki crl --dir DIR --out FILE`",
    );
    return;
  }
  const entry = crl.entries.find((e) => e.serial === leaf.info.serial);
  if (entry) {
    fail(
      PKI_CODES.SHOAL_PKI_REVOKED,
      `the certificate (serial ${entry.serial}) was revoked ${entry.revokedAt.toISOString()}${entry.reason ? ` (${entry.reason})` : ""}`,
      "issue a new certificate for this node; a revoked one cannot be restored",
    );
  }
}
