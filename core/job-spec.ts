import { createHash } from "node:crypto";
import path from "node:path";
import { Kind, type Static, Type as T, type TSchema } from "@sinclair/typebox";
import { type TypeCheck, TypeCompiler } from "@sinclair/typebox/compiler";
import { type ValueError, ValueErrorType } from "@sinclair/typebox/errors";
import { Value } from "@sinclair/typebox/value";
import { parse as parseYaml, YAMLError } from "yaml";
import { nearestKey } from "./config-errors.js";
import { ConstraintSchema, constraintProblem } from "./job-spec-constraints.js";
import { JobSpecError, type JobSpecProblem } from "./job-spec-errors.js";
import {
  formatBytes,
  MAX_JOB_TIMEOUT_MS,
  MAX_TASK_CPU,
  MAX_TASK_MEMORY_BYTES,
  parseCpu,
  parseMemory,
  parseTimeoutMs,
} from "./job-spec-resources.js";
import { fitScalars, valueAt, writtenScalars } from "./yaml-scalars.js";

/**
 * Job specs: the schema users write (YAML or JSON, shaped like Bacalhau's),
 * its validation with errors that name the field path, and the normalized,
 * frozen {@link JobSpec} the rest of Shoal works with. Pure: no I/O here
 * (see job-spec-files.ts for reading a spec file and inlining its module).
 */

/** Where a job's inputs appear inside the sandbox. */
export const INPUTS_DIR = "/inputs";
/** Where a job writes what it wants returned; `ResultPaths` must lie under it. */
export const OUTPUTS_DIR = "/outputs";

/** Largest decoded inline input, each. @default 256 KiB */
export const DEFAULT_MAX_INLINE_INPUT_BYTES = 256 * 1024;
/** Largest sum of a job's decoded inline inputs. @default 512 KiB */
export const DEFAULT_MAX_INLINE_TOTAL_BYTES = 512 * 1024;
/** Largest WebAssembly module: inline (stored by the orchestrator apart from the job), or a node's local file. @default 8 MiB */
export const DEFAULT_MAX_MODULE_BYTES = 8 * 1024 * 1024;
/**
 * Largest validated job, as JSON, inline inputs (base64) included and each
 * inline module counted as the reference the orchestrator stores instead
 * (see {@link separateModules}): the orchestrator stores a job as one KV
 * value and sends it to a node in one signed envelope (base64url, a third
 * larger), and a NATS message carries at most 1 MiB. @default 640 KiB
 */
export const MAX_JOB_JSON_BYTES = 640 * 1024;
/** Largest spec document accepted as text. @default 16 MiB */
export const DEFAULT_MAX_SPEC_BYTES = 16 * 1024 * 1024;
/**
 * Most bytes of stdout, and of stderr, a node keeps of an execution and
 * streams as logs; the orchestrator stores no more of either. @default 1 MiB
 */
export const MAX_OUTPUT_STREAM_BYTES = 1024 * 1024;
/** Largest sum of an execution's result files, at the node and at the orchestrator. @default 256 MiB */
export const MAX_RESULT_TOTAL_BYTES = 256 * 1024 * 1024;
/** Most executions a batch job may ask for. */
export const MAX_JOB_COUNT = 1000;

/** A job label key (a regular expression, unanchored): letters, digits, '.', '_', '/', '-'. */
export const JOB_LABEL_KEY = "[A-Za-z0-9][A-Za-z0-9._/-]{0,252}";
/** The longest job label value. */
export const MAX_JOB_LABEL_VALUE = 256;
export const DEFAULT_NAMESPACE = "default";
export const DEFAULT_TASK_CPU = "100m";
export const DEFAULT_TASK_MEMORY = "64Mi";
/** Seconds an execution may run. @default 600 */
export const DEFAULT_EXECUTION_TIMEOUT_S = 600;
/** Seconds a job may wait for a node before it fails. @default 600 */
export const DEFAULT_QUEUE_TIMEOUT_S = 600;
export const DEFAULT_WASM_ENTRYPOINT = "_start";

/** Limits applied while validating; each defaults to its `DEFAULT_*` constant. */
export interface JobSpecLimits {
  /** @default DEFAULT_MAX_INLINE_INPUT_BYTES */
  maxInlineInputBytes: number;
  /** @default DEFAULT_MAX_INLINE_TOTAL_BYTES */
  maxInlineTotalBytes: number;
  /** @default DEFAULT_MAX_MODULE_BYTES */
  maxModuleBytes: number;
  /** @default DEFAULT_MAX_SPEC_BYTES */
  maxSpecBytes: number;
}

const DEFAULT_LIMITS: JobSpecLimits = {
  maxInlineInputBytes: DEFAULT_MAX_INLINE_INPUT_BYTES,
  maxInlineTotalBytes: DEFAULT_MAX_INLINE_TOTAL_BYTES,
  maxModuleBytes: DEFAULT_MAX_MODULE_BYTES,
  maxSpecBytes: DEFAULT_MAX_SPEC_BYTES,
};

