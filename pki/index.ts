/**
 * The PKI: CA creation, issuance, CSR signing, path validation with
 * explanations, revocation lists and PKCS#12 export. No network.
 */
export {
  DEFAULT_CA_NAME,
  type InitPkiOptions,
  type IssuedCertificate,
  initPki,
  listCertificates,
  openPki,
  PKI_FILES,
  Pki,
  revokeCertificate,
  writeIssued,
} from "./authority.js";
export { EKU_OIDS, type ExtKeyUsage } from "./certificate-builder.js";
export { type CertInfo, inspectCertificate } from "./certificate-info.js";
export { type CrlEntry, DEFAULT_CRL_VALIDITY_MS, type ParsedCrl, parseCrl } from "./crl.js";
export { type CheckedCsr, checkCsr, createCsr, publicKeyFingerprint } from "./csr.js";
export {
  CertificateVerificationError,
  PKI_CODES,
  type PkiCode,
  PkiError,
  type VerifyFailure,
} from "./errors.js";
export { isIdentityRevoked, revokedIdentities, revokeIdentity } from "./identity-revocation.js";
export {
  assertRevocationReason,
  type CertificateStatus,
  EXPIRED_RETENTION_MS,
  expiredLongAgo,
  INVENTORY_FILE,
  type InventoryEntry,
  type InventoryFile,
  REVOCATION_REASONS,
  type RevocationReason,
  type RevokedIdentity,
  readInventory,
  statusAt,
} from "./inventory.js";
export {
  createJoinToken,
  DEFAULT_JOIN_TOKEN_TTL_MS,
  JOIN_TOKENS_FILE,
  type JoinTokenRecord,
  type JoinTokenView,
  listJoinTokens,
  redeemJoinToken,
  revokeJoinToken,
  revokeJoinTokensOf,
} from "./join-tokens.js";
export { loadOrCreateKeyFile } from "./key-file.js";
export {
  assertKeyType,
  DEFAULT_KEY_TYPE,
  exportPrivateKey,
  generatePrivateKey,
  importPrivateKey,
  isKeyType,
  KEY_TYPES,
  type KeyType,
  keyTypeOf,
} from "./key-types.js";
export { certFingerprint, readCertificates } from "./pem.js";
export { DEFAULT_P12_ITERATIONS, exportPkcs12, type Pkcs12Options } from "./pkcs12.js";
export {
  BACKDATE_MS,
  DEFAULT_CA_DAYS,
  DEFAULT_LEAF_DAYS,
  type IssueRequest,
  LOOPBACK_NAMES,
} from "./profiles.js";
export { certificateRenewalTime } from "./renewal.js";
export {
  assertRole,
  DEFAULT_TRUST_DOMAIN,
  IDENTITY_ROLES,
  type IdentityRole,
  isIdentityRole,
  isRole,
  isValidId,
  parseSpiffeId,
  ROLES,
  type Role,
  spiffeId,
} from "./spiffe.js";
export { isUnknownCaCode } from "./tls-verify-codes.js";
export { type VerifyOptions, type VerifyResult, verifyCertificate } from "./verify.js";
