import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { Kind, type TObject, type TSchema } from "@sinclair/typebox";
import { TypeCompiler } from "@sinclair/typebox/compiler";
import { Value } from "@sinclair/typebox/value";
import { Document, isMap, isScalar, LineCounter, parseDocument, YAMLMap, type Node as YamlNode } from "yaml";
import {
  ConfigFileError,
  ConfigInvalidError,
  type ConfigSource,
  ConfigUnknownKeyError,
  nearestKey,
} from "./config-errors.js";
import { ConfigSchema, type ShoalConfig } from "./config-schema.js";
import { coerceConfigString, describeExpectation, parseDuration } from "./config-values.js";
import { writeFileAtomic } from "./files.js";
import { nodeLabelsProblem } from "./node-labels.js";
import { fitScalars, valueAt, writtenScalars } from "./yaml-scalars.js";

export * from "./config-errors.js";
export { ConfigSchema, type ShoalConfig } from "./config-schema.js";
export { formatConfigValue, parseByteSize, parseDuration } from "./config-values.js";

/** One key path of the schema: a section (`API.TLS`) or a leaf (`API.TLS.CertFile`). */
interface ConfigKey {
  readonly path: string;
  readonly segments: readonly string[];
  readonly schema: TSchema;
  readonly section: boolean;
  /** A leaf whose value is a map (`Compute.Labels`); `-c Compute.Labels.zone=eu` sets one entry. */
  readonly map: boolean;
  /** `SHOAL_` + the path upper-cased with dots as `_`. */
  readonly envName: string;
}

const KEYS = new Map<string, ConfigKey>();
const LEAVES: ConfigKey[] = [];
const ENV_KEYS = new Map<string, ConfigKey>();

(function index(schema: TObject, prefix: string[]) {
  for (const [name, child] of Object.entries(schema.properties)) {
    const segments = [...prefix, name];
    const section = child[Kind] === "Object";
    const key: ConfigKey = {
      path: segments.join("."),
      segments,
      schema: child,
      section,
      map: child[Kind] === "Record",
      envName: `SHOAL_${segments.join("_").toUpperCase()}`,
    };
    KEYS.set(key.path, key);
    if (section) {
      index(child as TObject, segments);
    } else {
      if (ENV_KEYS.has(key.envName)) throw new Error(`config keys share the env name ${key.envName}`);
      LEAVES.push(key);
      ENV_KEYS.set(key.envName, key);
    }
  }
})(ConfigSchema, []);

const VALIDATOR = TypeCompiler.Compile(ConfigSchema);

/**
 * `SHOAL_*` environment variables that are not config keys (secrets and client
 * settings that must not live in a config file). They are ignored by the
 * config loader; any other unknown `SHOAL_*` variable is an error, because a
 * misspelt setting that silently does nothing is worse than a refusal.
 */
export const NON_CONFIG_ENV: ReadonlySet<string> = new Set([
  "SHOAL_CONFIG",
  "SHOAL_API",
  "SHOAL_TOKEN",
  "SHOAL_TOKEN_FILE",
  "SHOAL_PASSWORD",
  "SHOAL_ADMIN_PASSWORD",
  "SHOAL_CA_PASSPHRASE",
  "SHOAL_SHARED_SECRET",
  "SHOAL_JOIN_TOKEN",
  "SHOAL_CA_FINGERPRINT",
  "SHOAL_USER",
]);

/** Every leaf key path, in schema order (e.g. `API.TLS.CertFile`). */
export function configKeys(): string[] {
  return LEAVES.map((k) => k.path);
}

/** The environment variable that sets a leaf key, e.g. `SHOAL_ORCHESTRATOR_TLS_SERVERCERT`. */
export function configEnvName(keyPath: string): string {
  const { key } = resolveKey(keyPath, "argument");
  return key.envName;
}

