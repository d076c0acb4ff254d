import { createPrivateKey, type KeyObject, type X509Certificate } from "node:crypto";
import { readFileChecked } from "../core/index.js";
import { certFingerprint, readCertificates } from "../pki/index.js";
import { API_TLS_CODES, ApiTlsError } from "./api-tls-errors.js";
import { canonicalIp } from "./api-tls-names.js";

/** Where the API's current certificate came from. */
export type ApiTlsSource = "files" | "self-signed" | "acme";

/** A checked certificate chain and its key: what the HTTPS server presents. */
export interface TlsMaterial {
  /** Leaf first, then intermediates. */
  readonly certPem: string;
  readonly keyPem: string;
  readonly source: ApiTlsSource;
  /** `sha256:<hex>` of the leaf DER. */
  readonly fingerprint: string;
  /** Lower-case hex serial of the leaf. */
  readonly serial: string;
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** `DNS:name` and `IP:addr` entries of the leaf, in certificate order. */
  readonly sans: readonly string[];
}

/**
 * A certificate whose notBefore is at most this far ahead of our clock is
 * accepted: a CA's clock may run slightly ahead of ours (ACME CAs stamp the
 * issue time, without backdating).
 */
export const NOT_BEFORE_SKEW_MS = 5 * 60 * 1000;

/** The leaf's SANs as `DNS:x` / `IP:y` (node spells IPs `IP Address:`). */
function subjectAltNames(leaf: X509Certificate): string[] {
  return (leaf.subjectAltName ?? "")
    .split(", ")
    .filter(Boolean)
    .map((s) => (s.startsWith("IP Address:") ? `IP:${canonicalIp(s.slice("IP Address:".length))}` : s));
}

/**
 * Parses and checks a certificate chain and private key: both parse, the key
 * belongs to the leaf, and `now` lies in the leaf's validity window. `where`
 * names the files in messages. Pure apart from the clock passed in.
 */
export function checkTlsMaterial(
  certPem: string,
  keyPem: string,
  source: ApiTlsSource,
  now: Date,
  where: { cert: string; key: string },
): TlsMaterial {
  let leaf: X509Certificate;
  try {
    [leaf] = readCertificates(certPem, where.cert) as [X509Certificate];
  } catch (err) {
    throw new ApiTlsError(
      API_TLS_CODES.SHOAL_API_TLS_BAD_PEM,
      `${where.cert} holds no valid PEM certificate`,
      {
        cause: err,
        file: where.cert,
        fix: "give a PEM file with the server certificate first, then its intermediates (-----BEGIN CERTIFICATE-----)",
      },
    );
  }
  let key: KeyObject;
  try {
    key = createPrivateKey(keyPem);
  } catch (err) {
    throw new ApiTlsError(
      API_TLS_CODES.SHOAL_API_TLS_BAD_PEM,
      `${where.key} holds no valid PEM private key`,
      {
        cause: err,
        file: where.key,
        fix: "give an unencrypted PEM private key (PKCS#8 -----BEGIN PRIVATE KEY----- or PKCS#1/SEC1)",
      },
    );
  }
  if (!leaf.checkPrivateKey(key)) {
    throw new ApiTlsError(
      API_TLS_CODES.SHOAL_API_TLS_KEY_MISMATCH,
      `${where.key} is not the private key of the certificate in ${where.cert} (${leaf.subject.replace(/\n/g, ", ")})`,
      {
        file: where.key,
        fix: "install the key and certificate from the same issuance; replace the key first, then the certificate, or both atomically",
      },
    );
  }
  const notBefore = new Date(leaf.validFrom);
  const notAfter = new Date(leaf.validTo);
  if (now.getTime() + NOT_BEFORE_SKEW_MS < notBefore.getTime() || now > notAfter) {
    throw new ApiTlsError(
      API_TLS_CODES.SHOAL_API_TLS_EXPIRED,
      `the certificate in ${where.cert} is valid from ${notBefore.toISOString()} to ${notAfter.toISOString()}, not now (${now.toISOString()})`,
      { file: where.cert, fix: "install a renewed certificate (check the clock if it is not valid yet)" },
    );
  }
  return {
    certPem,
    keyPem,
    source,
    fingerprint: certFingerprint(leaf.raw),
    serial: leaf.serialNumber.toLowerCase().replace(/^0+(?=.)/, ""),
    notBefore,
    notAfter,
    sans: subjectAltNames(leaf),
  };
}

/** Reads and checks an operator's certificate and key files ({@link checkTlsMaterial}). */
export async function loadTlsFiles(
  certFile: string,
  keyFile: string,
  source: ApiTlsSource,
  now: Date,
): Promise<TlsMaterial> {
  const read = async (file: string) => {
    try {
      return (await readFileChecked(file)).toString("utf8");
    } catch (err) {
      throw new ApiTlsError(API_TLS_CODES.SHOAL_API_TLS_BAD_PEM, `cannot read ${file}`, {
        cause: err,
        file,
        fix: "check that the file exists and that the orchestrator's user may read it",
      });
    }
  };
  const [certPem, keyPem] = await Promise.all([read(certFile), read(keyFile)]);
  return checkTlsMaterial(certPem, keyPem, source, now, { cert: certFile, key: keyFile });
}

/**
 * When a certificate should be renewed: after `fraction` of its lifetime has
 * passed (2/3 renews a 90-day certificate 30 days before it expires).
 */
export function renewalTime(m: Pick<TlsMaterial, "notBefore" | "notAfter">, fraction: number): Date {
  const life = m.notAfter.getTime() - m.notBefore.getTime();
  return new Date(m.notBefore.getTime() + life * fraction);
}

/** True when `m` carries every one of `names` (DNS names and IPs) as a SAN. */
export function coversNames(
  m: Pick<TlsMaterial, "sans">,
  names: { dns: readonly string[]; ip: readonly string[] },
) {
  const have = new Set(m.sans);
  return (
    names.dns.every((d) => have.has(`DNS:${d.toLowerCase()}`)) &&
    names.ip.every((i) => have.has(`IP:${canonicalIp(i)}`))
  );
}
