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
  type SubjectPublicKeyInfo,
  Validity,
  Version,
} from "@peculiar/asn1-x509";
import { DER_TAG, derBitString, derInteger, derSequence, derWrap } from "./der.js";
import { type KeyType, signatureAlgorithm, signDer } from "./key-types.js";

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
  /** The subject's public key (see `publicKeyInfo` for a KeyObject). */
  publicKey: SubjectPublicKeyInfo;
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

/** Lower-case hex of a serial without leading zeros (as normalizeSerial, CRLs and the inventory have it). */
export function serialHex(serial: Uint8Array): string {
  return Buffer.from(serial)
    .toString("hex")
    .replace(/^0+(?=.)/, "");
}

/** RFC 5280 §4.2.1.2 method 1: SHA-1 of the subjectPublicKey BIT STRING value. */
export function keyIdentifier(spki: SubjectPublicKeyInfo): ArrayBuffer {
  const digest = createHash("sha1").update(new Uint8Array(spki.subjectPublicKey)).digest();
  return digest.buffer.slice(digest.byteOffset, digest.byteOffset + digest.byteLength);
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

const encode = (value: unknown) => new Uint8Array(AsnConvert.serialize(value));

/** `[0] EXPLICIT INTEGER 2`: X.509 v3. */
const VERSION_V3 = derWrap(DER_TAG.CONTEXT_0, derInteger(Uint8Array.of(Version.v3)));

/** What every certificate from one signer shares, encoded once per signer. */
interface SignerParts {
  algorithm: Uint8Array;
  issuer: Uint8Array;
  authorityKeyId: Uint8Array;
}
const signerParts = new WeakMap<Signer, SignerParts>();

function partsOf(signer: Signer): SignerParts {
  let parts = signerParts.get(signer);
  if (!parts) {
    parts = {
      algorithm: encode(algorithmIdentifier(signer.keyType)),
      issuer: encode(signer.name),
      authorityKeyId: encode(
        extension(
          id_ce_authorityKeyIdentifier,
          false,
          new AuthorityKeyIdentifier({ keyIdentifier: new KeyIdentifier(signer.keyId) }),
        ),
      ),
    };
    signerParts.set(signer, parts);
  }
  return parts;
}

/** Extensions that are the same for every certificate of a profile are encoded once. */
const constantExtensions = new Map<string, Uint8Array>();
function constantExtension(key: string, make: () => Extension): Uint8Array {
  let der = constantExtensions.get(key);
  if (!der) {
    der = encode(make());
    constantExtensions.set(key, der);
  }
  return der;
}

/**
 * Builds and signs a certificate, by `signer` or self-signed (the root).
 * Returns the DER certificate.
 */
export function buildCertificate(
  template: CertificateTemplate,
  signer: Signer | { selfSigned: KeyObject; keyType: KeyType },
): Buffer {
  const spki = template.publicKey;
  const selfSigned = "selfSigned" in signer;
  const algorithm = selfSigned ? encode(algorithmIdentifier(signer.keyType)) : partsOf(signer).algorithm;
  const issuer = selfSigned ? encode(template.subject) : partsOf(signer).issuer;

  const exts: Uint8Array[] = [
    constantExtension(`bc:${template.ca?.pathLen ?? "leaf"}`, () =>
      extension(
        id_ce_basicConstraints,
        true,
        template.ca
          ? new BasicConstraints({ cA: true, pathLenConstraint: template.ca.pathLen })
          : new BasicConstraints(),
      ),
    ),
    constantExtension(`ku:${template.keyUsage}`, () =>
      extension(id_ce_keyUsage, true, new KeyUsage(template.keyUsage)),
    ),
  ];
  const usages = template.extKeyUsage ?? [];
  if (usages.length > 0) {
    exts.push(
      constantExtension(`eku:${usages.join(",")}`, () =>
        extension(id_ce_extKeyUsage, false, new ExtendedKeyUsage(usages.map((u) => EKU_OIDS[u]))),
      ),
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
    exts.push(encode(extension(id_ce_subjectAltName, false, new SubjectAlternativeName(names))));
  }
  exts.push(
    encode(extension(id_ce_subjectKeyIdentifier, false, new SubjectKeyIdentifier(keyIdentifier(spki)))),
  );
  if (!selfSigned) exts.push(partsOf(signer).authorityKeyId);

  const tbs = derSequence(
    VERSION_V3,
    derInteger(template.serial),
    algorithm,
    issuer,
    encode(new Validity({ notBefore: template.notBefore, notAfter: template.notAfter })),
    encode(template.subject),
    encode(spki),
    derWrap(DER_TAG.CONTEXT_3, derSequence(...exts)),
  );
  const signature = signDer(selfSigned ? signer.selfSigned : signer.key, signer.keyType, tbs);
  return derSequence(tbs, algorithm, derBitString(signature));
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
