import { X509Certificate } from "node:crypto";
import { promises as fs } from "node:fs";
import { isIP } from "node:net";
import path from "node:path";
import type { Pki } from "../pki/index.js";
import { writeIssued } from "../pki/index.js";

/** A certificate and key on disk. */
export interface CertFiles {
  certFile: string;
  keyFile: string;
}

/** Reissue a certificate this long before it expires. */
const RENEW_BEFORE_MS = 7 * 86_400_000;

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

function fresh(cert: X509Certificate, issuerPem: string, now: number): boolean {
  return (
    new Date(cert.validTo).getTime() - now > RENEW_BEFORE_MS &&
    cert.checkIssued(new X509Certificate(issuerPem)) &&
    new Date(cert.validFrom).getTime() <= now
  );
}

/**
 * A server certificate from the built-in PKI at `PREFIX.crt`/`PREFIX.key`
 * covering `names` (DNS names and IPs; localhost and 127.0.0.1 are always
 * added by the PKI). An existing one is kept while it is fresh, chains to the
 * PKI and covers every name; otherwise a new one is issued.
 */
export async function ensureServerCertificate(
  pki: Pki,
  prefix: string,
  names: readonly string[],
): Promise<CertFiles> {
  const dns = [...new Set(names.filter((n) => n && !isIP(n)))];
  const ip = [...new Set(names.filter((n) => isIP(n)))];
  const have = await current(prefix);
  if (have && fresh(have, pki.issuerCertPem, Date.now())) {
    const sans = have.subjectAltName ?? "";
    const covered = [...dns.map((d) => `DNS:${d}`), ...ip.map((i) => `IP Address:${i}`)].every((s) =>
      sans.includes(s),
    );
    if (covered) return { certFile: `${prefix}.crt`, keyFile: `${prefix}.key` };
  }
  await fs.mkdir(path.dirname(prefix), { recursive: true, mode: 0o700 });
  await pki.issue({ role: "server", id: path.basename(prefix), dns, ip }, { out: prefix });
  return { certFile: `${prefix}.crt`, keyFile: `${prefix}.key` };
}

/** The orchestrator's own fabric identity (`spiffe://TD/orchestrator/<id>`), issued once and renewed when stale. */
export async function ensureIdentityCertificate(pki: Pki, prefix: string, id: string): Promise<CertFiles> {
  const have = await current(prefix);
  const uri = `URI:spiffe://${pki.trustDomain}/orchestrator/${id}`;
  if (!(have && fresh(have, pki.issuerCertPem, Date.now()) && have.subjectAltName?.includes(uri))) {
    await fs.mkdir(path.dirname(prefix), { recursive: true, mode: 0o700 });
    const issued = await pki.issue({ role: "orchestrator", id });
    await writeIssued(prefix, issued);
  }
  return { certFile: `${prefix}.crt`, keyFile: `${prefix}.key` };
}
