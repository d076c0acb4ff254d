import {
  createECDH,
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  type KeyObject,
  sign,
  verify,
} from "node:crypto";
import { ECParameters, ECPrivateKey, id_ecPublicKey, id_secp256r1, id_secp384r1 } from "@peculiar/asn1-ecc";
import { PrivateKey, PrivateKeyInfo } from "@peculiar/asn1-pkcs8";
import { AsnConvert, OctetString } from "@peculiar/asn1-schema";
import { AlgorithmIdentifier, SubjectPublicKeyInfo } from "@peculiar/asn1-x509";
import { PKI_CODES, PkiError } from "./errors.js";
import { toPem } from "./pem.js";

/** The key types the PKI creates. */
export const KEY_TYPES = ["ecdsa-p256", "ecdsa-p384", "rsa-3072"] as const;
export type KeyType = (typeof KEY_TYPES)[number];
/** @default "ecdsa-p256": fast to make, small, and what ES256 envelopes need. */
export const DEFAULT_KEY_TYPE: KeyType = "ecdsa-p256";

export function isKeyType(value: unknown): value is KeyType {
  return typeof value === "string" && (KEY_TYPES as readonly string[]).includes(value);
}

export function assertKeyType(value: unknown): KeyType {
  if (!isKeyType(value)) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_UNKNOWN_KEY_TYPE, `unknown key type ${JSON.stringify(value)}`, {
      fix: `use one of ${KEY_TYPES.join(", ")}`,
    });
  }
  return value;
}

/** A fresh private key of the given type. Synchronous key generation avoids thread-pool hops. */
export function generatePrivateKey(type: KeyType): KeyObject {
  switch (type) {
    case "ecdsa-p256":
      return generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
    case "ecdsa-p384":
      return generateKeyPairSync("ec", { namedCurve: "P-384" }).privateKey;
    case "rsa-3072":
      return generateKeyPairSync("rsa", { modulusLength: 3072 }).privateKey;
  }
}

/** Describes a key (public or private) as one of {@link KEY_TYPES}, or explains why it is not accepted. */
export function keyTypeOf(key: KeyObject): KeyType {
  const details = key.asymmetricKeyDetails ?? {};
  if (key.asymmetricKeyType === "ec") {
    if (details.namedCurve === "prime256v1" || details.namedCurve === "P-256") return "ecdsa-p256";
    if (details.namedCurve === "secp384r1" || details.namedCurve === "P-384") return "ecdsa-p384";
  }
  if (key.asymmetricKeyType === "rsa" && (details.modulusLength ?? 0) >= 2048) return "rsa-3072";
  throw new PkiError(
    PKI_CODES.SHOAL_PKI_UNSUPPORTED_KEY,
    `unsupported key: ${key.asymmetricKeyType ?? "unknown"} ${details.namedCurve ?? details.modulusLength ?? ""}`.trim(),
    { fix: "use an ECDSA P-256/P-384 key or an RSA key of at least 2048 bits" },
  );
}

/** A human label for a key, e.g. "ECDSA P-256" or "RSA 3072". */
export function describeKey(key: KeyObject): string {
  const d = key.asymmetricKeyDetails ?? {};
  if (key.asymmetricKeyType === "ec") {
    const curve =
      d.namedCurve === "prime256v1" ? "P-256" : d.namedCurve === "secp384r1" ? "P-384" : d.namedCurve;
    return `ECDSA ${curve}`;
  }
  if (key.asymmetricKeyType === "rsa") return `RSA ${d.modulusLength}`;
  return key.asymmetricKeyType ?? "unknown";
}

const OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2";
const OID_ECDSA_SHA384 = "1.2.840.10045.4.3.3";
const OID_RSA_SHA256 = "1.2.840.113549.1.1.11";
const OID_RSA_SHA384 = "1.2.840.113549.1.1.12";
const OID_RSA_SHA512 = "1.2.840.113549.1.1.13";
const OID_ECDSA_SHA512 = "1.2.840.10045.4.3.4";

/** DER NULL, the parameters RFC 4055 requires for the RSA PKCS#1 v1.5 signature algorithms. */
const DER_NULL = new Uint8Array([0x05, 0x00]).buffer;

/** The X.509 signature algorithm a key of `type` signs with, and its hash. */
export function signatureAlgorithm(type: KeyType): { oid: string; parameters?: ArrayBuffer; hash: string } {
  switch (type) {
    case "ecdsa-p256":
      return { oid: OID_ECDSA_SHA256, hash: "sha256" };
    case "ecdsa-p384":
      return { oid: OID_ECDSA_SHA384, hash: "sha384" };
    case "rsa-3072":
      return { oid: OID_RSA_SHA256, parameters: DER_NULL, hash: "sha256" };
  }
}

const HASH_BY_OID: Record<string, string> = {
  [OID_ECDSA_SHA256]: "sha256",
  [OID_ECDSA_SHA384]: "sha384",
  [OID_ECDSA_SHA512]: "sha512",
  [OID_RSA_SHA256]: "sha256",
  [OID_RSA_SHA384]: "sha384",
  [OID_RSA_SHA512]: "sha512",
};

/** Signs DER `data` (a TBS structure) with node:crypto; ECDSA signatures come out DER-encoded as X.509 wants. */
export function signDer(key: KeyObject, type: KeyType, data: Uint8Array): Buffer {
  return sign(signatureAlgorithm(type).hash, data, key);
}

