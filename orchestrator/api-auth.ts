import { type KeyObject, X509Certificate } from "node:crypto";
import path from "node:path";
import { type Readable, Transform } from "node:stream";
import type { TLSSocket } from "node:tls";
import { Type as T } from "@sinclair/typebox";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import {
  type Action,
  AUTH_CODES,
  AuthError,
  Authenticator,
  type AuthMethod,
  Authorizer,
  bootstrapAdmin,
  ClientKeyVerifier,
  type CompiledPolicies,
  currentPrincipal,
  type IssuedToken,
  type Principal,
  RateLimitedError,
  type Resource,
  RevocationList,
  type RoleScope,
  TokenService,
  UserDirectory,
  type UserRecord,
} from "../auth/index.js";
import { clientKey, type Logger, parseDuration, type ShoalConfig } from "../core/index.js";
import { type Rate, RateLimit } from "../fabric/index.js";
import { loadOrCreateKeyFile } from "../pki/index.js";
import type { WatchableAuthStore } from "./auth-store.js";
import { ORCHESTRATOR_CODES, OrchestratorError } from "./errors.js";
import type { JobRecord } from "./records.js";

const V1 = "/api/v1";

/**
 * Routes anyone may call without credentials: liveness, the CA bundle, the
 * login endpoints and enrollment (which authenticates by join token itself).
 * Keys are `METHOD /path` exactly as the route is registered. A route
 * registered with `config: PUBLIC_ROUTE` (api.ts) is public too.
 */
export const PUBLIC_ROUTES: Set<string> = new Set([
  `GET ${V1}/agent/alive`,
  `GET ${V1}/pki/ca`,
  `GET ${V1}/auth`,
  `POST ${V1}/auth/:method`,
  `POST ${V1}/enroll`,
]);

/**
 * Largest body a public route, or an anonymous caller on any route, has read
 * (a login, an enrollment's CSR and labels take a few KiB): without a
 * credential, nobody may make the orchestrator read and parse the 32 MiB a job
 * submission may carry (authorization looks at the parsed body, so it comes
 * after the parse).
 */
export const PUBLIC_BODY_LIMIT = 64 * 1024;

/**
 * Client-key challenges one address may ask for: each is a nonce written to
 * JetStream KV (kept 60 s) before anyone has proven anything, so their rate is
 * bounded per address. A login needs one.
 */
export const CHALLENGE_RATE: Readonly<Rate> = Object.freeze({ perSecond: 20, burst: 100 });

/** What a request does, for Cedar: the action and how to find the resource it acts on. */
export interface RouteRule {
  action: Action;
  resource: (req: FastifyRequest, ctx: RuleContext) => Resource;
}

/** What rules may look up. */
export interface RuleContext {
  /** The stored job (404 when there is none). */
  job: (id: string) => JobRecord;
}

const api: RouteRule["resource"] = () => ({ type: "Api" });
const job: RouteRule["resource"] = (req, ctx) => jobResource(ctx.job((req.params as { id: string }).id));
const node: RouteRule["resource"] = (req) => ({ type: "Node", id: (req.params as { id: string }).id });

/** The Cedar resource of a stored job: its owner is who submitted it. */
export function jobResource(j: JobRecord): Resource {
  return { type: "Job", id: j.ID, owner: j.Submitter.sub, namespace: j.Namespace };
}

/**
 * Every authenticated route and what it asks of Cedar. A route that is in
 * neither this table nor {@link PUBLIC_ROUTES} refuses to register, so no
 * endpoint can be added without deciding who may call it. Routes whose
 * resource is only known inside the handler (token revocation) use
 * {@link HANDLER_AUTHORIZED_ROUTES} and call {@link ApiAuth.authorize} there.
 */
