import { createPrivateKey, createPublicKey, type KeyObject, randomBytes } from "node:crypto";
import {
  calculateJwkThumbprint,
  exportJWK,
  type JWTPayload,
  errors as joseErrors,
  jwtVerify,
  SignJWT,
} from "jose";
import { AUTH_CODES, AuthError } from "./errors.js";
import type { RevocationList } from "./revocation.js";
import type { AuthCollection } from "./store.js";
import { AUTH_METHODS, type AuthMethod, type Principal, type TokenKeyRecord } from "./types.js";

/** Only ES256; pinned on verification so `alg: none`, HS256-with-the-public-key and other curves are refused. */
const ALGORITHM = "ES256";
/** The JWT `typ` header of API tokens (RFC 9068), so no other ES256 JWS (a fabric envelope) passes as one. */
const TOKEN_TYPE = "at+jwt";
/** `API.Auth.TokenTTL`. @default 86_400 (24 h) */
export const DEFAULT_TOKEN_TTL_SECONDS = 24 * 60 * 60;
/** @default 30 */
export const DEFAULT_CLOCK_TOLERANCE_SECONDS = 30;
/** Verified tokens remembered (oldest forgotten first). */
const VERIFIED_CACHE_SIZE = 10_000;

export interface TokenServiceOptions {
  /** The orchestrator's ES256 (EC P-256) private key, as a KeyObject or PKCS#8/SEC1 PEM. */
  signingKey: KeyObject | string;
  /** Further public keys whose tokens (with the same `issuer`) are accepted, e.g. the previous key while rotating. */
  verificationKeys?: Array<KeyObject | string>;
  /**
   * The keys every orchestrator of the cluster publishes (the KV auth store):
   * {@link TokenService.create} publishes this one's, and a token whose `kid`
   * is not known yet is looked up there, so a token minted by another
   * orchestrator verifies here (with that orchestrator's `iss`).
   */
  publishedKeys?: AuthCollection<TokenKeyRecord>;
  /** `iss`: who signs, e.g. the orchestrator's SPIFFE id. */
  issuer: string;
  /** `aud`: the API the token is for, e.g. `https://orch.example.com:1234`. */
  audience: string;
  /** Longest lifetime of a token; a login may ask for less. @default DEFAULT_TOKEN_TTL_SECONDS */
  ttlSeconds?: number;
  /** @default DEFAULT_CLOCK_TOLERANCE_SECONDS */
  clockToleranceSeconds?: number;
  revocations: RevocationList;
  /** @default Date.now */
  now?: () => number;
}

/** The claims of a Shoal API token. */
export interface TokenClaims {
  iss: string;
  aud: string;
  sub: string;
  iat: number;
  exp: number;
  jti: string;
  roles: string[];
  ns: string;
  method: AuthMethod;
  /** The registered user's `uid` (see UserRecord), when it has one. */
  uid?: string;
}

export interface IssuedToken {
  token: string;
  claims: TokenClaims;
}

/** A verification key and the `iss` of the tokens it signs. */
interface KnownKey {
  key: KeyObject;
  issuer: string;
}

export interface VerifiedToken {
  principal: Principal;
  claims: TokenClaims;
}

/**
 * Issues and verifies the API's JWTs (ES256, signed by the orchestrator) and
 * checks every verification against the revocation list.
 */
export class TokenService {
  readonly #signingKey: KeyObject;
  readonly #kid: string;
  readonly #keys: Map<string, KnownKey>;
  readonly #published: AuthCollection<TokenKeyRecord> | undefined;
  readonly #issuer: string;
  readonly #audience: string;
  readonly #ttl: number;
  readonly #tolerance: number;
  readonly #revocations: RevocationList;
  readonly #now: () => number;
  /**
   * Tokens whose signature and claims already verified, by the token text:
   * a client sends the same token on every request, and an ES256 verification
   * costs far more than the rest of a request's auth. Expiry and revocation
   * are still checked on every use.
   */
  readonly #verified = new Map<string, TokenClaims>();

