import { defineCodes, ShoalError } from "../core/index.js";

export const AUTH_CODES = defineCodes("auth", {
  SHOAL_AUTH_UNAUTHENTICATED: "The request carries no credentials and anonymous access is off.",
  SHOAL_AUTH_METHOD_DISABLED: "The authentication method asked for is not enabled on this API.",
  SHOAL_AUTH_BAD_CREDENTIALS: "Unknown user, wrong password or wrong shared secret.",
  SHOAL_AUTH_USER_DISABLED: "The user exists but is disabled.",
  SHOAL_AUTH_RATE_LIMITED: "Too many failed logins for this user or address; retry after the given time.",
  SHOAL_AUTH_CHALLENGE_INVALID:
    "A client-key nonce that was never issued, was already used, or is for another key.",
  SHOAL_AUTH_CHALLENGE_EXPIRED: "A client-key nonce that is older than its time to live.",
  SHOAL_AUTH_SIGNATURE_INVALID: "A client-key signature that does not verify with the presented public key.",
  SHOAL_AUTH_KEY_UNSUPPORTED: "A client public key or token signing key of a type or size Shoal refuses.",
  SHOAL_AUTH_CERT_REJECTED: "A user certificate that is not a valid fabric user identity.",
  SHOAL_AUTH_TOKEN_INVALID: "A token that is malformed, tampered with or not signed by this orchestrator.",
  SHOAL_AUTH_TOKEN_ALGORITHM: "A token whose algorithm is not ES256 (e.g. alg none or HS256).",
  SHOAL_AUTH_TOKEN_EXPIRED: "A token past its expiry time.",
  SHOAL_AUTH_TOKEN_REVOKED: "A token whose jti has been revoked, or whose user has been deleted.",
  SHOAL_AUTH_TOKEN_AUDIENCE: "A token issued for another API (aud) or by another issuer (iss).",
  SHOAL_AUTH_TOKEN_UNKNOWN_KEY:
    "A token signed by a key that no orchestrator of this cluster published (its kid is not in the token key store).",
  SHOAL_AUTH_DENIED: "The policy set does not allow this principal this action on this resource.",
  SHOAL_AUTH_BAD_NAME: "A user or role name with characters Shoal does not allow.",
  SHOAL_AUTH_USER_EXISTS: "A user with that name already exists.",
  SHOAL_AUTH_USER_NOT_FOUND: "No user with that name.",
  SHOAL_AUTH_ROLE_NOT_FOUND: "A role named that does not exist.",
  SHOAL_AUTH_ROLE_BUILTIN: "A built-in role cannot be deleted or redefined.",
  SHOAL_AUTH_UNKNOWN_ACTION: "An action name that is not in the Cedar schema.",
  SHOAL_AUTH_WEAK_PASSWORD: "A password shorter than the minimum length.",
  SHOAL_AUTH_PASSWORD_HASH: "A stored password hash that is not a Shoal scrypt hash.",
  SHOAL_AUTH_SCHEMA_INVALID: "The Cedar schema cannot be parsed.",
  SHOAL_AUTH_POLICY_SYNTAX: "The Cedar policy file has a syntax error at file:line:column.",
  SHOAL_AUTH_POLICY_SCHEMA: "The Cedar policy file does not fit the schema at file:line:column.",
  SHOAL_AUTH_POLICY_DUPLICATE_ID: "Two policies in the policy file carry the same @id.",
  SHOAL_AUTH_POLICY_CASES: "A policy test-cases file that is not valid.",
  SHOAL_AUTH_POLICY_TEST_FAILED: "One or more policy test cases got a decision other than expected.",
});

export type AuthCode = keyof typeof AUTH_CODES;

/** Every authentication and authorization failure. `status` is the HTTP status the API answers with. */
export class AuthError extends ShoalError {
  declare readonly code: AuthCode;
  /** HTTP status for the API layer: 401, 403, 404, 409, 429 or 400. */
  readonly status: number;

