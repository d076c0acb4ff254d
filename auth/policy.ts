import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as cedar from "@cedar-policy/cedar-wasm/nodejs";
import { readFileChecked } from "../core/index.js";
import { AUTH_CODES, type AuthCode, PolicyFileError, type PolicyProblem } from "./errors.js";

/** A Cedar policy set that parsed and validated against the schema. */
export interface CompiledPolicies {
  /** Where the policies came from (for messages). */
  file: string;
  /** Policy id (its `@id`, or `<file>:<line>`) → policy text. */
  policies: Readonly<Record<string, string>>;
  /** Policy ids in file order. */
  ids: readonly string[];
  schema: string;
  /** Validator warnings; the set is usable. */
  warnings: readonly PolicyProblem[];
}

/** The directory holding the default schema and policy set (`configs/policies` of the package). */
export function defaultPolicyDir(): string {
  // Walk up from this module: it runs from auth/ (sources) and from dist/auth/ (built).
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = path.join(dir, "configs", "policies");
    if (existsSync(path.join(candidate, "shoal.cedarschema"))) return candidate;
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error("configs/policies/shoal.cedarschema not found above the auth module");
    dir = parent;
  }
}

export const DEFAULT_SCHEMA_FILE = "shoal.cedarschema";
export const DEFAULT_POLICY_FILE = "default.cedar";

/**
 * Reads and compiles a policy set: `policyPath` (`API.Auth.AccessPolicyPath`)
 * or the default set, against `schemaPath` or the default schema. A bad file
 * throws a {@link PolicyFileError} whose problems carry file:line:column.
 */
export async function loadPolicies(
  options: { policyPath?: string; schemaPath?: string } = {},
): Promise<CompiledPolicies> {
  const policyFile = options.policyPath || path.join(defaultPolicyDir(), DEFAULT_POLICY_FILE);
  const schemaFile = options.schemaPath || path.join(defaultPolicyDir(), DEFAULT_SCHEMA_FILE);
  const [policyText, schemaText] = await Promise.all([
    readFileChecked(policyFile),
    readFileChecked(schemaFile),
  ]);
  return compilePolicies(
    { file: policyFile, text: policyText.toString("utf8") },
    { file: schemaFile, text: schemaText.toString("utf8") },
  );
}

/** Parses `policy`, gives each policy its id, and validates the set against `schema` (strict mode). Pure. */
export function compilePolicies(
  policy: { file: string; text: string },
  schema: { file: string; text: string },
): CompiledPolicies {
  const schemaCheck = cedar.checkParseSchema(schema.text);
  if (schemaCheck.type === "failure") {
    throw fileError(AUTH_CODES.SHOAL_AUTH_SCHEMA_INVALID, schema, schemaCheck.errors);
  }
  const parts = cedar.policySetTextToParts(policy.text);
  if (parts.type === "failure") throw fileError(AUTH_CODES.SHOAL_AUTH_POLICY_SYNTAX, policy, parts.errors);
  if (parts.policy_templates.length > 0) {
    throw new PolicyFileError(AUTH_CODES.SHOAL_AUTH_POLICY_SYNTAX, policy.file, [
      {
        file: policy.file,
        message: "policy templates (?principal, ?resource) are not supported; write static policies",
      },
    ]);
  }
  const { policies, ids, cedarIds } = namePolicies(policy, parts.policies);

  const validation = cedar.validate({ schema: schema.text, policies: { staticPolicies: policy.text } });
  if (validation.type === "failure")
    throw fileError(AUTH_CODES.SHOAL_AUTH_POLICY_SCHEMA, policy, validation.errors);
  if (validation.validationErrors.length > 0) {
    throw new PolicyFileError(
      AUTH_CODES.SHOAL_AUTH_POLICY_SCHEMA,
      policy.file,
      validation.validationErrors.map((e) => problem(policy, e.error, cedarIds.get(e.policyId))),
    );
  }
  const warnings = [
    ...validation.validationWarnings.map((w) => problem(policy, w.error, cedarIds.get(w.policyId))),
    ...validation.otherWarnings.map((w) => problem(policy, w)),
  ];
  return Object.freeze({ file: policy.file, policies, ids, schema: schema.text, warnings });
}