  private constructor(
    o: TokenServiceOptions,
    signingKey: KeyObject,
    kid: string,
    keys: Map<string, KnownKey>,
  ) {
    this.#signingKey = signingKey;
    this.#kid = kid;
    this.#keys = keys;
    this.#published = o.publishedKeys;
    this.#issuer = o.issuer;
    this.#audience = o.audience;
    this.#ttl = o.ttlSeconds ?? DEFAULT_TOKEN_TTL_SECONDS;
    this.#tolerance = o.clockToleranceSeconds ?? DEFAULT_CLOCK_TOLERANCE_SECONDS;
    this.#revocations = o.revocations;
    this.#now = o.now ?? Date.now;
  }

  /**
   * Checks the keys (EC P-256 only), computes their key ids (JWK thumbprints)
   * and publishes the signing key's public half in `publishedKeys`.
   */
  static async create(options: TokenServiceOptions): Promise<TokenService> {
    if (
      !(options.ttlSeconds === undefined || (Number.isInteger(options.ttlSeconds) && options.ttlSeconds > 0))
    ) {
      throw new RangeError("ttlSeconds must be a positive integer");
    }
    const signingKey = p256(
      typeof options.signingKey === "string" ? createPrivateKey(options.signingKey) : options.signingKey,
      "private",
    );
    const keys = new Map<string, KnownKey>();
    const publicKey = createPublicKey(signingKey);
    const kid = await thumbprint(publicKey);
    keys.set(kid, { key: publicKey, issuer: options.issuer });
    for (const k of options.verificationKeys ?? []) {
      const key = p256(typeof k === "string" || k.type === "private" ? createPublicKey(k) : k, "public");
      keys.set(await thumbprint(key), { key, issuer: options.issuer });
    }
    if (options.publishedKeys) {
      const { kty, crv, x, y } = await exportJWK(publicKey);
      await options.publishedKeys.put(kid, {
        kid,
        jwk: { kty: kty as "EC", crv: crv as "P-256", x: x as string, y: y as string },
        issuer: options.issuer,
        publishedAt: Math.floor((options.now ?? Date.now)() / 1000),
      });
    }
    return new TokenService(options, signingKey, kid, keys);
  }

  /** The signing key's id (the `kid` header of the tokens it issues). */
  get kid(): string {
    return this.#kid;
  }

  get ttlSeconds(): number {
    return this.#ttl;
  }

