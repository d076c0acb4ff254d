import { randomBytes } from "node:crypto";
import * as cedar from "@cedar-policy/cedar-wasm/nodejs";
import { type Logger, silentLogger } from "../core/index.js";
import { AUTH_CODES, AuthError } from "./errors.js";
import type { CompiledPolicies } from "./policy.js";
import { rolePolicies } from "./role-policies.js";
import type { Action, Principal, RoleRecord } from "./types.js";

/** What a request acts on. `owner` is the owning principal's id (a token's `sub`). */
export type Resource =
  | { type: "Job"; id: string; owner: string; namespace: string }
  | { type: "Node"; id: string }
  | { type: "Namespace"; id: string }
  | { type: "Token"; id: string; owner: string }
  | { type: "Api" };

export interface RequestContext {
  /** The caller's IP address; policies see it as `context.sourceIp` (a Cedar ipaddr). */
  sourceIp?: string;
}

export interface AuthorizationRequest {
  principal: Principal;
  action: Action;
  resource: Resource;
  context?: RequestContext;
}

export interface AuthorizationDecision {
  decision: "allow" | "deny";
  /** Ids (`@id`) of the policies that decided: the permits that allowed, or the forbids that denied. */
  reasons: readonly string[];
  /** Policies that failed to evaluate, and request errors; an error never allows (fail closed). */
  errors: readonly string[];
}

export interface AuthorizerOptions {
  policies: CompiledPolicies;
  roles: readonly RoleRecord[];
  /** The audit log is its child `{ component: "audit" }`. @default silentLogger */
  logger?: Logger;
  /**
   * Decisions remembered, cleared when roles change; 0 turns the cache off.
   * When no policy names a user, namespace, job, node or token literally, a
   * decision can only depend on the caller's roles and attributes and on how
   * the resource relates to the caller (own job? own namespace?), so the cache
   * is keyed by that relation and nearly every request hits it; otherwise it
   * is keyed by the exact request. @default 10_000
   */
  cacheSize?: number;
}

const NS = "Shoal";
const API_UID = { type: `${NS}::Api`, id: "shoal" };

/**
 * Decides requests with the Cedar policy set (the compiled file plus one
 * generated policy per role), pre-parsed once into the Cedar engine. Every
 * decision goes to the audit log with the ids of the policies that decided.
 */
export class Authorizer {
  readonly #policies: CompiledPolicies;
  readonly #policySetId = `shoal-${randomBytes(8).toString("hex")}`;
  readonly #audit: Logger;
  readonly #cacheSize: number;
  readonly #cache = new Map<string, AuthorizationDecision>();
  /** True when the policy set names no entity but roles and actions (see {@link AuthorizerOptions.cacheSize}). */
  #byRelation = false;

