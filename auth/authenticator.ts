import { createHash, timingSafeEqual } from "node:crypto";
import { type Logger, silentLogger } from "../core/index.js";
import { parseSpiffeId, verifyCertificate } from "../pki/index.js";
import type { ClientKeyChallenge, ClientKeyResponse, ClientKeyVerifier } from "./client-key.js";
import { AUTH_CODES, AuthError } from "./errors.js";
import { DEFAULT_SCRYPT_LOG_N, type HashOptions, hashPassword, verifyPassword } from "./password.js";
import { HashGate, LoginRateLimiter } from "./rate-limit.js";
import {
  ANONYMOUS_PRINCIPAL,
  type AuthMethod,
  DEFAULT_NAMESPACE,
  type Principal,
  type UserRecord,
} from "./types.js";
import { type UserDirectory, userDisabled } from "./users.js";

/** A configured shared secret and who presenting it becomes. */
export interface SharedSecret {
  secret: string;
  /** The role granted. */
  role: string;
  /** Principal id (a token's `sub`). @default "shared-secret" */
  name?: string;
  /** @default DEFAULT_NAMESPACE */
  namespace?: string;
}

/** How `GET /api/v1/auth` describes a method to clients. */
export interface MethodDescription {
  name: AuthMethod;
  /** `none`: no login; `challenge`: ask for a nonce, sign it; `ask`: send the listed fields; `certificate`: TLS client certificate. */
  type: "none" | "challenge" | "ask" | "certificate";
  fields?: string[];
}

export interface AuthenticatorOptions {
  /** `API.Auth.Methods`. */
  methods: readonly AuthMethod[];
  directory: UserDirectory;
  /** @default a LoginRateLimiter with its defaults */
  limiter?: LoginRateLimiter;
  /** Required when `clientKey` is enabled. */
  clientKeys?: ClientKeyVerifier;
  /** Required when `sharedSecret` is enabled. */
  sharedSecrets?: readonly SharedSecret[];
  /** Required when `mtls` is enabled: the fabric CA that issues user certificates. */
  mtls?: {
    caPem: string;
    trustDomain: string;
    /** The current CRL of the fabric CA, if any. */
    crlPem?: () => string | undefined;
  };
  /** Password checks at once and queued, server-wide. @default new HashGate() (2 and 32) */
  hashGate?: HashGate;
  /** Cost of the dummy hash checked for unknown users (match the users' hashes). @default DEFAULT_SCRYPT_LOG_N */
  hash?: HashOptions;
  /** Logs successes and failures of logins (never secrets) as `{ component: "auth" }`. */
  logger?: Logger;
}

/** Where a login attempt comes from, for rate limiting and logs. */
export interface LoginSource {
  address?: string;
}

/**
 * Turns credentials into a {@link Principal}, one method at a time, refusing
 * methods that are not enabled. Failed logins count against the user and the
 * source address; the limiter's lockout is SHOAL_AUTH_RATE_LIMITED.
 */
export class Authenticator {
  readonly #methods: ReadonlySet<AuthMethod>;
  readonly #directory: UserDirectory;
  readonly #limiter: LoginRateLimiter;
  readonly #hashGate: HashGate;
  readonly #options: AuthenticatorOptions;
  readonly #log: Logger;
  #dummyHash: Promise<string> | undefined;

