import { createPublicKey, type KeyObject } from "node:crypto";
import { Attributes, CertificationRequest, CertificationRequestInfo } from "@peculiar/asn1-csr";
import { AsnConvert } from "@peculiar/asn1-schema";
import { AlgorithmIdentifier, type SubjectPublicKeyInfo } from "@peculiar/asn1-x509";
import { buildName } from "./certificate-builder.js";
import { PKI_CODES, PkiError } from "./errors.js";
import {
  type KeyType,
  keyTypeOf,
  publicKeyInfo,
  signatureAlgorithm,
  signDer,
  verifyDer,
} from "./key-types.js";
import { pemBlocks, sha256Fingerprint, toPem } from "./pem.js";

/** What the CA takes from a CSR: only its public key, once the CSR's signature proves possession. */
export interface CheckedCsr {
  publicKey: KeyObject;
  spki: SubjectPublicKeyInfo;
  keyType: KeyType;
}

/** `sha256:HEX` of a key's public half (SubjectPublicKeyInfo DER): how an operator tells one node key from another. */
export function publicKeyFingerprint(key: KeyObject): string {
  const publicKey = key.type === "private" ? createPublicKey(key) : key;
  return sha256Fingerprint(publicKey.export({ type: "spki", format: "der" }));
}

/**
 * Makes a PKCS#10 CSR for `key` (the private key stays with the caller). The subject
 * is only a hint: the CA decides names and usages from role and id.
 */
export function createCsr(key: KeyObject, commonName: string): string {
  const keyType = keyTypeOf(key);
  const info = new CertificationRequestInfo({
    version: 0,
    subject: buildName(commonName),
    subjectPKInfo: publicKeyInfo(key),
    attributes: new Attributes(),
  });
  const infoDer = new Uint8Array(AsnConvert.serialize(info));
  const alg = signatureAlgorithm(keyType);
  const csr = new CertificationRequest({
    certificationRequestInfo: info,
    signatureAlgorithm: new AlgorithmIdentifier(
      alg.parameters ? { algorithm: alg.oid, parameters: alg.parameters } : { algorithm: alg.oid },
    ),
    signature: new Uint8Array(signDer(key, keyType, infoDer)).buffer,
  });
  return toPem("CERTIFICATE REQUEST", new Uint8Array(AsnConvert.serialize(csr)));
}

/** Parses a PEM (or DER) CSR and checks its self-signature and key type. */
export function checkCsr(input: string | Uint8Array, what = "CSR"): CheckedCsr {
  const text = typeof input === "string" ? input : Buffer.from(input).toString("latin1");
  const der =
    typeof input !== "string" && input[0] === 0x30
      ? Buffer.from(input)
      : (pemBlocks(text, "CERTIFICATE REQUEST")[0] ?? pemBlocks(text, "NEW CERTIFICATE REQUEST")[0]);
  if (!der) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_PEM, `${what} holds no PEM certificate request`, {
      fix: "give a file with a -----BEGIN CERTIFICATE REQUEST----- block",
    });
  }
  let csr: CertificationRequest;
  let publicKey: KeyObject;
  try {
    csr = AsnConvert.parse(der, CertificationRequest);
    const spki = Buffer.from(AsnConvert.serialize(csr.certificationRequestInfo.subjectPKInfo));
    publicKey = createPublicKey({ key: spki, format: "der", type: "spki" });
  } catch (err) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_CSR, `${what} is not a valid PKCS#10 request`, {
      cause: err,
      fix: "make the CSR again (e.g. `openssl req -new -key KEY -subj /CN=ID`)",
    });
  }
  const keyType = keyTypeOf(publicKey);
  const info = csr.certificationRequestInfoRaw;
  if (
    !info ||
    !verifyDer(
      publicKey,
      csr.signatureAlgorithm.algorithm,
      new Uint8Array(info),
      new Uint8Array(csr.signature),
    )
  ) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_CSR, `the signature of ${what} does not verify`, {
      fix: "the CSR was altered or signed with another key; make it again with the node's own key",
    });
  }
  return { publicKey, spki: csr.certificationRequestInfo.subjectPKInfo, keyType };
}