/** A value that may be set: a key and, for map keys, one entry of the map. */
interface Assignment {
  key: ConfigKey;
  entry?: string;
  value: unknown;
  source: ConfigSource;
}

export interface LoadConfigOptions {
  /** YAML config file; a missing or unreadable file is a SHOAL_CONFIG_FILE error. */
  file?: string;
  /** Where `SHOAL_*` variables are read from; empty values count as unset. @default process.env */
  env?: NodeJS.ProcessEnv;
  /** `Key=Value` strings from `-c`, applied in order. */
  overrides?: string[];
  /** Values from command-line flags, by key path; undefined entries are skipped. Strings are coerced. */
  flags?: Record<string, unknown>;
}

export interface ResolvedConfig {
  config: ShoalConfig;
  /** Where each key that is not at its default was set (`file:line`, `env NAME`, `-c K=V`, `flag K`). */
  sources: ReadonlyMap<string, ConfigSource>;
}

/**
 * Loads the configuration: defaults, then the YAML file, then `SHOAL_*`
 * environment variables, then `-c Key=Value` overrides, then flags. The result
 * is validated against {@link ConfigSchema} (unknown keys, wrong types, keys that
 * must be set together) and deep-frozen. Errors are ConfigError subclasses that
 * name the key path, where the value came from and the nearest valid key.
 */
export async function loadConfig(options: LoadConfigOptions = {}): Promise<ShoalConfig> {
  return (await resolveConfig(options)).config;
}

/** Like {@link loadConfig}, also telling where each value came from (for `shoal config list`). */
export async function resolveConfig(options: LoadConfigOptions = {}): Promise<ResolvedConfig> {
  const assignments: Assignment[] = [];
  if (options.file !== undefined) {
    const { doc, lines, written } = await readConfigDocument(options.file, false);
    assignments.push(...documentAssignments(options.file, doc, lines, written));
  }
  assignments.push(...envAssignments(options.env ?? process.env));
  for (const override of options.overrides ?? []) assignments.push(overrideAssignment(override));
  for (const [keyPath, value] of Object.entries(options.flags ?? {})) {
    if (value === undefined) continue;
    const source = `flag ${keyPath}`;
    const { key, entry } = resolveKey(keyPath, source);
    assignments.push({
      key,
      entry,
      value: typeof value === "string" ? coerce(key, entry, value) : value,
      source,
    });
  }
  return build(assignments);
}

/** The configuration with every key at its default (no file, env or overrides), frozen. */
export function defaultConfig(): ShoalConfig {
  return build([]).config;
}

/**
 * The value at a key path: a leaf (`API.Port`), a section (`API.TLS`) or one
 * entry of a map key (`Compute.Labels.zone`, undefined when absent).
 */
export function getConfigValue(config: ShoalConfig, keyPath: string): unknown {
  const { key, entry } = resolveKey(keyPath, "argument", true);
  const value = getIn(config, key.segments);
  return entry === undefined ? value : (value as Record<string, unknown>)[entry];
}

/**
 * The configuration as a YAML config file, each key preceded by its
 * description as a comment (what `shoal config default` prints).
 */
export function configToYaml(config: ShoalConfig): string {
  const doc = new Document(config);
  const describe = (map: unknown, prefix: string[]) => {
    if (!isMap(map)) return;
    for (const pair of map.items) {
      if (!isScalar(pair.key)) continue;
      const key = KEYS.get([...prefix, String(pair.key.value)].join("."));
      if (!key) continue;
      pair.key.commentBefore = ` ${key.schema.description}`;
      if (key.section) describe(pair.value, key.segments as string[]);
    }
  };
  describe(doc.contents, []);
  return doc.toString();
}

/**
 * Sets one key in a YAML config file, as `shoal config set` does: checks the key
 * and value (and that the file as a whole stays valid), keeps the file's
 * comments and layout, and replaces the file atomically. Creates the file (0600,
 * in a 0700 directory) when it does not exist.
 */