/**
 * Environment variables that let a caller change how a native program loads
 * (glibc's list of variables it drops for setuid programs, plus every `LD_*`).
 * A job may not set them for the `exec` engine: `LD_PRELOAD=/inputs/x.so` on an
 * allow-listed `/bin/echo` would run arbitrary code.
 */
const UNSAFE_EXEC_ENV = new Set([
  "GCONV_PATH",
  "GETCONF_DIR",
  "HOSTALIASES",
  "LOCALDOMAIN",
  "LOCPATH",
  "MALLOC_TRACE",
  "NIS_PATH",
  "NLSPATH",
  "RESOLV_HOST_CONF",
  "RES_OPTIONS",
  "TMPDIR",
  "TZDIR",
]);

/** True for names a job may not set in an `exec` task's environment. */
export function isUnsafeExecEnvName(name: string): boolean {
  return name.startsWith("LD_") || UNSAFE_EXEC_ENV.has(name);
}

const NAME = T.String({
  pattern: "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
  "x-shoal-expect":
    "a name of letters, digits, '.', '_' or '-' (at most 128, starting with a letter or digit)",
});
const Obj = <P extends Record<string, TSchema>>(properties: P) =>
  T.Object(properties, { additionalProperties: false });
const EnvSchema = T.Record(
  T.String({ pattern: "^[A-Za-z_][A-Za-z0-9_]{0,127}$" }),
  T.String({ maxLength: 32_768 }),
  {
    "x-shoal-key": "an environment variable name (letters, digits and '_', not starting with a digit)",
    additionalProperties: false,
    maxProperties: 256,
  },
);
const ArgsSchema = T.Array(T.String({ maxLength: 32_768 }), { maxItems: 1024 });
const QUANTITY = (example: string) =>
  T.Union([T.String({ maxLength: 64 }), T.Number()], { "x-shoal-expect": `a quantity such as ${example}` });
const TIMEOUT = T.Union([T.Number(), T.String({ maxLength: 64 })], {
  "x-shoal-expect": 'a number of seconds or a duration such as "30s", "5m", "1h"',
});

export const SourceSchema = Obj({
  Type: T.Union(
    [T.Literal("inline"), T.Literal("localFile"), T.Literal("localDirectory"), T.Literal("stored")],
    {
      "x-shoal-noun": "source type",
    },
  ),
  Params: Obj({
    /** For `stored` (modules only): the module an orchestrator stores, by the SHA-256 of its bytes. */
    Digest: T.Optional(
      T.String({
        pattern: "^sha256:[0-9a-f]{64}$",
        "x-shoal-expect": '"sha256:" and 64 lower-case hex digits',
      }),
    ),
    /** The data itself, for `inline` (text, or base64 with `Encoding: base64`; modules are always base64). */
    Content: T.Optional(T.String()),
    /** @default "utf8" for inputs, "base64" for modules */
    Encoding: T.Optional(T.Union([T.Literal("utf8"), T.Literal("base64")], { "x-shoal-noun": "encoding" })),
    /** Absolute host path, for `localFile` and `localDirectory`; must be allow-listed by the node operator. */
    SourcePath: T.Optional(T.String({ minLength: 1, maxLength: 4096 })),
    /** Whether the job may change its copy of the input. @default false */
    ReadWrite: T.Optional(T.Boolean()),
  }),
});

export const InputSourceSchema = Obj({
  Alias: T.Optional(NAME),
  /** Absolute path inside the sandbox, under `/inputs`. */
  Target: T.String({ minLength: 1, maxLength: 4096 }),
  Source: SourceSchema,
});

export const ResultPathSchema = Obj({
  Name: NAME,
  /** `/outputs` or a path under it. */
  Path: T.String({ minLength: 1, maxLength: 4096 }),
});

export const WasmParamsSchema = Obj({
  /**
   * The module: `inline` (base64 bytes; the CLI inlines a `localFile` at
   * submit time, and the orchestrator stores it apart as `stored`), `stored`
   * (by digest, fetched by the node from the orchestrator) or an allow-listed
   * `localFile` on the node.
   */
  EntryModule: SourceSchema,
  /** Exported function to run. @default "_start" */
  Entrypoint: T.Optional(T.String({ minLength: 1, maxLength: 128, pattern: "^[^\\u0000-\\u001f]+$" })),
  /** Arguments (`argv[1..]`). */
  Parameters: T.Optional(ArgsSchema),
  /** Environment of the module, on top of the task's `Env`. */
  EnvironmentVariables: T.Optional(EnvSchema),
});

export const ExecParamsSchema = Obj({
  /** Absolute path of the program; the node must allow-list it (`Compute.Engines.Exec.Allow`). */
  Command: T.String({ minLength: 1, maxLength: 4096 }),
  Arguments: T.Optional(ArgsSchema),
});

const ENGINE_PARAMS = { wasm: WasmParamsSchema, exec: ExecParamsSchema } as const;
export type EngineType = keyof typeof ENGINE_PARAMS;
export const ENGINE_TYPES = Object.keys(ENGINE_PARAMS) as EngineType[];