export const ROUTE_RULES: Map<string, RouteRule> = new Map<string, RouteRule>([
  [`GET ${V1}/agent/version`, { action: "agent:read", resource: api }],
  [`GET ${V1}/agent/node`, { action: "agent:read", resource: api }],
  [`GET ${V1}/agent/metrics`, { action: "agent:metrics", resource: api }],
  [
    `PUT ${V1}/orchestrator/jobs`,
    {
      action: "job:submit",
      // The job to be: the caller owns it, in the namespace it names (else the caller's own).
      resource: (req) => {
        const p = req.principal;
        const ns = (req.body as { Job?: { Namespace?: unknown } } | undefined)?.Job?.Namespace;
        return { type: "Job", id: "new", owner: p.id, namespace: typeof ns === "string" ? ns : p.namespace };
      },
    },
  ],
  [
    `GET ${V1}/orchestrator/jobs`,
    { action: "job:list", resource: (req) => ({ type: "Namespace", id: req.principal.namespace }) },
  ],
  [`GET ${V1}/orchestrator/jobs/:id`, { action: "job:read", resource: job }],
  [`GET ${V1}/orchestrator/jobs/:id/executions`, { action: "job:read", resource: job }],
  [`GET ${V1}/orchestrator/jobs/:id/history`, { action: "job:read", resource: job }],
  [`GET ${V1}/orchestrator/jobs/:id/logs`, { action: "job:logs", resource: job }],
  [`GET ${V1}/orchestrator/jobs/:id/results`, { action: "job:results", resource: job }],
  [`GET ${V1}/orchestrator/jobs/:id/results/:execution/*`, { action: "job:results", resource: job }],
  [`DELETE ${V1}/orchestrator/jobs/:id`, { action: "job:stop", resource: job }],
  [`POST ${V1}/orchestrator/jobs/:id/stop`, { action: "job:stop", resource: job }],
  [`GET ${V1}/orchestrator/nodes`, { action: "node:list", resource: api }],
  [`GET ${V1}/orchestrator/nodes/:id`, { action: "node:read", resource: node }],
  [`POST ${V1}/orchestrator/nodes/:id/approve`, { action: "node:approve", resource: node }],
  [`POST ${V1}/orchestrator/nodes/:id/reject`, { action: "node:reject", resource: node }],
  [`DELETE ${V1}/orchestrator/nodes/:id`, { action: "node:delete", resource: node }],
  [`GET ${V1}/auth/users`, { action: "user:manage", resource: api }],
  [`POST ${V1}/auth/users`, { action: "user:manage", resource: api }],
  [`DELETE ${V1}/auth/users/:name`, { action: "user:manage", resource: api }],
  [`GET ${V1}/auth/roles`, { action: "role:manage", resource: api }],
  [`POST ${V1}/auth/roles`, { action: "role:manage", resource: api }],
  [`DELETE ${V1}/auth/roles/:name`, { action: "role:manage", resource: api }],
  [`POST ${V1}/pki/join-tokens`, { action: "pki:enroll-token", resource: api }],
  [`GET ${V1}/pki/join-tokens`, { action: "pki:enroll-token", resource: api }],
  [`DELETE ${V1}/pki/join-tokens/:id`, { action: "pki:enroll-token", resource: api }],
]);

/** Authenticated routes that authorize inside the handler, once the resource is known. */
export const HANDLER_AUTHORIZED_ROUTES: Set<string> = new Set([`DELETE ${V1}/auth/tokens`]);

export interface ApiAuthOptions {
  /** `API.Auth`. */
  config: ShoalConfig["API"]["Auth"];
  policies: CompiledPolicies;
  /** KvAuthStore in the daemon. */
  store: WatchableAuthStore;
  dataDir: string;
  /** Token `iss`: the orchestrator's SPIFFE id. */
  issuer: string;
  trustDomain: string;
  /** The fabric CA, which issues user certificates (mtls). */
  caPem: string;
  /** The CA's current CRL, if any (mtls). */
  crlPem?: () => string | undefined;
  /** The job store, for the owner and namespace of a job a request names. */
  job: (id: string) => JobRecord;
  logger: Logger;
  /** Where the generated first admin password is printed, once. */
  print: (line: string) => void;
  /** @default process.env (SHOAL_ADMIN_PASSWORD, SHOAL_SHARED_SECRET) */
  env?: NodeJS.ProcessEnv;
}

/** The audience of API tokens and client-key challenges: every orchestrator of the trust domain. */
export function apiAudience(trustDomain: string): string {
  return `shoal-api://${trustDomain}`;
}