export async function setConfigFileValue(file: string, keyPath: string, raw: string): Promise<void> {
  const source = `config set ${keyPath}`;
  const { key, entry } = resolveKey(keyPath, source);
  const value = coerce(key, entry, raw);
  const { doc, lines, mode, written } = await readConfigDocument(file, true);
  build([...documentAssignments(file, doc, lines, written), { key, entry, value, source }]);

  const target = entry === undefined ? [...key.segments] : [...key.segments, entry];
  if (doc.contents === null || (isScalar(doc.contents) && doc.contents.value === null))
    doc.contents = new YAMLMap();
  for (let i = 1; i < target.length; i++) {
    // `Compute:` with nothing under it holds no map that setIn could descend into.
    if (!isMap(doc.getIn(target.slice(0, i), true))) doc.setIn(target.slice(0, i), new YAMLMap());
  }
  doc.setIn(target, value);
  await fs.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
  await writeFileAtomic(file, doc.toString(), mode ?? 0o600);
}

function resolveKey(
  keyPath: string,
  source: ConfigSource,
  allowSection = false,
): { key: ConfigKey; entry?: string } {
  const key = KEYS.get(keyPath);
  if (key && (allowSection || !key.section)) return { key };
  if (key) {
    const children = [...KEYS.values()].filter((k) => !k.section && k.path.startsWith(`${keyPath}.`));
    throw new ConfigInvalidError(
      keyPath,
      `${keyPath} is a section; set one of its keys: ${children.map((k) => k.path).join(", ")}`,
      source,
    );
  }
  // A map entry's name may itself hold dots (`Compute.Labels.kubernetes.io/arch`).
  const map = LEAVES.find(
    (k) => k.map && keyPath.startsWith(`${k.path}.`) && keyPath.length > k.path.length + 1,
  );
  if (map) return { key: map, entry: keyPath.slice(map.path.length + 1) };
  throw new ConfigUnknownKeyError(keyPath, source, nearestKey(keyPath, KEYS.keys()));
}

function coerce(key: ConfigKey, entry: string | undefined, raw: string): unknown {
  return entry === undefined ? coerceConfigString(key.schema, raw) : raw;
}

function overrideAssignment(override: string): Assignment {
  const source = `-c ${override}`;
  const eq = override.indexOf("=");
  if (eq <= 0) {
    throw new ConfigInvalidError(override, `-c takes Key=Value, got ${JSON.stringify(override)}`, undefined);
  }
  const { key, entry } = resolveKey(override.slice(0, eq).trim(), source);
  return { key, entry, value: coerce(key, entry, override.slice(eq + 1)), source };
}

function envAssignments(env: NodeJS.ProcessEnv): Assignment[] {
  const out: Assignment[] = [];
  for (const [name, raw] of Object.entries(env)) {
    if (!name.startsWith("SHOAL_") || raw === undefined || raw === "" || NON_CONFIG_ENV.has(name)) continue;
    const key = ENV_KEYS.get(name);
    if (!key) {
      throw new ConfigUnknownKeyError(
        name,
        "environment",
        nearestKey(name, [...ENV_KEYS.keys(), ...NON_CONFIG_ENV]),
      );
    }
    out.push({ key, value: coerceConfigString(key.schema, raw), source: `env ${name}` });
  }
  return out;
}

async function readConfigDocument(
  file: string,
  mayBeMissing: boolean,
): Promise<{ doc: Document; lines: LineCounter; mode?: number; written: unknown }> {
  let text = "";
  let mode: number | undefined;
  try {
    text = await fs.readFile(file, "utf8");
    mode = (await fs.stat(file)).mode & 0o777;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (!(mayBeMissing && code === "ENOENT")) {
      throw new ConfigFileError(file, `cannot read the config file: ${code ?? String(err)}`, undefined, {
        cause: err,
      });
    }
  }
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: true, uniqueKeys: true });
  const problem = doc.errors[0];
  if (problem) {
    throw new ConfigFileError(
      file,
      `not valid YAML: ${problem.message.split("\n")[0]}`,
      problem.linePos?.[0].line,
      {
        cause: problem,
      },
    );
  }
  return { doc, lines, mode, written: writtenScalars(text) };
}