  /**
   * Signs a token for `principal`. Its lifetime is the smaller of
   * `ttlSeconds` (what the login asked for) and the configured TTL.
   */
  async issue(principal: Principal, options: { ttlSeconds?: number } = {}): Promise<IssuedToken> {
    if (principal.kind === "anonymous") throw new TypeError("anonymous callers get no token");
    const asked = options.ttlSeconds;
    const ttl = asked !== undefined && asked > 0 ? Math.min(Math.floor(asked), this.#ttl) : this.#ttl;
    const iat = Math.floor(this.#now() / 1000);
    const claims: TokenClaims = {
      iss: this.#issuer,
      aud: this.#audience,
      sub: principal.id,
      iat,
      exp: iat + ttl,
      jti: randomBytes(16).toString("base64url"),
      roles: [...principal.roles],
      ns: principal.namespace,
      method: principal.method,
      ...(principal.uid ? { uid: principal.uid } : {}),
    };
    const { roles, ns, method, uid } = claims;
    const token = await new SignJWT({ roles, ns, method, ...(uid ? { uid } : {}) })
      .setProtectedHeader({ alg: ALGORITHM, typ: TOKEN_TYPE, kid: this.#kid })
      .setIssuer(claims.iss)
      .setAudience(claims.aud)
      .setSubject(claims.sub)
      .setIssuedAt(claims.iat)
      .setExpirationTime(claims.exp)
      .setJti(claims.jti)
      .sign(this.#signingKey);
    return { token, claims };
  }

  /**
   * Verifies signature (ES256 only, by a known key), `typ`, `iss`, `aud`,
   * `exp`, the claim types, and that the `jti` is not revoked. Each failure is
   * an {@link AuthError} with its own code.
   */
  async verify(token: string): Promise<VerifiedToken> {
    let claims = this.#verified.get(token);
    if (claims && claims.exp + this.#tolerance <= this.#now() / 1000) {
      this.#verified.delete(token);
      claims = undefined; // verify again so the caller gets the expiry error
    }
    if (!claims) {
      claims = await this.#verifySignatureAndClaims(token);
      if (this.#verified.size >= VERIFIED_CACHE_SIZE) {
        this.#verified.delete(this.#verified.keys().next().value as string);
      }
      this.#verified.set(token, claims);
    }
    if (this.#revocations.isRevoked(claims.jti)) {
      throw new AuthError(AUTH_CODES.SHOAL_AUTH_TOKEN_REVOKED, "token has been revoked", {
        fix: "log in again (`shoal auth login`)",
      });
    }
    return { claims, principal: principalOf(claims) };
  }

  /** Verifies a token (it must be ours and unexpired) and revokes its jti everywhere. */
  async revokeToken(token: string): Promise<TokenClaims> {
    const { claims } = await this.verify(token);
    await this.#revocations.revoke(claims.jti, claims.exp);
    return claims;
  }

  /** Revokes a token known only by its jti; the record is kept for the longest token lifetime. */
  async revokeJti(jti: string): Promise<void> {
    await this.#revocations.revoke(jti, Math.floor(this.#now() / 1000) + this.#ttl + this.#tolerance);
  }

  /** A known key, or one another orchestrator published since (remembered once found). */
  async #keyFor(kid: string): Promise<KnownKey | undefined> {
    const known = this.#keys.get(kid);
    if (known || !this.#published) return known;
    const found = await publishedKey(await this.#published.get(kid), kid);
    if (found) this.#keys.set(kid, found);
    return found;
  }

  async #verifySignatureAndClaims(token: string): Promise<TokenClaims> {
    let payload: JWTPayload;
    let signer: KnownKey | undefined;
    try {
      ({ payload } = await jwtVerify(
        token,
        async (header) => {
          // Not a token at all (another kind of JWS, e.g. a fabric envelope): say so before any key lookup.
          if (header.typ !== TOKEN_TYPE || header.kid === undefined) {
            throw new joseErrors.JWTInvalid("not a Shoal API token (typ or kid missing)");
          }
          signer = await this.#keyFor(header.kid);
          if (!signer) throw new joseErrors.JWKSNoMatchingKey("token signed by an unknown key");
          return signer.key;
        },
        {
          algorithms: [ALGORITHM],
          typ: TOKEN_TYPE,
          audience: this.#audience,
          requiredClaims: ["sub", "jti", "iat", "exp"],
          clockTolerance: this.#tolerance,
          currentDate: new Date(this.#now()),
        },
      ));
      // The issuer is the one the signing key was published with: one orchestrator's key cannot speak for another.
      if (payload.iss !== signer?.issuer) {
        throw new joseErrors.JWTClaimValidationFailed(
          'unexpected "iss" claim value',
          payload,
          "iss",
          "check_failed",
        );
      }
    } catch (err) {
      throw tokenError(err);
    }
    const { roles, ns, method, uid } = payload as Record<string, unknown>;
    if (
      (uid !== undefined && typeof uid !== "string") ||
      !Array.isArray(roles) ||
      !roles.every((r) => typeof r === "string") ||
      typeof ns !== "string" ||
      !(AUTH_METHODS as readonly unknown[]).includes(method) ||
      typeof payload.sub !== "string" ||
      typeof payload.jti !== "string"
    ) {
      throw new AuthError(AUTH_CODES.SHOAL_AUTH_TOKEN_INVALID, "token claims are malformed", {
        fix: "log in again (`shoal auth login`)",
      });
    }
    return {
      iss: payload.iss as string,
      aud: this.#audience,
      sub: payload.sub,
      iat: payload.iat as number,
      exp: payload.exp as number,
      jti: payload.jti,
      roles: roles as string[],
      ns,
      method: method as AuthMethod,
      ...(uid === undefined ? {} : { uid }),
    };
  }
}

/**
 * A key published by another orchestrator, checked before use: its kid must
 * be its own thumbprint (a record cannot pass one key off under another's
 * kid) and it must be an EC P-256 key.
 */
async function publishedKey(record: TokenKeyRecord | undefined, kid: string): Promise<KnownKey | undefined> {
  if (!record || record.kid !== kid || typeof record.issuer !== "string") return undefined;
  try {
    const key = p256(createPublicKey({ key: record.jwk, format: "jwk" }), "public");
    return (await thumbprint(key)) === kid ? { key, issuer: record.issuer } : undefined;
  } catch {
    return undefined;
  }
}

function principalOf(c: TokenClaims): Principal {
  return {
    id: c.sub,
    kind: c.sub.startsWith("client:") ? "client" : "user",
    roles: c.roles,
    namespace: c.ns,
    method: c.method,
    ...(c.uid === undefined ? {} : { uid: c.uid }),
  };
}

function tokenError(err: unknown): AuthError {
  const relogin = "log in again (`shoal auth login`)";
  if (err instanceof joseErrors.JWTExpired) {
    return new AuthError(AUTH_CODES.SHOAL_AUTH_TOKEN_EXPIRED, "token has expired", {
      cause: err,
      fix: relogin,
    });
  }
  if (err instanceof joseErrors.JWKSNoMatchingKey) {
    return new AuthError(
      AUTH_CODES.SHOAL_AUTH_TOKEN_UNKNOWN_KEY,
      "token is signed by a key no orchestrator of this cluster published",
      {
        cause: err,
        fix: "log in again (`shoal auth login`) at an orchestrator of this cluster; orchestrators of one cluster share the KV auth store",
      },
    );
  }
  if (err instanceof joseErrors.JOSEAlgNotAllowed) {
    return new AuthError(
      AUTH_CODES.SHOAL_AUTH_TOKEN_ALGORITHM,
      `token algorithm refused: only ${ALGORITHM}`,
      {
        cause: err,
        fix: relogin,
      },
    );
  }
  if (err instanceof joseErrors.JWTClaimValidationFailed && (err.claim === "aud" || err.claim === "iss")) {
    return new AuthError(
      AUTH_CODES.SHOAL_AUTH_TOKEN_AUDIENCE,
      `token was issued ${err.claim === "aud" ? "for another API" : "by another issuer"} (${err.claim})`,
      { cause: err, fix: "use the token obtained from this API (`shoal auth login --api URL`)" },
    );
  }
  const reason = err instanceof joseErrors.JOSEError ? err.message : String(err);
  return new AuthError(AUTH_CODES.SHOAL_AUTH_TOKEN_INVALID, `token is not valid: ${reason}`, {
    cause: err,
    fix: relogin,
  });
}

function p256(key: KeyObject, kind: "private" | "public"): KeyObject {
  if (
    key.type !== kind ||
    key.asymmetricKeyType !== "ec" ||
    key.asymmetricKeyDetails?.namedCurve !== "prime256v1"
  ) {
    throw new AuthError(
      AUTH_CODES.SHOAL_AUTH_KEY_UNSUPPORTED,
      `token ${kind} key must be an EC P-256 key (ES256)`,
      {
        fix: "use the orchestrator's ECDSA P-256 key",
      },
    );
  }
  return key;
}

async function thumbprint(publicKey: KeyObject): Promise<string> {
  return calculateJwkThumbprint(await exportJWK(publicKey));
}