/** The token signing key's file under the data dir (EC P-256, 0600). */
export const TOKEN_KEY_FILE = path.join("auth", "token-signing.key");

/**
 * The API's security: authentication (Bearer token, or anonymous when
 * enabled) in an `onRequest` hook, Cedar authorization of every route in a
 * `preValidation` hook (the body is parsed but not yet validated, so a
 * caller without the right learns nothing from schema errors), the login,
 * user, role and token endpoints, and the stores' watchers that keep
 * revocations and roles current across orchestrators.
 */
export class ApiAuth {
  readonly authenticator: Authenticator;
  readonly authorizer: Authorizer;
  readonly tokens: TokenService;
  readonly directory: UserDirectory;
  readonly #o: ApiAuthOptions;
  readonly #log: Logger;
  readonly #audit: Logger;
  /** Connections whose client certificate was refused, and why (see #byCertificate). */
  readonly #refusedCertificates = new WeakMap<object, Error>();
  /** Every user as the store has it now (kept by the store's watcher), for the check of each token. */
  readonly #users: Map<string, UserRecord>;
  readonly #challenges = new RateLimit(CHALLENGE_RATE);

  private constructor(
    o: ApiAuthOptions,
    parts: {
      authenticator: Authenticator;
      authorizer: Authorizer;
      tokens: TokenService;
      directory: UserDirectory;
      users: Map<string, UserRecord>;
    },
  ) {
    this.#o = o;
    this.authenticator = parts.authenticator;
    this.authorizer = parts.authorizer;
    this.tokens = parts.tokens;
    this.directory = parts.directory;
    this.#users = parts.users;
    this.#log = o.logger.child({ component: "api-auth" });
    this.#audit = o.logger.child({ component: "audit" });
  }

  /**
   * Bootstraps the first admin, loads roles and revocations from the store,
   * loads (or creates) the token signing key and starts the watchers.
   */
  static async create(o: ApiAuthOptions): Promise<ApiAuth> {
    const env = o.env ?? process.env;
    const methods = o.config.Methods as AuthMethod[];
    const sharedSecret = env.SHOAL_SHARED_SECRET;
    if (methods.includes("sharedSecret") && !sharedSecret) {
      throw new OrchestratorError(
        ORCHESTRATOR_CODES.SHOAL_ORCH_AUTH_CONFIG,
        "API.Auth.Methods includes sharedSecret but SHOAL_SHARED_SECRET is not set",
        500,
        {
          fix: "set SHOAL_SHARED_SECRET in the orchestrator's environment, or drop sharedSecret from API.Auth.Methods",
        },
      );
    }
    const directory = new UserDirectory(o.store);
    const boot = await bootstrapAdmin({ directory, dataDir: o.dataDir, env });
    if (boot.generatedPassword) {
      o.print(`First admin created: user ${boot.name}, password ${boot.generatedPassword}`);
      o.print(`  (also in ${boot.passwordFile}, mode 0600; shown once: change it or delete the file)`);
    }
    const authorizer = new Authorizer({
      policies: o.policies,
      roles: await directory.listRoles(),
      logger: o.logger,
    });
    const revocations = new RevocationList(o.store);
    await revocations.refresh();
    // Watched before they are listed, so a change made meanwhile is not lost.
    const users = new Map<string, UserRecord>();
    await o.store.watch({
      revocation: (e) => revocations.apply(e),
      roles: (roles) => {
        authorizer.setRoles(roles);
      },
      user: (name, user) => (user ? users.set(name, user) : users.delete(name)),
    });
    for (const user of await directory.listUsers()) users.set(user.name, user);
    const audience = apiAudience(o.trustDomain);
    const tokens = await TokenService.create({
      signingKey: await tokenSigningKey(o.dataDir),
      // Published in the shared store: every orchestrator of the cluster accepts this one's tokens.
      publishedKeys: o.store.tokenKeys,
      issuer: o.issuer,
      audience,
      ttlSeconds: Math.max(1, Math.floor(parseDuration(o.config.TokenTTL) / 1000)),
      revocations,
    });
    const authenticator = new Authenticator({
      methods,
      directory,
      clientKeys: new ClientKeyVerifier({ store: o.store, audience }),
      ...(sharedSecret ? { sharedSecrets: [{ secret: sharedSecret, role: "operator" }] } : {}),
      mtls: { caPem: o.caPem, trustDomain: o.trustDomain, ...(o.crlPem ? { crlPem: o.crlPem } : {}) },
      logger: o.logger,
    });
    return new ApiAuth(o, { authenticator, authorizer, tokens, directory, users });
  }

