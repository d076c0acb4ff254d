import { createHash, type KeyObject, randomBytes } from "node:crypto";
import { AsnConvert, OctetString } from "@peculiar/asn1-schema";
import {
  AlgorithmIdentifier,
  AttributeTypeAndValue,
  AttributeValue,
  AuthorityKeyIdentifier,
  BasicConstraints,
  Certificate,
  ExtendedKeyUsage,
  Extension,
  Extensions,
  GeneralName,
  id_ce_authorityKeyIdentifier,
  id_ce_basicConstraints,
  id_ce_extKeyUsage,
  id_ce_keyUsage,
  id_ce_subjectAltName,
  id_ce_subjectKeyIdentifier,
  id_kp_clientAuth,
  id_kp_serverAuth,
  KeyIdentifier,
  KeyUsage,
  KeyUsageFlags,
  Name,
  RelativeDistinguishedName,
  SubjectAlternativeName,
  SubjectKeyIdentifier,
  SubjectPublicKeyInfo,
  TBSCertificate,
  Validity,
  Version,
} from "@peculiar/asn1-x509";
import { type KeyType, signatureAlgorithm, signDer, spkiDer } from "./key-types.js";

/*
 * Pure certificate construction: every function here is a function of its inputs
 * (keys, names, dates, serial), so tests can build certificates at fixed dates.
 * The ASN.1 structure comes from @peculiar/asn1-x509; the signature over the DER
 * TBSCertificate is made synchronously with node:crypto, which is what makes
 * issuance fast (no WebCrypto promise layers).
 */

export const EKU_OIDS = { serverAuth: id_kp_serverAuth, clientAuth: id_kp_clientAuth } as const;
export type ExtKeyUsage = keyof typeof EKU_OIDS;

/** The key that signs a certificate and the name/key id it signs under. */
export interface Signer {
  key: KeyObject;
  keyType: KeyType;
  /** The issuer's subject Name, copied from its certificate. */
  name: Name;
  /** The issuer's subject key identifier, used as the authority key identifier. */
  keyId: ArrayBuffer;
}

/** What to put in a certificate. SANs are given as already-validated strings. */
export interface CertificateTemplate {
  serial: Uint8Array;
  subject: Name;
  /** The subject's public key (a private key is accepted and its public half used). */
  publicKey: KeyObject;
  notBefore: Date;
  notAfter: Date;
  /** For CA certificates: the path length constraint. Absent for leaves. */
  ca?: { pathLen: number };
  keyUsage: KeyUsageFlags;
  extKeyUsage?: ExtKeyUsage[];
  dns?: string[];
  ips?: string[];
  uris?: string[];
}

const OID_CN = "2.5.4.3";
const OID_O = "2.5.4.10";

/** A Name of `CN=commonName[, O=organization]`, as UTF8Strings. */
export function buildName(commonName: string, organization?: string): Name {
  const rdn = (type: string, value: string) =>
    new RelativeDistinguishedName([
      new AttributeTypeAndValue({ type, value: new AttributeValue({ utf8String: value }) }),
    ]);
  const rdns = [];
  if (organization) rdns.push(rdn(OID_O, organization));
  rdns.push(rdn(OID_CN, commonName));
  return new Name(rdns);
}

/** A 128-bit random positive serial, DER-minimal (a leading 0x00 when the top bit is set). */
export function randomSerial(): Buffer {
  for (;;) {
    const bytes = randomBytes(16);
    if (bytes[0] === 0) continue;
    return bytes[0]! & 0x80 ? Buffer.concat([Buffer.from([0]), bytes]) : bytes;
  }
}

/** Lower-case hex of a serial without the sign byte. */
export function serialHex(serial: Uint8Array): string {
  return Buffer.from(serial)
    .toString("hex")
    .replace(/^(00)+(?=.)/, "");
}

/** RFC 5280 §4.2.1.2 method 1: SHA-1 of the subjectPublicKey BIT STRING value. */
export function keyIdentifier(spki: SubjectPublicKeyInfo): ArrayBuffer {
  const digest = createHash("sha1").update(new Uint8Array(spki.subjectPublicKey)).digest();
  return digest.buffer.slice(digest.byteOffset, digest.byteOffset + digest.byteLength);
}

