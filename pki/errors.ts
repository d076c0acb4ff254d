import { defineCodes, ShoalError } from "../core/index.js";

export const PKI_CODES = defineCodes("pki", {
  SHOAL_PKI_BAD_PEM: "A file or string is not the PEM (or DER) certificate, key, CSR or CRL expected.",
  SHOAL_PKI_KEY_MISMATCH: "A private key does not belong to the certificate it is paired with.",
  SHOAL_PKI_BAD_CSR: "A certificate signing request is malformed or its own signature does not verify.",
  SHOAL_PKI_UNKNOWN_ROLE: "A role other than server, orchestrator, compute or user.",
  SHOAL_PKI_UNKNOWN_KEY_TYPE: "A key type other than ecdsa-p256, ecdsa-p384 or rsa-3072.",
  SHOAL_PKI_UNSUPPORTED_KEY:
    "A key of an algorithm or size the PKI does not sign (e.g. a CSR with a 1024-bit RSA key).",
  SHOAL_PKI_BAD_ID:
    "An identity id or name that is empty, too long or holds characters unsafe in NATS subjects.",
  SHOAL_PKI_BAD_NAME: "A DNS name or IP address for a server certificate that is not valid.",
  SHOAL_PKI_EXISTS: "`pki init` found an existing PKI in the directory.",
  SHOAL_PKI_NOT_FOUND: "The directory holds no PKI (no ca.crt/issuer.crt/inventory.json).",
  SHOAL_PKI_PASSPHRASE_REQUIRED: "The CA key is encrypted and no passphrase was given.",
  SHOAL_PKI_BAD_PASSPHRASE: "The CA passphrase does not decrypt the CA key.",
  SHOAL_PKI_VALIDITY: "A requested validity is empty or ends after the issuing CA's own validity.",
  SHOAL_PKI_UNKNOWN_REASON: "A revocation reason that is not one of the RFC 5280 reason names.",
  SHOAL_PKI_UNKNOWN_SERIAL: "A serial number or certificate that this PKI never issued.",
  SHOAL_PKI_INVENTORY_CORRUPT: "The PKI inventory file is not valid JSON of the expected shape.",
  SHOAL_PKI_BAD_CRL: "A certificate revocation list is malformed.",
  SHOAL_PKI_JOIN_TOKEN_INVALID:
    "A join token that is malformed, unknown to this PKI or has the wrong secret.",
  SHOAL_PKI_JOIN_TOKEN_EXPIRED: "A join token past its expiry.",
  SHOAL_PKI_JOIN_TOKEN_USED:
    "A join token that has no use left, or that already enrolled the node id asking (a token enrolls an id once).",
  SHOAL_PKI_JOIN_TOKEN_REVOKED:
    "A join token that an operator revoked (`shoal pki join-token revoke`), or whose node was deleted or revoked.",
  SHOAL_PKI_IDENTITY_REVOKED: "An enrollment for a node id that was deleted or revoked.",
  SHOAL_PKI_JOIN_TOKEN_USES: "A join token's number of uses that is not a whole number from 1 to 100000.",
  SHOAL_PKI_JOIN_TOKEN_LABELS:
    "A join token's labels that no node may have: a key that is not 1 to 128 letters, digits, '.', '_', '/' or '-', a value over 256 characters, or more than 64 labels.",
  SHOAL_PKI_VERIFY_FAILED: "`pki verify` found at least one failed check; each is listed with its own code.",
  SHOAL_PKI_UNTRUSTED: "Verification: the certificate does not chain to the given CA.",
  SHOAL_PKI_BAD_SIGNATURE: "Verification: a signature in the chain does not verify.",
  SHOAL_PKI_EXPIRED: "Verification: a certificate in the chain has expired.",
  SHOAL_PKI_NOT_YET_VALID: "Verification: a certificate in the chain is not valid yet.",
  SHOAL_PKI_NOT_CA: "Verification: an issuer in the chain lacks the CA basic constraint.",
  SHOAL_PKI_PATH_LENGTH: "Verification: the chain is longer than an issuer's path length constraint allows.",
  SHOAL_PKI_ISSUER_KEY_USAGE: "Verification: an issuer's key usage does not allow signing certificates.",
  SHOAL_PKI_KEY_USAGE: "Verification: the leaf's key usage does not allow digital signatures.",
  SHOAL_PKI_EKU: "Verification: the leaf lacks the extended key usage its role needs.",
  SHOAL_PKI_ROLE_MISMATCH: "Verification: the leaf's SPIFFE id names another role, or none.",
  SHOAL_PKI_TRUST_DOMAIN_MISMATCH: "Verification: the leaf's SPIFFE id belongs to another trust domain.",
  SHOAL_PKI_HOST_MISMATCH: "Verification: the host name or IP asked for is not among the leaf's SANs.",
  SHOAL_PKI_REVOKED: "Verification: the CRL lists the certificate as revoked.",
  SHOAL_PKI_CRL_INVALID: "Verification: the CRL is not signed by the certificate's issuer or is out of date.",
});

export type PkiCode = keyof typeof PKI_CODES;

/** A PKI failure with a stable code, a message naming the cause and a fix. */
export class PkiError extends ShoalError {
  constructor(code: PkiCode, message: string, options: { cause?: unknown; fix?: string } = {}) {
    super(code, message, options);
  }
}

/** One failed check of a certificate verification. */
export interface VerifyFailure {
  code: PkiCode;
  message: string;
  fix: string;
}

/** Thrown by callers (the CLI, the fabric) that turn a failed verification into an error. */
export class CertificateVerificationError extends ShoalError {
  constructor(readonly failures: VerifyFailure[]) {
    const first = failures[0];
    super(
      PKI_CODES.SHOAL_PKI_VERIFY_FAILED,
      failures.map((f) => `${f.code}: ${f.message}`).join("\n"),
      first ? { fix: first.fix } : {},
    );
  }

  /** One line per failed check: `CODE: cause: fix`, e.g. "… — not 10.0.5.17: reissue with --ip 10.0.5.17". */
  override describe(): string {
    const n = this.failures.length;
    const lines = this.failures.map((f) => `  ${f.code}: ${f.message}: ${f.fix}`);
    return [`certificate rejected (${n} failed check${n === 1 ? "" : "s"})`, ...lines].join("\n");
  }

  override toJSON(): Record<string, unknown> {
    return { ...super.toJSON(), failures: this.failures };
  }
}
