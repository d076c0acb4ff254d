import type { X509Certificate } from "node:crypto";
import { AsnConvert } from "@peculiar/asn1-schema";
import {
  AuthorityKeyIdentifier,
  BasicConstraints,
  Certificate,
  ExtendedKeyUsage,
  id_ce_authorityKeyIdentifier,
  id_ce_basicConstraints,
  id_ce_extKeyUsage,
  id_ce_keyUsage,
  id_ce_subjectAltName,
  id_ce_subjectKeyIdentifier,
  KeyUsage,
  SubjectAlternativeName,
  SubjectKeyIdentifier,
} from "@peculiar/asn1-x509";
import { EKU_OIDS } from "./certificate-builder.js";
import { PKI_CODES, PkiError } from "./errors.js";
import { describeKey } from "./key-types.js";
import { normalizeSerial, readCertificates, sha256Fingerprint } from "./pem.js";
import { parseSpiffeId } from "./spiffe.js";

/** What `pki inspect` shows and what verification reasons about. */
export interface CertInfo {
  subject: string;
  issuer: string;
  /** Lower-case hex, no leading zeros. */
  serial: string;
  notBefore: Date;
  notAfter: Date;
  /** `sha256:<hex>` of the DER certificate. */
  fingerprint: string;
  /** e.g. "ECDSA P-256", "RSA 3072". */
  keyType: string;
  /** Every SAN value: DNS names, then IP addresses, then URIs. */
  sans: string[];
  dns: string[];
  ips: string[];
  uris: string[];
  /** The Shoal SPIFFE id among the URI SANs, if any. */
  spiffeId?: string;
  /** Extended key usages by name (serverAuth, clientAuth) or OID when unnamed. Empty when absent. */
  eku: string[];
  /** Key usage names; undefined when the extension is absent. */
  keyUsage?: string[];
  isCa: boolean;
  pathLen?: number;
  subjectKeyId?: string;
  authorityKeyId?: string;
  signatureAlgorithm: string;
}

const EKU_NAMES = new Map<string, string>(Object.entries(EKU_OIDS).map(([name, oid]) => [oid, name]));
const SIG_NAMES: Record<string, string> = {
  "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
  "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
  "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
  "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
  "1.2.840.113549.1.1.12": "sha384WithRSAEncryption",
  "1.2.840.113549.1.1.13": "sha512WithRSAEncryption",
};

function distinguishedName(nodeDn: string): string {
  return nodeDn.split("\n").reverse().join(", ");
}

/** Details of a parsed certificate (pure). */
export function describeCertificate(cert: X509Certificate): CertInfo {
  let parsed: Certificate;
  try {
    parsed = AsnConvert.parse(cert.raw, Certificate);
  } catch (err) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_PEM, "the certificate's ASN.1 cannot be decoded", {
      cause: err,
    });
  }
  const tbs = parsed.tbsCertificate;
  const extension = (oid: string) => tbs.extensions?.find((e) => e.extnID === oid)?.extnValue;
  const info: CertInfo = {
    subject: distinguishedName(cert.subject),
    issuer: distinguishedName(cert.issuer),
    serial: normalizeSerial(Buffer.from(tbs.serialNumber).toString("hex")),
    notBefore: tbs.validity.notBefore.getTime(),
    notAfter: tbs.validity.notAfter.getTime(),
    fingerprint: sha256Fingerprint(cert.raw),
    keyType: describeKey(cert.publicKey),
    sans: [],
    dns: [],
    ips: [],
    uris: [],
    eku: [],
    isCa: false,
    signatureAlgorithm: SIG_NAMES[parsed.signatureAlgorithm.algorithm] ?? parsed.signatureAlgorithm.algorithm,
  };
  const san = extension(id_ce_subjectAltName);
  if (san) {
    for (const name of AsnConvert.parse(san, SubjectAlternativeName)) {
      if (name.dNSName) info.dns.push(name.dNSName);
      else if (name.iPAddress) info.ips.push(name.iPAddress);
      else if (name.uniformResourceIdentifier) info.uris.push(name.uniformResourceIdentifier);
    }
    info.sans = [...info.dns, ...info.ips, ...info.uris];
    const spiffe = info.uris.find((u) => parseSpiffeId(u));
    if (spiffe) info.spiffeId = spiffe;
  }
  const eku = extension(id_ce_extKeyUsage);
  if (eku) info.eku = [...AsnConvert.parse(eku, ExtendedKeyUsage)].map((oid) => EKU_NAMES.get(oid) ?? oid);
  const ku = extension(id_ce_keyUsage);
  if (ku) info.keyUsage = AsnConvert.parse(ku, KeyUsage).toJSON();
  const bc = extension(id_ce_basicConstraints);
  if (bc) {
    const constraints = AsnConvert.parse(bc, BasicConstraints);
    info.isCa = constraints.cA;
    if (constraints.pathLenConstraint !== undefined) info.pathLen = constraints.pathLenConstraint;
  }
  const ski = extension(id_ce_subjectKeyIdentifier);
  if (ski)
    info.subjectKeyId = Buffer.from(AsnConvert.parse(ski, SubjectKeyIdentifier).buffer).toString("hex");
  const aki = extension(id_ce_authorityKeyIdentifier);
  const akiId = aki ? AsnConvert.parse(aki, AuthorityKeyIdentifier).keyIdentifier : undefined;
  if (akiId) info.authorityKeyId = Buffer.from(akiId.buffer).toString("hex");
  return info;
}

/** Details of the first certificate in a PEM (or DER) input. */
export function inspectCertificate(pem: string | Uint8Array): CertInfo {
  const [cert] = readCertificates(pem);
  return describeCertificate(cert!);
}