  /** Whether the TLS listener should ask for client certificates (the mtls method). */
  get wantsClientCertificates(): boolean {
    return this.authenticator.isEnabled("mtls");
  }

  /**
   * Adds the hooks and the auth routes to `app`. Call before other routes
   * are added: from then on a route without a rule refuses to register.
   */
  install(app: FastifyInstance): void {
    app.addHook("onRoute", (route) => {
      for (const method of [route.method].flat()) {
        if (method === "HEAD") continue;
        const key = `${method} ${route.url}`;
        const isPublicRoute =
          (route.config as { public?: unknown } | undefined)?.public === true || PUBLIC_ROUTES.has(key);
        if (isPublicRoute) route.bodyLimit ??= PUBLIC_BODY_LIMIT;
        if (!isPublicRoute && !ROUTE_RULES.has(key) && !HANDLER_AUTHORIZED_ROUTES.has(key)) {
          throw new Error(
            `route ${key} has no authorization rule: add it to ROUTE_RULES or PUBLIC_ROUTES in orchestrator/api-auth.ts`,
          );
        }
      }
    });
    app.addHook("onRequest", async (req) => {
      req.principal = await this.#authenticate(req);
    });
    // Public routes have PUBLIC_BODY_LIMIT as their own limit (above).
    app.addHook("preParsing", async (req, _reply, payload) =>
      req.principal.kind === "anonymous" && !isPublic(req)
        ? capped(req, payload, PUBLIC_BODY_LIMIT)
        : payload,
    );
    // Before validation: a caller without the right learns nothing from schema errors.
    app.addHook("preValidation", async (req) => {
      const key = routeKey(req);
      const rule = isPublic(req) ? undefined : ROUTE_RULES.get(key);
      if (!rule) return; // public or handler-authorized
      this.authorize(req, rule.action, rule.resource(req, { job: this.#o.job }));
    });
    this.#routes(app);
  }

  /** Cedar decision for the caller; throws SHOAL_AUTH_DENIED (403) unless allowed. */
  authorize(req: FastifyRequest, action: Action, resource: Resource): void {
    this.authorizer.assertAllowed({
      principal: req.principal,
      action,
      resource,
      context: { sourceIp: sourceIp(req) },
    });
  }

  /** Whether the caller may read a job: a listing shows no other. */
  canReadJob(req: FastifyRequest): (job: JobRecord) => boolean {
    const context = { sourceIp: sourceIp(req) };
    return (j) =>
      this.authorizer.authorize(
        { principal: req.principal, action: "job:read", resource: jobResource(j), context },
        { audit: false },
      ).decision === "allow";
  }

  async #authenticate(req: FastifyRequest): Promise<Principal> {
    const header = req.headers.authorization;
    if (header === undefined) {
      if (isPublic(req)) return this.#anonymous();
      if (this.authenticator.isEnabled("mtls") && hasPeerCertificate(req)) return this.#byCertificate(req);
      try {
        return this.authenticator.anonymous();
      } catch (err) {
        this.#auditRefusal(req, err, "unauthenticated");
        throw err;
      }
    }
    const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
    if (!match) {
      throw new AuthError(
        AUTH_CODES.SHOAL_AUTH_TOKEN_INVALID,
        "the Authorization header is not `Bearer TOKEN`",
        {
          fix: "send Authorization: Bearer <token from POST /api/v1/auth/{method}>",
        },
      );
    }
    try {
      const { claims, principal } = await this.tokens.verify(match[1]!);
      // A user added at another orchestrator a moment ago may not have reached the watcher yet:
      // then it is read from the store (not kept: the watcher's word is the one that lasts).
      return await currentPrincipal(
        claims,
        principal,
        (name) => this.#users.get(name) ?? this.directory.getUser(name),
      );
    } catch (err) {
      this.#auditRefusal(req, err, "token refused");
      throw err;
    }
  }

  /**
   * A request without a token on a connection that presented a client
   * certificate is that certificate's user, checked as an mtls login is (CA,
   * trust domain, CRL, the user exists and is enabled), on every request, so
   * a revoked certificate or a disabled user stops at once. For clients that
   * cannot log in first (a Prometheus scraper). A certificate refused once is
   * refused for the rest of its connection without checking it again, and
   * logged once.
   */
  async #byCertificate(req: FastifyRequest): Promise<Principal> {
    const socket = req.raw.socket;
    const refused = this.#refusedCertificates.get(socket);
    if (refused) throw refused;
    try {
      return await this.authenticator.mtls(peerChainPem(req), { address: req.ip });
    } catch (err) {
      this.#refusedCertificates.set(socket, err as Error);
      this.#auditRefusal(req, err, "client certificate refused");
      throw err;
    }
  }

  /** Logs a refused authentication, with its route, address and code, to the audit log. */
  #auditRefusal(req: FastifyRequest, err: unknown, message: string): void {
    this.#audit.warn({ route: routeKey(req), address: req.ip, code: (err as AuthError).code }, message);
  }