export const TaskSchema = Obj({
  Name: NAME,
  Engine: Obj({
    Type: T.Union(
      ENGINE_TYPES.map((e) => T.Literal(e)),
      { "x-shoal-noun": "engine" },
    ),
    Params: T.Optional(T.Record(T.String(), T.Unknown())),
  }),
  Env: T.Optional(EnvSchema),
  InputSources: T.Optional(T.Array(InputSourceSchema, { maxItems: 64 })),
  ResultPaths: T.Optional(T.Array(ResultPathSchema, { maxItems: 64 })),
  Resources: T.Optional(
    Obj({ CPU: T.Optional(QUANTITY('"500m" or 2')), Memory: T.Optional(QUANTITY('"64Mi" or "1Gi"')) }),
  ),
  Timeouts: T.Optional(Obj({ ExecutionTimeout: T.Optional(TIMEOUT), QueueTimeout: T.Optional(TIMEOUT) })),
});

/** The job spec as users write it: every field with a default may be left out. */
export const JobSpecSchema = Obj({
  Name: NAME,
  Namespace: T.Optional(NAME),
  /** `batch`: run `Count` executions; `ops`: run once on every matching node. @default "batch" */
  Type: T.Optional(T.Union([T.Literal("batch"), T.Literal("ops")], { "x-shoal-noun": "job type" })),
  /** Executions to run, for `batch`. @default 1 */
  Count: T.Optional(T.Integer({ minimum: 1, maximum: MAX_JOB_COUNT })),
  /** Higher runs first when nodes are scarce. @default 0 */
  Priority: T.Optional(T.Integer({ minimum: 0, maximum: 100 })),
  /** Label selector on nodes; all must match. */
  Constraints: T.Optional(T.Array(ConstraintSchema, { maxItems: 64 })),
  Labels: T.Optional(
    T.Record(T.String({ pattern: `^${JOB_LABEL_KEY}$` }), T.String({ maxLength: MAX_JOB_LABEL_VALUE }), {
      "x-shoal-key": "a label key (letters, digits, '.', '_', '/', '-')",
      additionalProperties: false,
      maxProperties: 64,
    }),
  ),
  Meta: T.Optional(
    T.Record(T.String({ maxLength: 253 }), T.String({ maxLength: 4096 }), { maxProperties: 64 }),
  ),
  Tasks: T.Array(TaskSchema, {
    minItems: 1,
    maxItems: 1,
    "x-shoal-message": "a job has exactly one task for now",
  }),
});

export type JobSpecInput = Static<typeof JobSpecSchema>;
export type TaskInput = Static<typeof TaskSchema>;
export type Source = Static<typeof SourceSchema>;
export type InputSource = Static<typeof InputSourceSchema>;
export type ResultPath = Static<typeof ResultPathSchema>;
export type WasmParams = Required<Static<typeof WasmParamsSchema>>;
export type ExecParams = Required<Static<typeof ExecParamsSchema>>;
export type JobType = NonNullable<JobSpecInput["Type"]>;

type WithRequired<O, K extends keyof O> = Omit<O, K> & Required<Pick<O, K>>;

export type TaskEngine = { Type: "wasm"; Params: WasmParams } | { Type: "exec"; Params: ExecParams };

/** A validated task with its defaults filled in. */
export type Task = Omit<
  WithRequired<TaskInput, "Env" | "InputSources" | "ResultPaths" | "Resources" | "Timeouts">,
  "Engine" | "Resources" | "Timeouts"
> & {
  Engine: TaskEngine;
  Resources: Required<NonNullable<TaskInput["Resources"]>>;
  Timeouts: Required<NonNullable<TaskInput["Timeouts"]>>;
};

/** A validated, normalized and frozen job spec: what `parseJobSpec` returns. */
export type JobSpec = Omit<
  WithRequired<JobSpecInput, "Namespace" | "Type" | "Priority" | "Constraints" | "Labels" | "Meta">,
  "Tasks"
> & { Tasks: Task[] };

export interface ParseJobSpecOptions {
  /** How to read text input. YAML also reads JSON. @default "yaml" */
  format?: "yaml" | "json";
  limits?: Partial<JobSpecLimits>;
}

/**
 * Validates a job spec (YAML/JSON text, bytes, or an already-parsed object)
 * and returns it normalized (defaults filled in) and deep-frozen. Parsing the
 * result again gives an equal spec, so a node can re-validate what it receives.
 *
 * @throws JobSpecError (`SHOAL_JOB_INVALID`) naming the field path of the first
 * problem, with every problem found in `problems`.
 */
