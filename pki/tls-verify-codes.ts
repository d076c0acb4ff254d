/**
 * OpenSSL's verify error codes (as node:tls reports them in `err.code`) that
 * mean "the peer's chain does not lead to a CA we trust". Clients of the API
 * and of the fabric turn them into their own unknown-CA errors.
 */
const UNKNOWN_CA_CODES: ReadonlySet<string> = new Set([
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  "UNABLE_TO_GET_ISSUER_CERT",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
  "SELF_SIGNED_CERT_IN_CHAIN",
  "DEPTH_ZERO_SELF_SIGNED_CERT",
  "CERT_UNTRUSTED",
  "CERT_SIGNATURE_FAILURE",
]);

/** True when a TLS error code says the peer's certificate is not from a trusted CA. */
export function isUnknownCaCode(code: string | undefined): boolean {
  return code !== undefined && UNKNOWN_CA_CODES.has(code);
}
