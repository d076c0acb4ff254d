import { type Static, type TLiteral, type TUnion, Type } from "@sinclair/typebox";
import { Value } from "@sinclair/typebox/value";
import { parseDocument } from "yaml";
import { Authorizer } from "./authorizer.js";
import { AUTH_CODES, AuthError } from "./errors.js";
import type { CompiledPolicies } from "./policy.js";
import {
  ACTIONS,
  AUTH_METHODS,
  DEFAULT_NAMESPACE,
  type Principal,
  ROLE_SCOPES,
  type RoleRecord,
} from "./types.js";
import { BUILTIN_ROLES } from "./users.js";

const Str = Type.String({ minLength: 1 });
/** A union of string literals, typed as the union of its values. */
function Literals<const T extends readonly string[]>(values: T): TUnion<Array<TLiteral<T[number]>>> {
  return Type.Union(values.map((v) => Type.Literal(v))) as unknown as TUnion<Array<TLiteral<T[number]>>>;
}

const CaseSchema = Type.Object(
  {
    name: Type.Optional(Type.String()),
    principal: Type.Object(
      {
        id: Type.Optional(Str),
        kind: Type.Optional(Literals(["user", "client", "anonymous"] as const)),
        roles: Type.Optional(Type.Array(Str)),
        namespace: Type.Optional(Str),
        method: Type.Optional(Literals(AUTH_METHODS)),
      },
      { additionalProperties: false },
    ),
    action: Literals(ACTIONS),
    resource: Type.Union([
      Type.Object(
        { type: Type.Literal("Job"), id: Str, owner: Str, namespace: Str },
        { additionalProperties: false },
      ),
      Type.Object({ type: Type.Literal("Token"), id: Str, owner: Str }, { additionalProperties: false }),
      Type.Object(
        { type: Literals(["Node", "Namespace"] as const), id: Str },
        { additionalProperties: false },
      ),
      Type.Object({ type: Type.Literal("Api") }, { additionalProperties: false }),
    ]),
    context: Type.Optional(Type.Object({ sourceIp: Type.Optional(Str) }, { additionalProperties: false })),
    expected: Literals(["allow", "deny"] as const),
  },
  { additionalProperties: false },
);

const CasesFileSchema = Type.Object(
  {
    roles: Type.Optional(
      Type.Array(
        Type.Object(
          {
            name: Str,
            description: Type.Optional(Type.String()),
            actions: Type.Array(Type.Union([Literals(ACTIONS), Type.Literal("*")])),
            scope: Type.Optional(Literals(ROLE_SCOPES)),
          },
          { additionalProperties: false },
        ),
      ),
    ),
    cases: Type.Array(CaseSchema, { minItems: 1 }),
  },
  { additionalProperties: false },
);

export type PolicyCase = Static<typeof CaseSchema>;

export interface PolicyCases {
  /** Roles added to the built-in ones for these cases. */
  roles: RoleRecord[];
  cases: PolicyCase[];
}

export interface PolicyCaseResult {
  name: string;
  expected: "allow" | "deny";
  decision: "allow" | "deny";
  passed: boolean;
  reasons: readonly string[];
  errors: readonly string[];
}

/**
 * Parses a `shoal policy test` cases file (YAML): `cases:` (principal,
 * action, resource, context, expected) and optional custom `roles:`.
 */
export function parsePolicyCases(text: string, file: string): PolicyCases {
  const doc = parseDocument(text, { prettyErrors: true });
  if (doc.errors.length > 0) {
    throw new AuthError(AUTH_CODES.SHOAL_AUTH_POLICY_CASES, `${file}: ${doc.errors[0]!.message}`, {
      fix: "fix the YAML at the reported line",
    });
  }
  const data = doc.toJS() as unknown;
  if (!Value.Check(CasesFileSchema, data)) {
    const first = Value.Errors(CasesFileSchema, data).First();
    throw new AuthError(
      AUTH_CODES.SHOAL_AUTH_POLICY_CASES,
      `${file}: ${first ? `${first.path || "/"}: ${first.message}` : "not a cases file"}`,
      {
        fix: "each case needs principal, action, resource and expected (allow|deny); see docs/auth.md",
      },
    );
  }
  return {
    roles: (data.roles ?? []).map((r) => ({ description: "", ...r })),
    cases: data.cases,
  };
}

/** Decides every case with `policies` and the built-in plus the file's roles. */
export function runPolicyCases(policies: CompiledPolicies, cases: PolicyCases): PolicyCaseResult[] {
  const authorizer = new Authorizer({ policies, roles: [...BUILTIN_ROLES, ...cases.roles], cacheSize: 0 });
  return cases.cases.map((c, i) => {
    const kind = c.principal.kind ?? "user";
    const principal: Principal = {
      id: c.principal.id ?? (kind === "anonymous" ? "anonymous" : "user"),
      kind,
      roles: c.principal.roles ?? [],
      namespace: c.principal.namespace ?? DEFAULT_NAMESPACE,
      method:
        c.principal.method ??
        (kind === "anonymous" ? "anonymous" : kind === "client" ? "clientKey" : "password"),
    };
    const result = authorizer.authorize({
      principal,
      action: c.action,
      resource: c.resource,
      ...(c.context ? { context: c.context } : {}),
    });
    return {
      name: c.name ?? `case ${i + 1}`,
      expected: c.expected,
      decision: result.decision,
      passed: result.decision === c.expected,
      reasons: result.reasons,
      errors: result.errors,
    };
  });
}