export function parseJobSpec(
  input: string | Uint8Array | object,
  options: ParseJobSpecOptions = {},
): JobSpec {
  const limits = { ...DEFAULT_LIMITS, ...options.limits };
  const raw =
    typeof input === "string" || input instanceof Uint8Array ? readJobSpecDocument(input, options) : input;
  const doc = fitSpecScalars(raw);
  const structural = schemaProblems(JobSpecSchema, doc, "");
  if (structural.length > 0) throw new JobSpecError(structural);
  const spec = doc as JobSpecInput;
  const problems: JobSpecProblem[] = [];
  const normalized = normalizeJob(spec, limits, problems);
  if (problems.length > 0) throw new JobSpecError(problems);
  const size = Buffer.byteLength(JSON.stringify(replaceInlineModules(normalized, () => DIGEST_PLACEHOLDER)));
  if (size > MAX_JOB_JSON_BYTES) {
    throw new JobSpecError([
      {
        field: "Tasks",
        message: `the job is ${formatBytes(size)} as JSON, inline inputs included; the limit is ${formatBytes(MAX_JOB_JSON_BYTES)} (one fabric message carries it): put large inputs on the nodes, under their Compute.Inputs.AllowedPaths, and name them by absolute localFile paths (docs/jobs.md)`,
      },
    ]);
  }
  return deepFreeze(normalized);
}