  /** The principal of public routes: anonymous even when anonymous mode is off (they need no one). */
  #anonymous(): Principal {
    return { id: "anonymous", kind: "anonymous", roles: [], namespace: "default", method: "anonymous" };
  }

  #routes(app: FastifyInstance): void {
    app.get(`${V1}/auth`, async () => ({
      Methods: this.authenticator.describeMethods(),
      TokenTTLSeconds: this.tokens.ttlSeconds,
    }));

    app.post(
      `${V1}/auth/:method`,
      {
        schema: {
          params: T.Object({ method: T.String() }),
          body: T.Union([T.Object({}, { additionalProperties: true }), T.Null()]),
        },
      },
      async (req, reply) => this.#login(req, reply),
    );

    app.get(`${V1}/auth/users`, async () => ({ Items: (await this.directory.listUsers()).map(publicUser) }));
    app.post(
      `${V1}/auth/users`,
      {
        schema: {
          body: T.Object(
            {
              Name: T.String(),
              Password: T.Optional(T.String()),
              Roles: T.Array(T.String(), { minItems: 1 }),
              Namespace: T.Optional(T.String()),
              ClientKeys: T.Optional(T.Array(T.String({ pattern: "^[0-9a-f]{64}$" }))),
            },
            { additionalProperties: false },
          ),
        },
      },
      async (req, reply) => {
        const b = req.body as {
          Name: string;
          Password?: string;
          Roles: string[];
          Namespace?: string;
          ClientKeys?: string[];
        };
        const user = await this.directory.addUser({
          name: b.Name,
          roles: b.Roles,
          ...(b.Password === undefined ? {} : { password: b.Password }),
          ...(b.Namespace === undefined ? {} : { namespace: b.Namespace }),
          ...(b.ClientKeys === undefined ? {} : { clientKeys: b.ClientKeys }),
        });
        this.#users.set(user.name, user);
        this.#log.info({ by: req.principal.id, user: user.name, roles: user.roles }, "user added");
        return reply.status(201).send({ User: publicUser(user) });
      },
    );
    app.delete(
      `${V1}/auth/users/:name`,
      { schema: { params: T.Object({ name: T.String() }) } },
      async (req) => {
        const name = (req.params as { name: string }).name;
        await this.directory.deleteUser(name);
        // Its tokens are refused here at once; the watcher brings the deletion to the other orchestrators.
        this.#users.delete(name);
        this.#log.info({ by: req.principal.id, user: name }, "user deleted");
        return { Name: name, Deleted: true };
      },
    );

    app.get(`${V1}/auth/roles`, async () => ({ Items: await this.directory.listRoles() }));
    app.post(
      `${V1}/auth/roles`,
      {
        schema: {
          body: T.Object(
            {
              Name: T.String(),
              Description: T.Optional(T.String({ maxLength: 1024 })),
              Actions: T.Array(T.String(), { minItems: 1 }),
              Scope: T.Optional(T.Union([T.Literal("cluster"), T.Literal("namespace"), T.Literal("own")])),
            },
            { additionalProperties: false },
          ),
        },
      },
      async (req, reply) => {
        const b = req.body as { Name: string; Description?: string; Actions: string[]; Scope?: RoleScope };
        const role = await this.directory.addRole({
          name: b.Name,
          description: b.Description ?? "",
          actions: b.Actions,
          ...(b.Scope ? { scope: b.Scope } : {}),
        });
        // Take effect here at once; the watcher brings it to the other orchestrators.
        this.authorizer.setRoles(await this.directory.listRoles());
        this.#log.info({ by: req.principal.id, role: role.name }, "role added");
        return reply.status(201).send({ Role: role });
      },
    );
    app.delete(
      `${V1}/auth/roles/:name`,
      { schema: { params: T.Object({ name: T.String() }) } },
      async (req) => {
        const name = (req.params as { name: string }).name;
        await this.directory.deleteRole(name);
        this.authorizer.setRoles(await this.directory.listRoles());
        return { Name: name, Deleted: true };
      },
    );

    // Revokes the token given, a jti, or (no body) the caller's own token: logout.
    app.delete(
      `${V1}/auth/tokens`,
      {
        schema: {
          body: T.Union([
            T.Object(
              {
                Token: T.Optional(T.String()),
                JTI: T.Optional(T.String({ pattern: "^[A-Za-z0-9_-]{1,128}$" })),
              },
              { additionalProperties: false },
            ),
            T.Null(),
          ]),
        },
      },
      async (req) => {
        const b = (req.body ?? {}) as { Token?: string; JTI?: string };
        const own = /^Bearer\s+(\S+)/i.exec(req.headers.authorization ?? "")?.[1];
        const token = b.Token ?? (b.JTI === undefined ? own : undefined);
        if (token !== undefined) {
          const { claims } = await this.tokens.verify(token);
          this.authorize(req, "token:revoke", { type: "Token", id: claims.jti, owner: claims.sub });
          await this.tokens.revokeToken(token);
          return { JTI: claims.jti, Revoked: true };
        }
        if (b.JTI === undefined) {
          throw new AuthError(AUTH_CODES.SHOAL_AUTH_UNAUTHENTICATED, "no token to revoke", {
            fix: "send {Token} or {JTI}, or call with your own token to log out",
          });
        }
        // Whose it is cannot be told from a jti: only a role that may revoke any token (admin) may.
        this.authorize(req, "token:revoke", { type: "Token", id: b.JTI, owner: "" });
        await this.tokens.revokeJti(b.JTI);
        return { JTI: b.JTI, Revoked: true };
      },
    );
  }

  async #login(req: FastifyRequest, reply: FastifyReply): Promise<unknown> {
    const method = (req.params as { method: string }).method;
    const body = (req.body ?? {}) as Record<string, unknown>;
    const source = { address: req.ip };
    const ttl = typeof body.TTLSeconds === "number" ? { ttlSeconds: body.TTLSeconds } : {};
    try {
      let principal: Principal;
      switch (method) {
        case "password":
          principal = await this.authenticator.password(
            { username: String(body.username ?? ""), password: String(body.password ?? "") },
            source,
          );
          break;
        case "sharedSecret":
          principal = await this.authenticator.sharedSecret({ secret: String(body.secret ?? "") }, source);
          break;
        case "clientKey":
          // Step 1 (no signature): a fresh nonce. Step 2: the signed nonce.
          if (body.signature === undefined) {
            if (!this.#challenges.admit(clientKey(req.ip))) throw RateLimitedError.busy("address");
            const clientId = typeof body.clientId === "string" ? { clientId: body.clientId } : {};
            return { Challenge: await this.authenticator.challenge(clientId) };
          }
          principal = await this.authenticator.clientKey(
            {
              nonce: String(body.nonce ?? ""),
              publicKey: String(body.publicKey ?? ""),
              signature: String(body.signature),
            },
            source,
          );
          break;
        case "mtls":
          principal = await this.authenticator.mtls(peerChainPem(req), source);
          break;
        case "anonymous":
          throw new AuthError(AUTH_CODES.SHOAL_AUTH_METHOD_DISABLED, "anonymous callers need no token", {
            fix: "call the API without an Authorization header, or log in with another method",
          });
        default:
          throw new AuthError(AUTH_CODES.SHOAL_AUTH_METHOD_DISABLED, `no authentication method ${method}`, {
            fix: `use one of: ${this.authenticator
              .describeMethods()
              .map((m) => m.name)
              .join(", ")}`,
          });
      }
      const issued = await this.tokens.issue(principal, ttl);
      return reply.status(201).send(tokenReply(issued));
    } catch (err) {
      if (err instanceof RateLimitedError) void reply.header("retry-after", String(err.retryAfterSeconds));
      throw err;
    }
  }
}