/**
 * Turns a parsed config file into assignments, checking every key name against
 * the schema. `written`: the file's scalars as written (writtenScalars).
 */
function documentAssignments(
  file: string,
  doc: Document,
  lines: LineCounter,
  written: unknown,
): Assignment[] {
  const out: Assignment[] = [];
  const lineOf = (node: unknown) => {
    const range = (node as YamlNode | null)?.range;
    return range ? lines.linePos(range[0]).line : undefined;
  };
  const sourceOf = (node: unknown) => {
    const line = lineOf(node);
    return line === undefined ? file : `${file}:${line}`;
  };
  const walk = (node: unknown, prefix: string[]) => {
    if (node === null || node === undefined || (isScalar(node) && node.value === null)) return;
    if (!isMap(node)) {
      const where = prefix.length === 0 ? "the top level" : prefix.join(".");
      if (prefix.length === 0)
        throw new ConfigFileError(file, "the top level must be a map of keys", lineOf(node));
      throw new ConfigInvalidError(where, `${where} is a section and must be a map of keys`, sourceOf(node));
    }
    for (const pair of node.items) {
      const name = isScalar(pair.key) ? String(pair.key.value) : String(pair.key);
      const keyPath = [...prefix, name].join(".");
      const key = KEYS.get(keyPath);
      if (!key)
        throw new ConfigUnknownKeyError(keyPath, sourceOf(pair.key), nearestKey(keyPath, KEYS.keys()));
      if (key.section) {
        walk(pair.value, [...prefix, name]);
        continue;
      }
      const value = (pair.value as YamlNode | null)?.toJS(doc) ?? null;
      if (value === null) continue;
      const text = valueAt(written, [...prefix, name]);
      out.push({ key, value: fitScalars(key.schema, value, text), source: sourceOf(pair.key) });
    }
  };
  walk(doc.contents, []);
  return out;
}

/** Applies assignments over the defaults, validates, expands `~` in paths and freezes. */
function build(assignments: Assignment[]): ResolvedConfig {
  const raw: Record<string, unknown> = {};
  const sources = new Map<string, ConfigSource>();
  for (const { key, entry, value, source } of assignments) {
    if (entry === undefined) {
      setIn(raw, key.segments, structuredClone(value));
      for (const p of sources.keys()) if (p.startsWith(`${key.path}.`)) sources.delete(p);
      sources.set(key.path, source);
    } else {
      let map = getIn(raw, key.segments);
      if (map === null || typeof map !== "object" || Array.isArray(map)) {
        map = {};
        setIn(raw, key.segments, map);
      }
      (map as Record<string, unknown>)[entry] = value;
      sources.set(`${key.path}.${entry}`, source);
    }
  }
  const config = Value.Default(ConfigSchema, raw) as ShoalConfig;
  checkLabels(config, sources);
  const problem = VALIDATOR.Errors(config).First();
  if (problem) {
    const segments = problem.path
      .split("/")
      .slice(1)
      .map((s) => s.replaceAll("~1", "/").replaceAll("~0", "~"));
    let leaf = LEAVES.find((k) => k.path === segments.join("."));
    let rest: string[] = [];
    for (let i = segments.length - 1; !leaf && i > 0; i--) {
      leaf = LEAVES.find((k) => k.path === segments.slice(0, i).join("."));
      rest = segments.slice(i);
    }
    const keyPath = leaf?.path ?? segments.join(".");
    const shown = keyPath + rest.map((s) => (leaf?.map ? `.${s}` : `[${s}]`)).join("");
    throw new ConfigInvalidError(
      keyPath,
      `${shown} must be ${describeExpectation(problem.schema)}, got ${JSON.stringify(problem.value)}`,
      sources.get(shown) ?? sources.get(keyPath),
    );
  }
  checkCombinations(config, sources);
  for (const key of LEAVES) {
    const value = getIn(config, key.segments);
    if (key.schema["x-shoal"] === "path" && typeof value === "string" && /^~(?:\/|$)/.test(value)) {
      setIn(config, key.segments, path.join(os.homedir(), value.slice(1)));
    }
  }
  return { config: deepFreeze(config), sources };
}