/** The digest of a module: `sha256:` and the hex SHA-256 of its bytes. */
export function moduleDigest(bytes: Uint8Array): string {
  return `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
}

const DIGEST_PLACEHOLDER = `sha256:${"0".repeat(64)}`;

/** `spec` with each task's inline module replaced by a `stored` source of the digest `digestOf` gives it. */
function replaceInlineModules(spec: JobSpec, digestOf: (source: Source) => string): JobSpec {
  return {
    ...spec,
    Tasks: spec.Tasks.map((task) =>
      task.Engine.Type === "wasm" && task.Engine.Params.EntryModule.Type === "inline"
        ? {
            ...task,
            Engine: {
              Type: "wasm",
              Params: {
                ...task.Engine.Params,
                EntryModule: { Type: "stored", Params: { Digest: digestOf(task.Engine.Params.EntryModule) } },
              },
            },
          }
        : task,
    ),
  };
}

/** The `stored` modules a validated spec names: each digest with the field that names it. */
export function storedModules(spec: JobSpec): { digest: string; field: string }[] {
  const out: { digest: string; field: string }[] = [];
  for (const [i, task] of spec.Tasks.entries()) {
    const source = task.Engine.Type === "wasm" ? task.Engine.Params.EntryModule : undefined;
    if (source?.Type === "stored" && source.Params.Digest) {
      out.push({
        digest: source.Params.Digest,
        field: `Tasks[${i}].Engine.Params.EntryModule.Params.Digest`,
      });
    }
  }
  return out;
}

/**
 * A validated spec as an orchestrator stores it: each inline module becomes a
 * `stored` source naming its digest, and its bytes are returned beside it (to
 * be stored once, whatever the number of jobs that run it). The job a node
 * receives then stays small however large its module is, and the node checks
 * the module it fetches against the digest its signed job names.
 */
export function separateModules(spec: JobSpec): { spec: JobSpec; modules: Map<string, Buffer> } {
  const modules = new Map<string, Buffer>();
  const stored = replaceInlineModules(spec, (source) => {
    const bytes = decodeInlineContent(source.Params, "base64");
    const digest = moduleDigest(bytes);
    modules.set(digest, bytes);
    return digest;
  });
  return { spec: deepFreeze(stored), modules };
}

/**
 * The document in job spec text (YAML or JSON), not yet validated.
 * @throws JobSpecError when it is too large, not parseable or not a mapping.
 */
export function readJobSpecDocument(input: string | Uint8Array, options: ParseJobSpecOptions = {}): object {
  const limits = { ...DEFAULT_LIMITS, ...options.limits };
  const size = typeof input === "string" ? Buffer.byteLength(input) : input.byteLength;
  if (size > limits.maxSpecBytes) {
    throw new JobSpecError([
      {
        field: "",
        message: `the spec is ${formatBytes(size)}; the limit is ${formatBytes(limits.maxSpecBytes)}`,
      },
    ]);
  }
  const text = typeof input === "string" ? input : Buffer.from(input).toString("utf8");
  try {
    const value = options.format === "json" ? JSON.parse(text) : parseYaml(text, { maxAliasCount: 100 });
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new JobSpecError([{ field: "", message: "a job spec must be a mapping with Name and Tasks" }]);
    }
    return options.format === "json" ? value : (fitSpecScalars(value, writtenScalars(text)) as object);
  } catch (err) {
    if (err instanceof JobSpecError) throw err;
    const where =
      err instanceof YAMLError && err.linePos
        ? ` at line ${err.linePos[0].line}, column ${err.linePos[0].col}`
        : "";
    const reason =
      err instanceof YAMLError
        ? err.message.split("\n")[0]!.replace(/ at line \d+, column \d+:?$/, "")
        : (err as Error).message;
    throw new JobSpecError(
      [{ field: "", message: `not valid ${options.format ?? "YAML"}${where}: ${reason}` }],
      {
        cause: err,
      },
    );
  }
}

/** Field path in the spec's own terms: `/Tasks/0/Engine/Type` → `Tasks[0].Engine.Type`. */
function fieldPath(prefix: string, pointer: string): string {
  let out = prefix;
  for (const part of pointer.split("/").slice(1)) {
    const key = part.replaceAll("~1", "/").replaceAll("~0", "~");
    if (/^[0-9]+$/.test(key)) out += `[${key}]`;
    else if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) out += out ? `.${key}` : key;
    else out += `[${JSON.stringify(key)}]`;
  }
  return out;
}

function describeValue(value: unknown): string {
  if (value === undefined) return "nothing";
  const text = JSON.stringify(value);
  return text.length > 60 ? `${text.slice(0, 57)}...` : text;
}

function translate(e: ValueError, prefix: string): JobSpecProblem {
  const field = fieldPath(prefix, e.path);
  const schema = e.schema as TSchema;
  switch (e.type) {
    case ValueErrorType.ObjectAdditionalProperties: {
      const key = e.path
        .slice(e.path.lastIndexOf("/") + 1)
        .replaceAll("~1", "/")
        .replaceAll("~0", "~");
      if (schema.patternProperties) {
        return {
          field,
          message: `invalid key ${JSON.stringify(key)}: expected ${schema["x-shoal-key"] ?? "a valid key"}`,
        };
      }
      const known = Object.keys(schema.properties ?? {});
      const near = nearestKey(key, known);
      return {
        field,
        message: `unknown field${near ? `; did you mean ${near}?` : ""} (expected one of ${known.join(", ")})`,
      };
    }
    case ValueErrorType.ObjectRequiredProperty:
      return { field, message: "is required" };
    case ValueErrorType.Union: {
      const options = (schema.anyOf as TSchema[]) ?? [];
      if (options.length > 0 && options.every((o) => o.const !== undefined)) {
        const names = options.map((o) => String(o.const));
        const expected = `${names.slice(0, -1).join(", ")} or ${names.at(-1)}`;
        return {
          field,
          message: `unknown ${schema["x-shoal-noun"] ?? "value"} ${describeValue(e.value)}; expected ${expected}`,
        };
      }
      return {
        field,
        message: `expected ${schema["x-shoal-expect"] ?? "another type"}, got ${describeValue(e.value)}`,
      };
    }
    default: {
      if (typeof schema["x-shoal-message"] === "string") return { field, message: schema["x-shoal-message"] };
      if (
        schema[Kind] === "String" &&
        typeof schema["x-shoal-expect"] === "string" &&
        typeof e.value === "string"
      ) {
        return { field, message: `expected ${schema["x-shoal-expect"]}, got ${describeValue(e.value)}` };
      }
      const text = e.message.charAt(0).toLowerCase() + e.message.slice(1);
      return { field, message: `${text}, got ${describeValue(e.value)}` };
    }
  }
}

/** Compiled checks of the schemas specs are validated against (a valid spec skips the error walk). */
const compiledChecks = new WeakMap<TSchema, TypeCheck<TSchema>>();

/** Every schema violation once per field, translated to spec terms. */
function schemaProblems(schema: TSchema, value: unknown, prefix: string): JobSpecProblem[] {
  let check = compiledChecks.get(schema);
  if (!check) {
    check = TypeCompiler.Compile(schema);
    compiledChecks.set(schema, check);
  }
  if (check.Check(value)) return [];
  const seen = new Set<string>();
  const out: JobSpecProblem[] = [];
  for (const e of Value.Errors(schema, value)) {
    const problem = translate(e, prefix);
    if (seen.has(problem.field)) continue;
    seen.add(problem.field);
    out.push(problem);
    if (out.length >= 20) break;
  }
  return out;
}

/**
 * The spec with the numbers and booleans of its string fields as strings
 * (fitScalars), engine parameters by their engine's schema. `written`: the
 * same YAML document's scalars as written (writtenScalars).
 */
function fitSpecScalars(raw: object, written?: unknown): unknown {
  const doc = fitScalars(JobSpecSchema, raw, written);
  const tasks = valueAt(doc, ["Tasks"]);
  if (!Array.isArray(tasks)) return doc;
  return {
    ...(doc as object),
    Tasks: tasks.map((task, i) => fitEngineParams(task, valueAt(written, ["Tasks", i, "Engine", "Params"]))),
  };
}

function fitEngineParams(task: unknown, written: unknown): unknown {
  const type = valueAt(task, ["Engine", "Type"]);
  const params = valueAt(task, ["Engine", "Params"]);
  if (typeof type !== "string" || !Object.hasOwn(ENGINE_PARAMS, type) || params === undefined) return task;
  const fitted = fitScalars(ENGINE_PARAMS[type as EngineType], params, written);
  const { Engine } = task as { Engine: object };
  return { ...(task as object), Engine: { ...Engine, Params: fitted } };
}

/** Base64 characters with at most two `=` at the end; with a length check, canonical base64. No group: a repeated group overflows the regex stack on megabytes. */
const BASE64_RE = /^[A-Za-z0-9+/]*={0,2}$/;

/** True when `bytes` start with the WebAssembly magic `\0asm` and binary version 1. */
export function isWasmModule(bytes: Uint8Array): boolean {
  return (
    bytes.length >= 8 &&
    bytes[0] === 0x00 &&
    bytes[1] === 0x61 &&
    bytes[2] === 0x73 &&
    bytes[3] === 0x6d &&
    bytes[4] === 0x01 &&
    bytes[5] === 0x00 &&
    bytes[6] === 0x00 &&
    bytes[7] === 0x00
  );
}

/**
 * The bytes of an `inline` source: base64 when `Encoding` is base64 (or
 * `defaultEncoding` says so), UTF-8 text otherwise. Whitespace in base64 is
 * ignored. Throws a RangeError for malformed base64.
 */
export function decodeInlineContent(
  params: Source["Params"],
  defaultEncoding: "utf8" | "base64" = "utf8",
): Buffer {
  const content = params.Content ?? "";
  if ((params.Encoding ?? defaultEncoding) === "utf8") return Buffer.from(content, "utf8");
  const compact = content.replace(/\s+/g, "");
  if (compact.length % 4 !== 0 || !BASE64_RE.test(compact)) throw new RangeError("not valid base64");
  return Buffer.from(compact, "base64");
}

function isUnder(p: string, root: string): boolean {
  return p === root || p.startsWith(`${root}/`);
}

/** A clean absolute sandbox path under `root` (no `..`, `.`, `//` or trailing `/`), or the reason it is not. */
function sandboxPathProblem(p: string, root: string): string | undefined {
  if (p.includes("\0")) return "contains a NUL byte";
  if (p.split("/").includes("..")) return `must not contain ".." (it would escape ${root})`;
  if (!p.startsWith("/")) return `must be an absolute path under ${root}`;
  if (path.posix.normalize(p) !== p || (p.length > 1 && p.endsWith("/"))) {
    return `must be a clean path such as ${path.posix.normalize(p).replace(/\/$/, "") || root}`;
  }
  if (!isUnder(p, root)) return `must be ${root} or a path under it`;
  return undefined;
}

function hostPathProblem(p: string): string | undefined {
  if (p.includes("\0")) return "contains a NUL byte";
  if (!path.isAbsolute(p)) return "must be an absolute path on the node";
  if (p.split("/").includes("..")) return 'must not contain ".."';
  return undefined;
}

function normalizeJob(spec: JobSpecInput, limits: JobSpecLimits, problems: JobSpecProblem[]): JobSpec {
  const type: JobType = spec.Type ?? "batch";
  if (type === "ops" && spec.Count !== undefined) {
    problems.push({ field: "Count", message: "ops jobs run once on every matching node; remove Count" });
  }
  (spec.Constraints ?? []).forEach((c, i) => {
    const problem = constraintProblem(c);
    if (problem) problems.push({ field: `Constraints[${i}].${problem.field}`, message: problem.message });
  });
  const inlineTotal = { bytes: 0 };
  const tasks = spec.Tasks.map((task, i) =>
    normalizeTask(task, `Tasks[${i}]`, limits, inlineTotal, problems),
  );
  if (inlineTotal.bytes > limits.maxInlineTotalBytes) {
    problems.push({
      field: "Tasks",
      message: `inline inputs add up to ${formatBytes(inlineTotal.bytes)}; the limit is ${formatBytes(limits.maxInlineTotalBytes)}`,
    });
  }
  return {
    Name: spec.Name,
    Namespace: spec.Namespace ?? DEFAULT_NAMESPACE,
    Type: type,
    ...(type === "batch" ? { Count: spec.Count ?? 1 } : {}),
    Priority: spec.Priority ?? 0,
    Constraints: spec.Constraints ?? [],
    Labels: spec.Labels ?? {},
    Meta: spec.Meta ?? {},
    Tasks: tasks,
  };
}

function normalizeTask(
  task: TaskInput,
  at: string,
  limits: JobSpecLimits,
  inlineTotal: { bytes: number },
  problems: JobSpecProblem[],
): Task {
  const engine = normalizeEngine(task, at, limits, problems);
  const env = task.Env ?? {};
  if (engine?.Type === "exec") {
    for (const name of Object.keys(env)) {
      if (isUnsafeExecEnvName(name)) {
        problems.push({
          field: fieldPath(`${at}.Env`, `/${name}`),
          message: "changes how native programs load; exec jobs may not set it",
        });
      }
    }
  }

  const targets = new Set<string>();
  const aliases = new Set<string>();
  (task.InputSources ?? []).forEach((input, i) => {
    const field = `${at}.InputSources[${i}]`;
    const targetProblem = sandboxPathProblem(input.Target, INPUTS_DIR);
    if (targetProblem) problems.push({ field: `${field}.Target`, message: targetProblem });
    else if (targets.has(input.Target)) problems.push({ field: `${field}.Target`, message: "used twice" });
    targets.add(input.Target);
    if (input.Alias !== undefined) {
      if (aliases.has(input.Alias)) problems.push({ field: `${field}.Alias`, message: "used twice" });
      aliases.add(input.Alias);
    }
    if (input.Source.Type === "inline" && input.Target === INPUTS_DIR) {
      problems.push({
        field: `${field}.Target`,
        message: `an inline input is a file: use a path under ${INPUTS_DIR}`,
      });
    }
    inlineTotal.bytes += sourceProblems(input.Source, `${field}.Source`, "input", limits, problems);
  });

  const names = new Set<string>();
  (task.ResultPaths ?? []).forEach((r, i) => {
    const problem = sandboxPathProblem(r.Path, OUTPUTS_DIR);
    if (problem) problems.push({ field: `${at}.ResultPaths[${i}].Path`, message: problem });
    if (names.has(r.Name)) problems.push({ field: `${at}.ResultPaths[${i}].Name`, message: "used twice" });
    names.add(r.Name);
  });

  const resources = {
    CPU: task.Resources?.CPU ?? DEFAULT_TASK_CPU,
    Memory: task.Resources?.Memory ?? DEFAULT_TASK_MEMORY,
  };
  checkQuantity(
    `${at}.Resources.CPU`,
    resources.CPU,
    parseCpu,
    MAX_TASK_CPU,
    `${MAX_TASK_CPU} CPUs`,
    problems,
  );
  checkQuantity(
    `${at}.Resources.Memory`,
    resources.Memory,
    parseMemory,
    MAX_TASK_MEMORY_BYTES,
    formatBytes(MAX_TASK_MEMORY_BYTES),
    problems,
  );

  const timeouts = {
    ExecutionTimeout: task.Timeouts?.ExecutionTimeout ?? DEFAULT_EXECUTION_TIMEOUT_S,
    QueueTimeout: task.Timeouts?.QueueTimeout ?? DEFAULT_QUEUE_TIMEOUT_S,
  };
  checkTimeout(`${at}.Timeouts.ExecutionTimeout`, timeouts.ExecutionTimeout, false, problems);
  checkTimeout(`${at}.Timeouts.QueueTimeout`, timeouts.QueueTimeout, true, problems);

  return {
    Name: task.Name,
    Engine: engine ?? (task.Engine as TaskEngine),
    Env: env,
    InputSources: task.InputSources ?? [],
    ResultPaths: task.ResultPaths ?? [],
    Resources: resources,
    Timeouts: timeouts,
  };
}

function normalizeEngine(
  task: TaskInput,
  at: string,
  limits: JobSpecLimits,
  problems: JobSpecProblem[],
): TaskEngine | undefined {
  const type = task.Engine.Type as EngineType;
  const field = `${at}.Engine.Params`;
  const params = task.Engine.Params ?? {};
  const schema = ENGINE_PARAMS[type];
  const structural = schemaProblems(schema, params, field);
  if (structural.length > 0) {
    for (const p of structural) {
      if (p.field === `${field}.EntryModule` && p.message === "is required") {
        problems.push({ field: p.field, message: "is required: the wasm engine needs a module to run" });
      } else problems.push(p);
    }
    return undefined;
  }
  if (type === "wasm") {
    const p = params as Static<typeof WasmParamsSchema>;
    const moduleField = `${field}.EntryModule`;
    if (p.EntryModule.Type === "localDirectory") {
      problems.push({
        field: `${moduleField}.Type`,
        message: "a module is one file: use inline, stored or localFile",
      });
    } else {
      sourceProblems(p.EntryModule, moduleField, "module", limits, problems);
    }
    return {
      Type: "wasm",
      Params: {
        EntryModule: p.EntryModule,
        Entrypoint: p.Entrypoint ?? DEFAULT_WASM_ENTRYPOINT,
        Parameters: p.Parameters ?? [],
        EnvironmentVariables: p.EnvironmentVariables ?? {},
      },
    };
  }
  const p = params as Static<typeof ExecParamsSchema>;
  const commandProblem = hostPathProblem(p.Command);
  if (commandProblem) problems.push({ field: `${field}.Command`, message: commandProblem });
  (p.Arguments ?? []).forEach((arg, i) => {
    if (arg.includes("\0"))
      problems.push({ field: `${field}.Arguments[${i}]`, message: "contains a NUL byte" });
  });
  return { Type: "exec", Params: { Command: p.Command, Arguments: p.Arguments ?? [] } };
}

/** Checks a source's params for its type; returns the decoded size of inline content (0 otherwise). */
function sourceProblems(
  source: Source,
  field: string,
  role: "input" | "module",
  limits: JobSpecLimits,
  problems: JobSpecProblem[],
): number {
  const params = source.Params;
  if (source.Type !== "stored" && params.Digest !== undefined) {
    problems.push({ field: `${field}.Params.Digest`, message: "only a stored module has a Digest" });
  }
  if (source.Type === "stored") {
    if (role === "input") {
      problems.push({
        field: `${field}.Type`,
        message: "only a module is stored by digest: an input is inline, localFile or localDirectory",
      });
    } else if (params.Digest === undefined) {
      problems.push({ field: `${field}.Params.Digest`, message: "is required for a stored module" });
    }
    for (const key of ["Content", "Encoding", "SourcePath", "ReadWrite"] as const) {
      if (params[key] !== undefined) {
        problems.push({
          field: `${field}.Params.${key}`,
          message: "a stored module carries only its Digest",
        });
      }
    }
    return 0;
  }
  if (source.Type !== "inline") {
    if (params.Content !== undefined || params.Encoding !== undefined) {
      problems.push({ field: `${field}.Params.Content`, message: `only inline sources carry Content` });
    }
    if (params.SourcePath === undefined) {
      problems.push({
        field: `${field}.Params.SourcePath`,
        message: `is required for a ${source.Type} source`,
      });
      return 0;
    }
    const problem = hostPathProblem(params.SourcePath);
    if (problem) problems.push({ field: `${field}.Params.SourcePath`, message: problem });
    return 0;
  }
  if (params.SourcePath !== undefined) {
    problems.push({
      field: `${field}.Params.SourcePath`,
      message: "an inline source carries Content, not SourcePath",
    });
  }
  if (params.Content === undefined) {
    problems.push({ field: `${field}.Params.Content`, message: "is required for an inline source" });
    return 0;
  }
  if (role === "module" && params.Encoding === "utf8") {
    problems.push({
      field: `${field}.Params.Encoding`,
      message: "a module is binary: its Content is base64",
    });
    return 0;
  }
  let bytes: Buffer;
  try {
    bytes = decodeInlineContent(params, role === "module" ? "base64" : "utf8");
  } catch (err) {
    problems.push({ field: `${field}.Params.Content`, message: (err as Error).message });
    return 0;
  }
  const cap = role === "module" ? limits.maxModuleBytes : limits.maxInlineInputBytes;
  if (bytes.length > cap) {
    problems.push({
      field: `${field}.Params.Content`,
      message: `is ${formatBytes(bytes.length)}; an inline ${role} may be at most ${formatBytes(cap)}`,
    });
  } else if (role === "module" && !isWasmModule(bytes)) {
    problems.push({
      field: `${field}.Params.Content`,
      message: "is not a WebAssembly module (it must start with \\0asm and binary version 1)",
    });
  }
  return role === "input" ? bytes.length : 0;
}

function checkQuantity(
  field: string,
  value: string | number,
  parse: (v: string | number) => number,
  max: number,
  maxText: string,
  problems: JobSpecProblem[],
): void {
  let n: number;
  try {
    n = parse(value);
  } catch (err) {
    problems.push({ field, message: (err as Error).message });
    return;
  }
  if (!(n > 0)) problems.push({ field, message: `must be more than zero, got ${describeValue(value)}` });
  else if (n > max)
    problems.push({ field, message: `${describeValue(value)} is more than the maximum of ${maxText}` });
}

function checkTimeout(
  field: string,
  value: string | number,
  zeroAllowed: boolean,
  problems: JobSpecProblem[],
): void {
  let ms: number;
  try {
    ms = parseTimeoutMs(value);
  } catch (err) {
    problems.push({ field, message: (err as Error).message });
    return;
  }
  if (ms < 0 || (!zeroAllowed && ms === 0)) {
    problems.push({ field, message: `must be ${zeroAllowed ? "zero or more" : "more than zero"}` });
  } else if (ms > MAX_JOB_TIMEOUT_MS) {
    problems.push({ field, message: `${describeValue(value)} is longer than the maximum of 7 days` });
  }
}

function deepFreeze<V>(value: V): V {
  if (value !== null && typeof value === "object" && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value)) deepFreeze(v);
  }
  return value;
}