function tokenReply(issued: IssuedToken) {
  const c = issued.claims;
  return {
    Token: issued.token,
    ExpiresAt: new Date(c.exp * 1000).toISOString(),
    Subject: c.sub,
    Roles: c.roles,
    Namespace: c.ns,
    Method: c.method,
    JTI: c.jti,
  };
}

function publicUser(u: UserRecord) {
  return {
    Name: u.name,
    Roles: u.roles,
    Namespace: u.namespace,
    Disabled: u.disabled,
    CreatedAt: u.createdAt,
    HasPassword: u.passwordHash !== undefined,
    ClientKeys: u.clientKeys ?? [],
  };
}

/** `payload`, refused with 413 once it is longer than `limit`: at once by its declared length, else as it arrives. */
function capped(req: FastifyRequest, payload: Readable, limit: number): Readable {
  const tooLarge = () =>
    Object.assign(new Error(`a request without credentials may carry at most ${limit} bytes of body`), {
      statusCode: 413,
    });
  if (Number(req.headers["content-length"] ?? 0) > limit) throw tooLarge();
  let seen = 0;
  return payload.pipe(
    new Transform({
      transform(chunk: Buffer, _encoding, done) {
        seen += chunk.length;
        done(seen > limit ? tooLarge() : null, chunk);
      },
    }),
  );
}