/**
 * Compute.Labels as an orchestrator accepts them, refused with the reason
 * (the schema's own message could only say "a map of names to strings").
 * Values that are not strings are left to the schema check, which names them.
 */
function checkLabels(config: ShoalConfig, sources: ReadonlyMap<string, ConfigSource>): void {
  const labels: unknown = config.Compute?.Labels;
  if (labels === null || typeof labels !== "object") return;
  if (Object.values(labels).some((v) => typeof v !== "string")) return;
  const problem = nodeLabelsProblem(labels as Record<string, string>);
  if (problem) {
    const source = [...sources].find(([p]) => p === "Compute.Labels" || p.startsWith("Compute.Labels."));
    throw new ConfigInvalidError("Compute.Labels", `Compute.Labels: ${problem}`, source?.[1]);
  }
}

/** Keys that only make sense together, or not together. */
const TOGETHER: readonly (readonly string[])[] = [
  ["API.TLS.CertFile", "API.TLS.KeyFile"],
  ["Orchestrator.TLS.CACert", "Orchestrator.TLS.ServerCert", "Orchestrator.TLS.ServerKey"],
  ["Compute.TLS.ClientCert", "Compute.TLS.ClientKey"],
];

function checkCombinations(config: ShoalConfig, sources: ReadonlyMap<string, ConfigSource>): void {
  const isSet = (keyPath: string) => getIn(config, keyPath.split(".")) !== "";
  for (const group of TOGETHER) {
    const set = group.filter(isSet);
    const missing = group.find((k) => !isSet(k));
    if (set.length > 0 && missing !== undefined) {
      throw new ConfigInvalidError(
        missing,
        `${missing} must be set together with ${set.join(" and ")}`,
        sources.get(set[0]!),
      );
    }
  }
  if (isSet("API.TLS.AutoCert") && isSet("API.TLS.CertFile")) {
    throw new ConfigInvalidError(
      "API.TLS.AutoCert",
      "API.TLS.AutoCert and API.TLS.CertFile cannot both be set: choose ACME or your own certificate",
      sources.get("API.TLS.AutoCert"),
    );
  }
  if (parseDuration(config.PKI.RenewBefore) >= parseDuration(config.PKI.CertTTL)) {
    throw new ConfigInvalidError(
      "PKI.RenewBefore",
      `PKI.RenewBefore (${config.PKI.RenewBefore}) must be shorter than PKI.CertTTL (${config.PKI.CertTTL})`,
      sources.get("PKI.RenewBefore") ?? sources.get("PKI.CertTTL"),
    );
  }
}

function getIn(obj: unknown, segments: readonly string[]): unknown {
  let cur = obj;
  for (const s of segments) {
    if (cur === null || typeof cur !== "object") return undefined;
    cur = (cur as Record<string, unknown>)[s];
  }
  return cur;
}

function setIn(obj: Record<string, unknown>, segments: readonly string[], value: unknown): void {
  let cur = obj;
  for (const s of segments.slice(0, -1)) {
    const next = cur[s];
    if (next === null || typeof next !== "object") cur[s] = {};
    cur = cur[s] as Record<string, unknown>;
  }
  cur[segments.at(-1)!] = value;
}

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === "object" && !Object.isFrozen(value)) {
    for (const v of Object.values(value)) deepFreeze(v);
    Object.freeze(value);
  }
  return value;
}