  constructor(code: AuthCode, message: string, options: { cause?: unknown; fix?: string } = {}) {
    super(code, message, options);
    this.status = statusFor(code);
  }
}

/** A login refused by the rate limiter; the API answers 429 with `Retry-After`. */
export class RateLimitedError extends AuthError {
  /**
   * `busy`: not a lockout but logins under way (from this user or address, or
   * on the whole server), each costing a password hash.
   */
  constructor(
    readonly retryAfterMs: number,
    readonly limitedBy: "user" | "address" | "server",
    busy = false,
  ) {
    super(
      AUTH_CODES.SHOAL_AUTH_RATE_LIMITED,
      `too many ${busy ? "logins under way" : "failed logins"} for this ${limitedBy}; retry in ${Math.ceil(retryAfterMs / 1000)} s`,
      {
        fix: busy
          ? "retry in a moment; logins are checked a few at a time"
          : "wait for the lockout to end, then log in with the right credentials",
      },
    );
  }

  /** Refused because logins are under way (from `limitedBy`), not a lockout: retry in a second. */
  static busy(limitedBy: RateLimitedError["limitedBy"]): RateLimitedError {
    return new RateLimitedError(1000, limitedBy, true);
  }

  /** Seconds for the `Retry-After` header. */
  get retryAfterSeconds(): number {
    return Math.ceil(this.retryAfterMs / 1000);
  }
}

/** A policy or schema file problem, located at `file:line:column` when Cedar gave a source offset. */
export class PolicyFileError extends AuthError {
  constructor(
    code: AuthCode,
    readonly file: string,
    readonly problems: readonly PolicyProblem[],
  ) {
    super(code, problems.length ? problems.map(formatProblem).join("\n") : `${file}: invalid`, {
      fix:
        code === AUTH_CODES.SHOAL_AUTH_POLICY_SCHEMA
          ? "make the policy fit configs/policies/shoal.cedarschema (entity types, attributes and actions)"
          : "correct the file at the reported location; `shoal policy check FILE` checks it",
    });
  }
}

/** One problem in a policy or schema file. `line`/`column` are 1-based. */
export interface PolicyProblem {
  file: string;
  line?: number;
  column?: number;
  policyId?: string;
  message: string;
  help?: string;
}

export function formatProblem(p: PolicyProblem): string {
  const at = p.line === undefined ? p.file : `${p.file}:${p.line}:${p.column}`;
  const policy = p.policyId ? ` (policy ${p.policyId})` : "";
  const help = p.help ? ` — ${p.help}` : "";
  return `${at}: ${p.message}${policy}${help}`;
}

function statusFor(code: AuthCode): number {
  switch (code) {
    case "SHOAL_AUTH_DENIED":
    case "SHOAL_AUTH_USER_DISABLED":
      return 403;
    case "SHOAL_AUTH_RATE_LIMITED":
      return 429;
    case "SHOAL_AUTH_USER_NOT_FOUND":
    case "SHOAL_AUTH_ROLE_NOT_FOUND":
      return 404;
    case "SHOAL_AUTH_USER_EXISTS":
    case "SHOAL_AUTH_ROLE_BUILTIN":
      return 409;
    case "SHOAL_AUTH_UNAUTHENTICATED":
    case "SHOAL_AUTH_BAD_CREDENTIALS":
    case "SHOAL_AUTH_CHALLENGE_INVALID":
    case "SHOAL_AUTH_CHALLENGE_EXPIRED":
    case "SHOAL_AUTH_SIGNATURE_INVALID":
    case "SHOAL_AUTH_CERT_REJECTED":
    case "SHOAL_AUTH_TOKEN_INVALID":
    case "SHOAL_AUTH_TOKEN_ALGORITHM":
    case "SHOAL_AUTH_TOKEN_EXPIRED":
    case "SHOAL_AUTH_TOKEN_REVOKED":
    case "SHOAL_AUTH_TOKEN_AUDIENCE":
    case "SHOAL_AUTH_TOKEN_UNKNOWN_KEY":
      return 401;
    default:
      return 400;
  }
}
