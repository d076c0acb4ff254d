/**
 * API security: authentication methods, password hashing, ES256 API tokens
 * with revocation, users and roles, login rate limiting, and Cedar
 * authorization with an audit log. Storage sits behind {@link AuthStore}.
 */
export {
  Authenticator,
  type AuthenticatorOptions,
  type LoginSource,
  type MethodDescription,
  type SharedSecret,
} from "./authenticator.js";
export {
  type AuthorizationDecision,
  type AuthorizationRequest,
  Authorizer,
  type AuthorizerOptions,
  type RequestContext,
  type Resource,
} from "./authorizer.js";
export {
  answerChallenge,
  type ClientKeyChallenge,
  type ClientKeyResponse,
  ClientKeyVerifier,
  challengePayload,
  clientIdOf,
  DEFAULT_NONCE_TTL_MS,
} from "./client-key.js";
export {
  AUTH_CODES,
  type AuthCode,
  AuthError,
  formatProblem,
  PolicyFileError,
  type PolicyProblem,
  RateLimitedError,
} from "./errors.js";
export {
  assertPasswordStrength,
  DEFAULT_SCRYPT_LOG_N,
  type HashOptions,
  hashPassword,
  isPasswordHash,
  MIN_PASSWORD_LENGTH,
  verifyPassword,
} from "./password.js";
export {
  type CompiledPolicies,
  compilePolicies,
  DEFAULT_POLICY_FILE,
  DEFAULT_SCHEMA_FILE,
  defaultPolicyDir,
  loadPolicies,
} from "./policy.js";
export {
  type PolicyCase,
  type PolicyCaseResult,
  type PolicyCases,
  parsePolicyCases,
  runPolicyCases,
} from "./policy-cases.js";
export { HashGate, type LoginLimits, LoginRateLimiter } from "./rate-limit.js";
export { type RevocationEvent, RevocationList } from "./revocation.js";
export { rolePolicies, rolePolicyId } from "./role-policies.js";
export { type AuthCollection, type AuthStore, MemoryAuthStore, MemoryCollection } from "./store.js";
export {
  DEFAULT_CLOCK_TOLERANCE_SECONDS,
  DEFAULT_TOKEN_TTL_SECONDS,
  type IssuedToken,
  type TokenClaims,
  TokenService,
  type TokenServiceOptions,
  type VerifiedToken,
} from "./tokens.js";
export {
  ACTIONS,
  type Action,
  ANONYMOUS_PRINCIPAL,
  AUTH_METHODS,
  type AuthMethod,
  DEFAULT_NAMESPACE,
  isAction,
  type NonceRecord,
  type Principal,
  type RevokedToken,
  ROLE_SCOPES,
  type RoleRecord,
  type RoleScope,
  type TokenKeyRecord,
  type UserRecord,
} from "./types.js";
export {
  ADMIN_PASSWORD_FILE,
  assertName,
  type BootstrapResult,
  BUILTIN_ROLES,
  bootstrapAdmin,
  currentPrincipal,
  isBuiltinRole,
  isValidName,
  type NewUser,
  UserDirectory,
  userDisabled,
} from "./users.js";
