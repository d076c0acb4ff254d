/** The API's authentication methods, as named in `API.Auth.Methods`. */
export const AUTH_METHODS = ["anonymous", "clientKey", "password", "sharedSecret", "mtls"] as const;
export type AuthMethod = (typeof AUTH_METHODS)[number];

/** Every action in configs/policies/shoal.cedarschema (a test keeps the two in step). */
export const ACTIONS = [
  "job:submit",
  "job:list",
  "job:read",
  "job:logs",
  "job:results",
  "job:stop",
  "node:list",
  "node:read",
  "node:approve",
  "node:reject",
  "node:delete",
  "user:manage",
  "role:manage",
  "token:revoke",
  "agent:read",
  "agent:metrics",
  "pki:enroll-token",
] as const;
export type Action = (typeof ACTIONS)[number];

export function isAction(value: unknown): value is Action {
  return typeof value === "string" && (ACTIONS as readonly string[]).includes(value);
}

/**
 * Where a role's actions apply: `cluster` on every resource; `namespace` on jobs
 * in the user's namespace; `own` on the user's own jobs (in its namespace).
 */
export const ROLE_SCOPES = ["cluster", "namespace", "own"] as const;
export type RoleScope = (typeof ROLE_SCOPES)[number];

/** A user account (AIStore AuthN shape). */
export interface UserRecord {
  name: string;
  /** `$scrypt$...` hash (see password.ts); absent for users who log in by certificate or client key only. */
  passwordHash?: string;
  roles: string[];
  namespace: string;
  /** Client ids (sha256 of the SPKI, hex) whose client-key logins act as this user. */
  clientKeys?: string[];
  /** ISO 8601. */
  createdAt: string;
  /**
   * A random id given at creation, named by the user's tokens: a user deleted
   * and added again under the same name does not inherit the old tokens, even
   * within the second they were issued. Absent on users created before it existed.
   */
  uid?: string;
  disabled: boolean;
}

export interface RoleRecord {
  name: string;
  description: string;
  /** Action names, or `*` for every action. */
  actions: string[];
  /** @default "cluster" */
  scope?: RoleScope;
}

export interface RevokedToken {
  jti: string;
  /** Unix seconds: the token's own `exp`, after which the record can go. */
  expiresAt: number;
  /** Unix seconds. */
  revokedAt: number;
}

/**
 * An orchestrator's API token verification key, published so that every
 * orchestrator sharing the store accepts the tokens it signs. Keyed by `kid`
 * (the key's JWK thumbprint); written only by orchestrators (the broker gives
 * no other identity access to the KV buckets).
 */
export interface TokenKeyRecord {
  /** RFC 7638 JWK thumbprint of `jwk`: the `kid` header of the tokens it signs. */
  kid: string;
  /** The public key (EC P-256) as a JWK. */
  jwk: { kty: "EC"; crv: "P-256"; x: string; y: string };
  /** The `iss` of the tokens it signs (the publishing orchestrator's SPIFFE id). */
  issuer: string;
  /** Unix seconds. */
  publishedAt: number;
}

export interface NonceRecord {
  /** Unix milliseconds. */
  expiresAt: number;
  audience: string;
  /** Set when the client named its key when asking: the nonce is then good for that key only. */
  clientId?: string;
}

/**
 * Who is making a request, once authenticated. `id` is the token's `sub`: a
 * user name, `client:<sha256 of SPKI>` for a self-generated client key
 * (anonymous mode), or `anonymous`.
 */
export interface Principal {
  id: string;
  kind: "user" | "client" | "anonymous";
  roles: string[];
  namespace: string;
  method: AuthMethod;
  /** A registered user's {@link UserRecord.uid}, when it has one. */
  uid?: string;
}

/** The namespace of anonymous callers and of users created without one. @default "default" */
export const DEFAULT_NAMESPACE = "default";

export const ANONYMOUS_PRINCIPAL: Readonly<Principal> = Object.freeze({
  id: "anonymous",
  kind: "anonymous",
  roles: [],
  namespace: DEFAULT_NAMESPACE,
  method: "anonymous",
});