/** Verifies a signature made with the X.509 algorithm `oid`; false for algorithms we do not accept. */
export function verifyDer(key: KeyObject, oid: string, data: Uint8Array, signature: Uint8Array): boolean {
  const hash = HASH_BY_OID[oid];
  if (!hash) return false;
  try {
    return verify(hash, data, key, signature);
  } catch {
    return false;
  }
}

/** The DER SubjectPublicKeyInfo of a key (private or public). */
export function spkiDer(key: KeyObject): Buffer {
  const pub = key.type === "private" ? createPublicKey(key) : key;
  return pub.export({ type: "spki", format: "der" });
}

/** PKCS#8 PEM of a private key, encrypted with AES-256-CBC when a passphrase is given. */
export function exportPrivateKey(key: KeyObject, passphrase?: string): string {
  if (passphrase === undefined) return key.export({ type: "pkcs8", format: "pem" }) as string;
  return key.export({ type: "pkcs8", format: "pem", cipher: "aes-256-cbc", passphrase }) as string;
}

/**
 * Reads a private key PEM (PKCS#8, encrypted PKCS#8, SEC1 or PKCS#1). `what` names the
 * file in error messages.
 */
export function importPrivateKey(pem: string | Buffer, what: string, passphrase?: string): KeyObject {
  const text = pem.toString();
  const encrypted = text.includes("-----BEGIN ENCRYPTED PRIVATE KEY-----");
  if (encrypted && passphrase === undefined) {
    throw new PkiError(
      PKI_CODES.SHOAL_PKI_PASSPHRASE_REQUIRED,
      `${what} is encrypted and no passphrase was given`,
      {
        fix: "pass --passphrase-file FILE or set SHOAL_CA_PASSPHRASE",
      },
    );
  }
  if (!/-----BEGIN (?:ENCRYPTED |EC |RSA )?PRIVATE KEY-----/.test(text)) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_PEM, `${what} holds no PEM private key`, {
      fix: "point at the PREFIX.key file written with the certificate",
    });
  }
  try {
    return createPrivateKey(encrypted ? { key: text, format: "pem", passphrase: passphrase ?? "" } : text);
  } catch (err) {
    if (encrypted) {
      throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_PASSPHRASE, `the passphrase does not decrypt ${what}`, {
        cause: err,
        fix: "give the passphrase used at `shoal pki init` (--passphrase-file or SHOAL_CA_PASSPHRASE)",
      });
    }
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_PEM, `${what} is not a valid private key`, {
      cause: err,
      fix: "the PEM is corrupt; restore it or issue a new certificate and key",
    });
  }
}

/** The SubjectPublicKeyInfo of a key (private or public), as an ASN.1 object. */
export function publicKeyInfo(key: KeyObject): SubjectPublicKeyInfo {
  return AsnConvert.parse(spkiDer(key), SubjectPublicKeyInfo);
}

/** A new key pair as the encodings a certificate and its key file need. */
export interface KeyMaterial {
  spki: SubjectPublicKeyInfo;
  /** Unencrypted PKCS#8 PEM. */
  privateKeyPem: string;
}

const EC_CURVES = {
  "ecdsa-p256": { ecdh: "prime256v1", oid: id_secp256r1, size: 32 },
  "ecdsa-p384": { ecdh: "secp384r1", oid: id_secp384r1, size: 48 },
} as const;

const ecAlgorithms = new Map<string, AlgorithmIdentifier>();
function ecAlgorithm(curveOid: string): AlgorithmIdentifier {
  let alg = ecAlgorithms.get(curveOid);
  if (!alg) {
    const parameters = AsnConvert.serialize(new ECParameters({ namedCurve: curveOid }));
    alg = new AlgorithmIdentifier({ algorithm: id_ecPublicKey, parameters });
    ecAlgorithms.set(curveOid, alg);
  }
  return alg;
}

/**
 * Generates a key pair for a leaf certificate. For ECDSA the key comes from
 * OpenSSL through node:crypto's ECDH (same curves, raw scalar and point) and is
 * encoded with @peculiar/asn1-* (SEC 1 ECPrivateKey inside PKCS#8), because
 * OpenSSL 3's PEM/DER encoders cost more than generating and signing together.
 */
export function generateKeyMaterial(type: KeyType): KeyMaterial {
  if (type === "rsa-3072") {
    const key = generatePrivateKey(type);
    return { spki: publicKeyInfo(key), privateKeyPem: exportPrivateKey(key) };
  }
  const curve = EC_CURVES[type];
  const ecdh = createECDH(curve.ecdh);
  const point = ecdh.generateKeys();
  const scalar = ecdh.getPrivateKey();
  const d = Buffer.alloc(curve.size);
  scalar.copy(d, curve.size - scalar.length);
  const algorithm = ecAlgorithm(curve.oid);
  const publicKey = new Uint8Array(point).buffer;
  const ecPrivateKey = new ECPrivateKey({ version: 1, privateKey: new OctetString(d), publicKey });
  const pkcs8 = new PrivateKeyInfo({
    privateKeyAlgorithm: algorithm,
    privateKey: new PrivateKey(AsnConvert.serialize(ecPrivateKey)),
  });
  d.fill(0);
  return {
    spki: new SubjectPublicKeyInfo({ algorithm, subjectPublicKey: publicKey }),
    privateKeyPem: toPem("PRIVATE KEY", new Uint8Array(AsnConvert.serialize(pkcs8))),
  };
}
