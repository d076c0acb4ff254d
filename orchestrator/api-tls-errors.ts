import { defineCodes, ShoalError } from "../core/index.js";

/** Codes of the HTTPS API's server side TLS (certificate sources, reload, ACME). */
export const API_TLS_CODES = defineCodes("api-tls", {
  SHOAL_API_TLS_CONFIG:
    "The API.TLS settings do not name a usable certificate source (e.g. CertFile without KeyFile, or every source turned off).",
  SHOAL_API_TLS_BAD_PEM:
    "API.TLS.CertFile or KeyFile is not a readable PEM certificate chain / private key; on reload the old certificate stays in use.",
  SHOAL_API_TLS_KEY_MISMATCH:
    "API.TLS.KeyFile is not the private key of the first certificate in CertFile; on reload the old certificate stays in use.",
  SHOAL_API_TLS_EXPIRED:
    "The API certificate (from CertFile or the ACME cache) is outside its validity window; on reload the old one stays in use.",
  SHOAL_API_TLS_ISSUE_FAILED:
    "The built-in PKI could not issue or renew the API's server certificate; the current one stays in use.",
  SHOAL_API_TLS_ACME_FAILED:
    "Obtaining or renewing the API.TLS.AutoCert certificate over ACME failed; the message carries the ACME server's reason.",
  SHOAL_API_TLS_CHALLENGE_LISTEN:
    "The HTTP listener that answers ACME HTTP-01 challenges could not bind its address.",
});

export type ApiTlsCode = keyof typeof API_TLS_CODES;

/** A failure of the API's server TLS: a bad certificate source, a failed renewal or ACME order. */
export class ApiTlsError extends ShoalError {
  constructor(
    code: ApiTlsCode,
    message: string,
    options: { cause?: unknown; fix?: string; file?: string } = {},
  ) {
    super(code, message, options);
    this.file = options.file;
  }

  /** The file at fault, when there is one. */
  readonly file: string | undefined;
}