  constructor(options: AuthorizerOptions) {
    this.#policies = options.policies;
    // Audit lines have a fixed shape holding no secrets, so they replace the root's
    // wildcard redaction (which costs ~150 µs a line) with a cheap top-level one:
    // with it, logging would cap decisions at a few thousand per second.
    this.#audit = (options.logger ?? silentLogger).child(
      { component: "audit" },
      { redact: { paths: ["token", "password", "secret"], censor: "[redacted]" } },
    );
    this.#cacheSize = options.cacheSize ?? 10_000;
    this.setRoles(options.roles);
  }

  /** Replaces the role definitions (call when role records change); returns the names of malformed records skipped. */
  setRoles(roles: readonly RoleRecord[]): string[] {
    const { policies, skipped } = rolePolicies(roles);
    const all = { ...this.#policies.policies, ...policies };
    const validation = cedar.validate({ schema: this.#policies.schema, policies: { staticPolicies: all } });
    if (validation.type === "failure" || validation.validationErrors.length > 0) {
      throw new Error(`generated role policies do not validate: ${JSON.stringify(validation)}`);
    }
    const parsed = cedar.preparsePolicySet(this.#policySetId, { staticPolicies: all });
    if (parsed.type === "failure")
      throw new Error(`cedar refused the policy set: ${JSON.stringify(parsed.errors)}`);
    this.#cache.clear();
    this.#byRelation = !Object.values(all).some(namesSpecificEntity);
    if (skipped.length) this.#audit.error({ skipped }, "malformed role records ignored");
    return skipped;
  }

  /**
   * Decides `request` and writes the decision to the audit log, unless
   * `audit` is false: for filtering a listing, whose own decision (job:list)
   * is the one audited.
   */
  authorize(request: AuthorizationRequest, options: { audit?: boolean } = {}): AuthorizationDecision {
    const result = this.#cacheSize > 0 ? this.#decideCached(request) : this.#evaluate(request);
    if (options.audit === false) return result;
    const { principal, action, resource } = request;
    this.#audit.info(
      {
        principal: principal.id,
        roles: principal.roles,
        method: principal.method,
        action,
        resource: resource.type === "Api" ? "Api" : `${resource.type}::${resource.id}`,
        decision: result.decision,
        reasons: result.reasons,
        ...(result.errors.length ? { errors: result.errors } : {}),
      },
      "authorization decision",
    );
    return result;
  }

  /** {@link authorize}, throwing SHOAL_AUTH_DENIED (HTTP 403) unless allowed. */
  assertAllowed(request: AuthorizationRequest): AuthorizationDecision {
    const result = this.authorize(request);
    if (result.decision !== "allow") {
      throw new AuthError(
        AUTH_CODES.SHOAL_AUTH_DENIED,
        `${request.principal.id} may not ${request.action} ${request.resource.type === "Api" ? "on this API" : `${request.resource.type.toLowerCase()} ${request.resource.id}`}`,
        { fix: "ask an admin for a role that grants it (`shoal auth user add NAME --role R`)" },
      );
    }
    return result;
  }

  #decideCached(request: AuthorizationRequest): AuthorizationDecision {
    const canonical = this.#byRelation ? relationOf(request) : request;
    const key = cacheKey(canonical);
    const hit = this.#cache.get(key);
    if (hit) {
      this.#cache.delete(key); // keep the Map in least-recently-used order
      this.#cache.set(key, hit);
      return hit;
    }
    const result = this.#evaluate(canonical);
    // Errors name entities; for the caller's own ids, evaluate the real request and do not keep it.
    if (result.errors.length > 0) return canonical === request ? result : this.#evaluate(request);
    this.#cache.set(key, result);
    if (this.#cache.size > this.#cacheSize) this.#cache.delete(this.#cache.keys().next().value as string);
    return result;
  }

  #evaluate(request: AuthorizationRequest): AuthorizationDecision {
    const { principal, action, resource } = request;
    const principalUid =
      principal.kind === "anonymous"
        ? { type: `${NS}::Anonymous`, id: principal.id }
        : { type: `${NS}::User`, id: principal.id };
    const resourceUid =
      resource.type === "Api" ? API_UID : { type: `${NS}::${resource.type}`, id: resource.id };
    const context: cedar.Context = {};
    if (request.context?.sourceIp) context.sourceIp = { __extn: { fn: "ip", arg: request.context.sourceIp } };
    // The entities are built here from typed values, so their shape fits the
    // schema by construction; checking it again on every request would cost a
    // third of the throughput.
    const answer = cedar.statefulIsAuthorized({
      principal: principalUid,
      action: { type: `${NS}::Action`, id: action },
      resource: resourceUid,
      context,
      preparsedPolicySetId: this.#policySetId,
      entities: [principalEntity(principal, principalUid), resourceEntity(resource, resourceUid)],
    });
    if (answer.type === "failure") {
      return Object.freeze({ decision: "deny", reasons: [], errors: answer.errors.map((e) => e.message) });
    }
    return Object.freeze({
      decision: answer.response.decision,
      // Cedar lists them in hash order; sorted, equal decisions read alike in the audit log.
      reasons: Object.freeze([...answer.response.diagnostics.reason].sort()),
      errors: Object.freeze(
        answer.response.diagnostics.errors.map((e) => `${e.policyId}: ${e.error.message}`),
      ),
    });
  }
}

/** Entity types a policy may name without making decisions depend on specific ids of the request. */
const RELATION_SAFE_TYPES = new Set([`${NS}::Role`, `${NS}::Action`, `${NS}::Anonymous`, `${NS}::Api`]);

/** True when the policy (as Cedar JSON) names an entity of a type outside {@link RELATION_SAFE_TYPES}. */
function namesSpecificEntity(policyText: string): boolean {
  const json = cedar.policyToJson(policyText);
  if (json.type === "failure") return true;
  const walk = (v: unknown): boolean => {
    if (Array.isArray(v)) return v.some(walk);
    if (v === null || typeof v !== "object") return false;
    const o = v as Record<string, unknown>;
    if (typeof o.type === "string" && typeof o.id === "string" && !RELATION_SAFE_TYPES.has(o.type))
      return true;
    return Object.values(o).some(walk);
  };
  return walk(json.json);
}

/**
 * The request with every id replaced by a placeholder that keeps only the
 * equalities a policy can observe: owner = caller or not, resource namespace
 * = caller's namespace or not. Role names, method and context stay as they are.
 */
function relationOf(r: AuthorizationRequest): AuthorizationRequest {
  const p = r.principal;
  const self = p.kind === "anonymous" ? p.id : "p";
  const user = (id: string) => (p.kind !== "anonymous" && id === p.id ? self : "u");
  const ns = (id: string) => (id === p.namespace ? "n" : "m");
  const res = r.resource;
  const resource: Resource =
    res.type === "Job"
      ? { type: "Job", id: "r", owner: user(res.owner), namespace: ns(res.namespace) }
      : res.type === "Token"
        ? { type: "Token", id: "r", owner: user(res.owner) }
        : res.type === "Namespace"
          ? { type: "Namespace", id: ns(res.id) }
          : res.type === "Node"
            ? { type: "Node", id: "r" }
            : res;
  return {
    principal: { ...p, id: self, namespace: "n" },
    action: r.action,
    resource,
    ...(r.context ? { context: r.context } : {}),
  };
}

function cacheKey(r: AuthorizationRequest): string {
  const p = r.principal;
  const res = r.resource;
  return JSON.stringify([
    p.kind,
    p.id,
    p.roles,
    p.namespace,
    p.method,
    r.action,
    res.type,
    res.type === "Api" ? "" : res.id,
    res.type === "Job" || res.type === "Token" ? res.owner : "",
    res.type === "Job" ? res.namespace : "",
    r.context?.sourceIp ?? "",
  ]);
}

function principalEntity(p: Principal, uid: { type: string; id: string }): cedar.EntityJson {
  if (p.kind === "anonymous") return { uid, attrs: {}, parents: [] };
  return {
    uid,
    attrs: {
      namespace: { __entity: { type: `${NS}::Namespace`, id: p.namespace } },
      method: p.method,
      registered: p.kind === "user",
    },
    parents: p.roles.map((r) => ({ type: `${NS}::Role`, id: r })),
  };
}

function resourceEntity(r: Resource, uid: { type: string; id: string }): cedar.EntityJson {
  switch (r.type) {
    case "Job":
      return {
        uid,
        attrs: {
          owner: { __entity: { type: `${NS}::User`, id: r.owner } },
          namespace: { __entity: { type: `${NS}::Namespace`, id: r.namespace } },
        },
        parents: [],
      };
    case "Token":
      return { uid, attrs: { owner: { __entity: { type: `${NS}::User`, id: r.owner } } }, parents: [] };
    default:
      return { uid, attrs: {}, parents: [] };
  }
}