/** CPU cores and memory bytes a task asks for. */
export function taskResources(task: Task): { cpu: number; memory: number } {
  return { cpu: parseCpu(task.Resources.CPU), memory: parseMemory(task.Resources.Memory) };
}

/** What one execution of the job needs on a node: the sum over its tasks. */
export function jobResources(spec: JobSpec): { cpu: number; memory: number } {
  let cpu = 0;
  let memory = 0;
  for (const task of spec.Tasks) {
    const r = taskResources(task);
    cpu += r.cpu;
    memory += r.memory;
  }
  return { cpu, memory };
}

/** How long an execution of the task may run, in ms. */
export function executionTimeoutMs(task: Task): number {
  return parseTimeoutMs(task.Timeouts.ExecutionTimeout);
}

/** How long the job may wait for a node, in ms (the longest of its tasks'); 0 means it fails at once. */
export function queueTimeoutMs(spec: JobSpec): number {
  return Math.max(0, ...spec.Tasks.map((t) => parseTimeoutMs(t.Timeouts.QueueTimeout)));
}

/** The engines a job needs a node to support. */
export function jobEngines(spec: JobSpec): EngineType[] {
  return [...new Set(spec.Tasks.map((t) => t.Engine.Type))];
}

/**
 * The spec of `shoal job run --wasm MODULE -- ARGS`: one batch task running
 * the module inline with the given arguments.
 */
export function wasmJobSpec(options: {
  name: string;
  module: Uint8Array;
  args?: readonly string[];
  env?: Readonly<Record<string, string>>;
}): JobSpec {
  return parseJobSpec({
    Name: options.name,
    Type: "batch",
    Tasks: [
      {
        Name: "main",
        Engine: {
          Type: "wasm",
          Params: {
            EntryModule: {
              Type: "inline",
              Params: { Content: Buffer.from(options.module).toString("base64"), Encoding: "base64" },
            },
            Parameters: [...(options.args ?? [])],
            EnvironmentVariables: { ...(options.env ?? {}) },
          },
        },
      },
    ],
  });
}