function isPublic(req: FastifyRequest): boolean {
  return (
    PUBLIC_ROUTES.has(routeKey(req)) ||
    (req.routeOptions.config as { public?: unknown } | undefined)?.public === true
  );
}

function routeKey(req: FastifyRequest): string {
  return `${req.method} ${req.routeOptions.url ?? ""}`;
}

function sourceIp(req: FastifyRequest): string | undefined {
  const ip = req.ip?.replace(/^::ffff:/, "");
  return ip && !ip.includes("%") ? ip : undefined;
}

/** Whether the client presented a TLS certificate on the request's connection. */
function hasPeerCertificate(req: FastifyRequest): boolean {
  return Boolean((req.raw.socket as TLSSocket).getPeerCertificate?.()?.raw);
}

/** The TLS client certificate chain (leaf first) as PEM; empty when the client sent none. */
function peerChainPem(req: FastifyRequest): string {
  const socket = req.raw.socket as TLSSocket;
  let cert = socket.getPeerCertificate?.(true);
  const pems: string[] = [];
  const seen = new Set<string>();
  while (cert?.raw && !seen.has(cert.fingerprint256)) {
    seen.add(cert.fingerprint256);
    pems.push(new X509Certificate(cert.raw).toString());
    cert = cert.issuerCertificate;
  }
  if (pems.length === 0) {
    throw new AuthError(AUTH_CODES.SHOAL_AUTH_CERT_REJECTED, "no TLS client certificate was presented", {
      fix: "connect with a user certificate (`shoal pki issue user --id NAME`) to log in with mtls",
    });
  }
  return pems.join("");
}

/** The token signing key: `<data dir>/auth/token-signing.key`, created (P-256, 0600) on first start. */
async function tokenSigningKey(dataDir: string): Promise<KeyObject> {
  return loadOrCreateKeyFile(path.join(dataDir, TOKEN_KEY_FILE));
}