  constructor(options: AuthenticatorOptions) {
    this.#methods = new Set(options.methods);
    this.#directory = options.directory;
    this.#limiter = options.limiter ?? new LoginRateLimiter();
    this.#hashGate = options.hashGate ?? new HashGate();
    this.#options = options;
    this.#log = (options.logger ?? silentLogger).child({ component: "auth" });
    if (this.#methods.has("clientKey") && !options.clientKeys)
      throw new TypeError("clientKey needs clientKeys");
    if (this.#methods.has("sharedSecret") && !options.sharedSecrets?.length) {
      throw new TypeError("sharedSecret needs sharedSecrets");
    }
    if (this.#methods.has("mtls") && !options.mtls) throw new TypeError("mtls needs the fabric CA");
  }

  isEnabled(method: AuthMethod): boolean {
    return this.#methods.has(method);
  }

  /** For `GET /api/v1/auth`. */
  describeMethods(): MethodDescription[] {
    const all: Record<AuthMethod, MethodDescription> = {
      anonymous: { name: "anonymous", type: "none" },
      clientKey: { name: "clientKey", type: "challenge" },
      password: { name: "password", type: "ask", fields: ["username", "password"] },
      sharedSecret: { name: "sharedSecret", type: "ask", fields: ["secret"] },
      mtls: { name: "mtls", type: "certificate" },
    };
    return [...this.#methods].map((m) => all[m]);
  }

  /** The principal of a request without credentials: anonymous when enabled, otherwise SHOAL_AUTH_UNAUTHENTICATED. */
  anonymous(): Principal {
    if (!this.#methods.has("anonymous")) {
      throw new AuthError(AUTH_CODES.SHOAL_AUTH_UNAUTHENTICATED, "this API needs credentials", {
        fix: "log in first (`shoal auth login`), or send a token (SHOAL_TOKEN)",
      });
    }
    return { ...ANONYMOUS_PRINCIPAL, roles: [] };
  }

  async password(
    credentials: { username: string; password: string },
    source: LoginSource = {},
  ): Promise<Principal> {
    this.#require("password");
    const subject = { user: String(credentials.username), address: source.address };
    const end = this.#limiter.begin(subject);
    try {
      const user = await this.#directory.getUser(subject.user);
      // Unknown users and users without a password cost one scrypt too, so timing does not tell them apart.
      const ok = await this.#hashGate.run(async () =>
        verifyPassword(String(credentials.password), user?.passwordHash ?? (await this.#dummy())),
      );
      if (!user?.passwordHash || !ok) {
        this.#limiter.recordFailure(subject);
        this.#log.warn({ method: "password", user: subject.user, address: source.address }, "login failed");
        throw badCredentials();
      }
      this.#limiter.recordSuccess(subject);
      return this.#userPrincipal(user, "password", source);
    } finally {
      end();
    }
  }

  /** A fresh nonce for the client-key method; see {@link ClientKeyVerifier.challenge}. */
  async challenge(options: { clientId?: string } = {}): Promise<ClientKeyChallenge> {
    this.#require("clientKey");
    return this.#options.clientKeys!.challenge(options);
  }

  /**
   * Verifies a signed nonce. A key registered to a user logs in as that user;
   * any other key is a self-generated client (`client:<id>`), allowed only in
   * anonymous mode.
   */
  async clientKey(response: ClientKeyResponse, source: LoginSource = {}): Promise<Principal> {
    this.#require("clientKey");
    const subject = { address: source.address };
    this.#limiter.check(subject);
    let clientId: string;
    try {
      clientId = await this.#options.clientKeys!.verify(response);
    } catch (err) {
      this.#limiter.recordFailure(subject);
      this.#log.warn(
        { method: "clientKey", address: source.address, code: (err as AuthError).code },
        "login failed",
      );
      throw err;
    }
    const user = await this.#directory.findByClientKey(clientId);
    if (user) return this.#userPrincipal(user, "clientKey", source);
    if (!this.#methods.has("anonymous")) {
      this.#log.warn(
        { method: "clientKey", clientId, address: source.address },
        "unregistered client key refused",
      );
      throw new AuthError(
        AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS,
        "this client key is not registered to a user",
        {
          fix: "ask an admin to register your client id, or log in another way",
        },
      );
    }
    this.#log.info({ method: "clientKey", clientId, address: source.address }, "client key logged in");
    return {
      id: `client:${clientId}`,
      kind: "client",
      roles: [],
      namespace: DEFAULT_NAMESPACE,
      method: "clientKey",
    };
  }

  /** Compares against every configured secret in constant time. */
  async sharedSecret(credentials: { secret: string }, source: LoginSource = {}): Promise<Principal> {
    this.#require("sharedSecret");
    const subject = { address: source.address };
    this.#limiter.check(subject);
    const given = digest(String(credentials.secret));
    let match: SharedSecret | undefined;
    for (const s of this.#options.sharedSecrets!) {
      if (timingSafeEqual(given, digest(s.secret)) && !match) match = s;
    }
    if (!match) {
      this.#limiter.recordFailure(subject);
      this.#log.warn({ method: "sharedSecret", address: source.address }, "login failed");
      throw badCredentials();
    }
    const id = match.name ?? "shared-secret";
    this.#log.info({ method: "sharedSecret", principal: id, address: source.address }, "logged in");
    return {
      id,
      kind: "user",
      roles: [match.role],
      namespace: match.namespace ?? DEFAULT_NAMESPACE,
      method: "sharedSecret",
    };
  }

  /**
   * Maps a TLS client certificate chain (leaf first) to a user: the chain is
   * verified against the fabric CA (signatures, validity, clientAuth, CRL), its
   * SPIFFE id must be `spiffe://<trust-domain>/user/<name>`, and `<name>` a
   * user that is not disabled.
   */
  async mtls(chainPem: string, source: LoginSource = {}): Promise<Principal> {
    this.#require("mtls");
    const { caPem, trustDomain, crlPem } = this.#options.mtls!;
    const crl = crlPem?.();
    let result: ReturnType<typeof verifyCertificate>;
    try {
      result = verifyCertificate(chainPem, {
        caPem,
        role: "user",
        trustDomain,
        ...(crl ? { crlPem: crl } : {}),
      });
    } catch (err) {
      throw certRejected("the client certificate cannot be parsed", err);
    }
    if (!result.ok) {
      this.#log.warn(
        { method: "mtls", address: source.address, failures: result.failures.map((f) => f.code) },
        "login failed",
      );
      throw certRejected(result.failures.map((f) => f.message).join("; "));
    }
    const id = result.leaf.spiffeId ? parseSpiffeId(result.leaf.spiffeId) : undefined;
    if (id?.role !== "user" || id.trustDomain !== trustDomain) {
      throw certRejected(
        `certificate identity ${result.leaf.spiffeId ?? "(none)"} is not a user of ${trustDomain}`,
      );
    }
    const user = await this.#directory.getUser(id.id);
    if (!user) {
      this.#log.warn(
        { method: "mtls", user: id.id, address: source.address },
        "certificate for unknown user",
      );
      throw badCredentials();
    }
    return this.#userPrincipal(user, "mtls", source);
  }