/**
 * Cedar names policies `policy0`, `policy1`… in file order, and
 * `policySetTextToParts` returns their source text sorted by that id as a
 * string. Undo the sort to find each policy's offset, then name it by its
 * `@id` annotation (or `<file>:<line>`) so that decisions give readable reasons.
 */
function namePolicies(source: { file: string; text: string }, texts: string[]) {
  const cedarOrder = texts.map((_, i) => `policy${i}`).sort();
  const byIndex: string[] = [];
  cedarOrder.forEach((id, k) => {
    byIndex[Number(id.slice("policy".length))] = texts[k]!;
  });
  const policies: Record<string, string> = {};
  const ids: string[] = [];
  const cedarIds = new Map<string, string>();
  const offsets = new Map<string, number>();
  let from = 0;
  byIndex.forEach((text, i) => {
    const at = source.text.indexOf(text, from);
    if (at < 0) throw new Error(`cannot locate policy${i} in ${source.file}`);
    from = at + text.length;
    const { line } = lineColumn(source.text, at);
    const json = cedar.policyToJson(text);
    const annotated = json.type === "success" ? json.json.annotations?.id : undefined;
    const id = annotated ?? `${path.basename(source.file)}:${line}`;
    if (annotated?.startsWith("role:")) {
      throw new PolicyFileError(AUTH_CODES.SHOAL_AUTH_POLICY_DUPLICATE_ID, source.file, [
        {
          file: source.file,
          ...lineColumn(source.text, at),
          policyId: id,
          message: `@id("${id}") is reserved: role:<name> ids belong to the policies generated from role records`,
          help: "choose an id that does not start with role:",
        },
      ]);
    }
    if (Object.hasOwn(policies, id)) {
      const first = lineColumn(source.text, offsets.get(id)!);
      throw new PolicyFileError(AUTH_CODES.SHOAL_AUTH_POLICY_DUPLICATE_ID, source.file, [
        {
          file: source.file,
          ...lineColumn(source.text, at),
          policyId: id,
          message: `@id("${id}") is already used at line ${first.line}`,
          help: "give each policy its own @id",
        },
      ]);
    }
    policies[id] = text;
    ids.push(id);
    offsets.set(id, at);
    cedarIds.set(`policy${i}`, id);
  });
  return { policies: Object.freeze(policies), ids: Object.freeze(ids), cedarIds };
}

function fileError(code: AuthCode, source: { file: string; text: string }, errors: cedar.DetailedError[]) {
  return new PolicyFileError(
    code,
    source.file,
    errors.map((e) => problem(source, e)),
  );
}

function problem(
  source: { file: string; text: string },
  e: cedar.DetailedError,
  policyId?: string,
): PolicyProblem {
  const loc = e.sourceLocations?.[0] ?? e.related?.flatMap((r) => r.sourceLocations ?? [])[0];
  const label = loc?.label ? `: ${loc.label}` : "";
  return {
    file: source.file,
    ...(loc ? lineColumn(source.text, byteToCharOffset(source.text, loc.start)) : {}),
    ...(policyId ? { policyId } : {}),
    message: `${e.message}${label}`,
    ...(e.help ? { help: e.help } : {}),
  };
}

/** Cedar reports UTF-8 byte offsets; JavaScript strings index UTF-16 code units. */
function byteToCharOffset(text: string, byteOffset: number): number {
  return Buffer.from(text, "utf8").subarray(0, byteOffset).toString("utf8").length;
}

/** 1-based line and column of a character offset. */
export function lineColumn(text: string, offset: number): { line: number; column: number } {
  let line = 1;
  let lineStart = 0;
  for (let i = 0; i < offset && i < text.length; i++) {
    if (text.charCodeAt(i) === 10) {
      line++;
      lineStart = i + 1;
    }
  }
  return { line, column: offset - lineStart + 1 };
}