export function parseSpki(key: KeyObject): SubjectPublicKeyInfo {
  return AsnConvert.parse(spkiDer(key), SubjectPublicKeyInfo);
}

function extension(extnID: string, critical: boolean, value: unknown): Extension {
  return new Extension({ extnID, critical, extnValue: new OctetString(AsnConvert.serialize(value)) });
}

function algorithmIdentifier(type: KeyType): AlgorithmIdentifier {
  const alg = signatureAlgorithm(type);
  return new AlgorithmIdentifier(
    alg.parameters ? { algorithm: alg.oid, parameters: alg.parameters } : { algorithm: alg.oid },
  );
}

/**
 * Builds and signs a certificate. `signer` undefined means self-signed by
 * `selfKey` (the root). Returns the DER certificate.
 */
export function buildCertificate(
  template: CertificateTemplate,
  signer: Signer | { selfSigned: KeyObject; keyType: KeyType },
): Buffer {
  const spki = parseSpki(template.publicKey);
  const ski = keyIdentifier(spki);
  const issuer = "selfSigned" in signer ? template.subject : signer.name;
  const signingKey = "selfSigned" in signer ? signer.selfSigned : signer.key;

  const exts: Extension[] = [
    extension(
      id_ce_basicConstraints,
      true,
      template.ca
        ? new BasicConstraints({ cA: true, pathLenConstraint: template.ca.pathLen })
        : new BasicConstraints(),
    ),
    extension(id_ce_keyUsage, true, new KeyUsage(template.keyUsage)),
  ];
  if (template.extKeyUsage?.length) {
    exts.push(
      extension(id_ce_extKeyUsage, false, new ExtendedKeyUsage(template.extKeyUsage.map((u) => EKU_OIDS[u]))),
    );
  }
  const names: GeneralName[] = [
    ...(template.dns ?? []).map((dNSName) => new GeneralName({ dNSName })),
    ...(template.ips ?? []).map((iPAddress) => new GeneralName({ iPAddress })),
    ...(template.uris ?? []).map(
      (uniformResourceIdentifier) => new GeneralName({ uniformResourceIdentifier }),
    ),
  ];
  if (names.length > 0) {
    // Critical only when the subject is empty (RFC 5280 §4.2.1.6); ours always has a CN.
    exts.push(extension(id_ce_subjectAltName, false, new SubjectAlternativeName(names)));
  }
  exts.push(extension(id_ce_subjectKeyIdentifier, false, new SubjectKeyIdentifier(ski)));
  if (!("selfSigned" in signer)) {
    exts.push(
      extension(
        id_ce_authorityKeyIdentifier,
        false,
        new AuthorityKeyIdentifier({ keyIdentifier: new KeyIdentifier(signer.keyId) }),
      ),
    );
  }

  const tbs = new TBSCertificate({
    version: Version.v3,
    serialNumber: new Uint8Array(template.serial).buffer,
    signature: algorithmIdentifier(signer.keyType),
    issuer,
    validity: new Validity({ notBefore: template.notBefore, notAfter: template.notAfter }),
    subject: template.subject,
    subjectPublicKeyInfo: spki,
    extensions: new Extensions(exts),
  });
  const tbsDer = new Uint8Array(AsnConvert.serialize(tbs));
  const signature = signDer(signingKey, signer.keyType, tbsDer);
  const cert = new Certificate({
    tbsCertificate: tbs,
    signatureAlgorithm: algorithmIdentifier(signer.keyType),
    signatureValue: new Uint8Array(signature).buffer,
  });
  return Buffer.from(AsnConvert.serialize(cert));
}

/** The parts of a CA certificate needed to sign with it. */
export function signerFromCertificate(certDer: Uint8Array, key: KeyObject, keyType: KeyType): Signer {
  const cert = AsnConvert.parse(certDer, Certificate);
  const ski = cert.tbsCertificate.extensions?.find((e) => e.extnID === id_ce_subjectKeyIdentifier);
  const keyId = ski
    ? AsnConvert.parse(ski.extnValue, SubjectKeyIdentifier).buffer
    : keyIdentifier(cert.tbsCertificate.subjectPublicKeyInfo);
  return { key, keyType, name: cert.tbsCertificate.subject, keyId };
}

export { KeyUsageFlags };
