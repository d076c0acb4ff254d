import { X509Certificate } from "node:crypto";
import { promises as fs } from "node:fs";
import { isIP } from "node:net";
import path from "node:path";
import type { IssuedCertificate, Pki } from "../pki/index.js";
import { certificateRenewalTime, writeIssued } from "../pki/index.js";

/** A certificate and key on disk, and when it is due for renewal. */
export interface CertFiles {
  certFile: string;
  keyFile: string;
  notAfter: Date;
  /** When to issue the next one (PKI.RenewBefore ahead of expiry, at most a third of its life). */
  renewAt: Date;
  /** True when this call issued a new certificate (the caller reloads whoever uses it). */
  renewed: boolean;
}

/** How long the orchestrator's own certificates live and when they are renewed. */
export interface OwnCertificatePolicy {
  /** PKI.CertTTL. */
  ttlMs: number;
  /** PKI.RenewBefore. */
  renewBeforeMs: number;
  /** @default new Date() */
  now?: Date;
}

async function current(prefix: string): Promise<X509Certificate | undefined> {
  const pem = await fs.readFile(`${prefix}.crt`, "utf8").catch(() => undefined);
  const key = await fs.stat(`${prefix}.key`).catch(() => undefined);
  if (!pem || !key) return undefined;
  try {
    return new X509Certificate(pem);
  } catch {
    return undefined;
  }
}

function renewAt(cert: X509Certificate, renewBeforeMs: number): Date {
  return certificateRenewalTime(new Date(cert.validFrom), new Date(cert.validTo), renewBeforeMs);
}

function fresh(cert: X509Certificate, issuerPem: string, p: OwnCertificatePolicy, now: Date): boolean {
  return (
    now < renewAt(cert, p.renewBeforeMs) &&
    cert.checkIssued(new X509Certificate(issuerPem)) &&
    new Date(cert.validFrom) <= now
  );
}

function files(prefix: string, cert: X509Certificate, p: OwnCertificatePolicy, renewed: boolean): CertFiles {
  return {
    certFile: `${prefix}.crt`,
    keyFile: `${prefix}.key`,
    notAfter: new Date(cert.validTo),
    renewAt: renewAt(cert, p.renewBeforeMs),
    renewed,
  };
}

async function install(
  prefix: string,
  issued: IssuedCertificate,
  p: OwnCertificatePolicy,
): Promise<CertFiles> {
  await fs.mkdir(path.dirname(prefix), { recursive: true, mode: 0o700 });
  // Key then certificate, each by rename: a reader never sees a half-written file.
  await writeIssued(prefix, issued);
  return files(prefix, new X509Certificate(issued.certPem), p, true);
}

/**
 * A server certificate from the built-in PKI at `PREFIX.crt`/`PREFIX.key`
 * covering `names` (DNS names and IPs; localhost and 127.0.0.1 are always
 * added by the PKI). An existing one is kept while it is not due for renewal,
 * chains to the PKI and covers every name; otherwise a new one (new key,
 * PKI.CertTTL) replaces it.
 */
export async function ensureServerCertificate(
  pki: Pki,
  prefix: string,
  names: readonly string[],
  policy: OwnCertificatePolicy,
): Promise<CertFiles> {
  const now = policy.now ?? new Date();
  const dns = [...new Set(names.filter((n) => n && !isIP(n)))];
  const ip = [...new Set(names.filter((n) => isIP(n)))];
  const have = await current(prefix);
  if (have && fresh(have, pki.issuerCertPem, policy, now)) {
    const sans = have.subjectAltName ?? "";
    const covered = [...dns.map((d) => `DNS:${d}`), ...ip.map((i) => `IP Address:${i}`)].every((s) =>
      sans.includes(s),
    );
    if (covered) return files(prefix, have, policy, false);
  }
  const notAfter = new Date(now.getTime() + policy.ttlMs);
  const issued = await pki.issue({ role: "server", id: path.basename(prefix), dns, ip, notAfter });
  return install(prefix, issued, policy);
}

/**
 * The orchestrator's own fabric identity (`spiffe://TD/orchestrator/<id>`):
 * kept while not due for renewal, else issued again with a new key for PKI.CertTTL.
 */
export async function ensureIdentityCertificate(
  pki: Pki,
  prefix: string,
  id: string,
  policy: OwnCertificatePolicy,
): Promise<CertFiles> {
  const now = policy.now ?? new Date();
  const have = await current(prefix);
  const uri = `URI:spiffe://${pki.trustDomain}/orchestrator/${id}`;
  if (have && fresh(have, pki.issuerCertPem, policy, now) && have.subjectAltName?.includes(uri)) {
    return files(prefix, have, policy, false);
  }
  const issued = await pki.issue({
    role: "orchestrator",
    id,
    notAfter: new Date(now.getTime() + policy.ttlMs),
  });
  return install(prefix, issued, policy);
}