  #userPrincipal(user: UserRecord, method: AuthMethod, source: LoginSource): Principal {
    if (user.disabled) {
      this.#log.warn({ method, user: user.name, address: source.address }, "disabled user refused");
      throw userDisabled(user.name);
    }
    this.#log.info({ method, user: user.name, address: source.address }, "logged in");
    return {
      id: user.name,
      kind: "user",
      roles: [...user.roles],
      namespace: user.namespace,
      method,
      ...(user.uid ? { uid: user.uid } : {}),
    };
  }

  #require(method: AuthMethod): void {
    if (!this.#methods.has(method)) {
      throw new AuthError(
        AUTH_CODES.SHOAL_AUTH_METHOD_DISABLED,
        `authentication method ${method} is not enabled`,
        {
          fix: `use one of: ${[...this.#methods].join(", ") || "(none)"}; or add it to API.Auth.Methods`,
        },
      );
    }
  }

  #dummy(): Promise<string> {
    this.#dummyHash ??= hashPassword("not a password of anyone", {
      logN: this.#options.hash?.logN ?? DEFAULT_SCRYPT_LOG_N,
    });
    return this.#dummyHash;
  }
}

function digest(s: string): Buffer {
  return createHash("sha256").update(s, "utf8").digest();
}

function badCredentials(): AuthError {
  return new AuthError(AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS, "unknown user or wrong credentials", {
    fix: "check the user name and password (or secret)",
  });
}

function certRejected(message: string, cause?: unknown): AuthError {
  return new AuthError(AUTH_CODES.SHOAL_AUTH_CERT_REJECTED, message, {
    ...(cause === undefined ? {} : { cause }),
    fix: "use a user certificate from this fabric's CA (`shoal pki issue user --id NAME`)",
  });
}
