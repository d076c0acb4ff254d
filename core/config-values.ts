import { Kind, type TSchema } from "@sinclair/typebox";
import { DURATION_PATTERN, SIZE_PATTERN } from "./config-schema.js";

const DURATION_UNITS_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const DURATION_RE = new RegExp(DURATION_PATTERN);
const DURATION_PART_RE = /([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)/g;

/**
 * Milliseconds in a duration such as `30s`, `5m`, `24h`, `1h30m` or `250ms`
 * (units ms, s, m, h, d). Throws a RangeError for anything else.
 */
export function parseDuration(s: string): number {
  if (!DURATION_RE.test(s))
    throw new RangeError(`not a duration: ${JSON.stringify(s)} (use e.g. 30s, 5m, 24h)`);
  let ms = 0;
  for (const [, amount, unit] of s.matchAll(DURATION_PART_RE))
    ms += Number(amount) * DURATION_UNITS_MS[unit!]!;
  return Math.round(ms);
}

const SIZE_RE = new RegExp(SIZE_PATTERN);
const SIZE_MULTIPLIERS: Record<string, number> = {
  "": 1,
  K: 1e3,
  M: 1e6,
  G: 1e9,
  T: 1e12,
  Ki: 2 ** 10,
  Mi: 2 ** 20,
  Gi: 2 ** 30,
  Ti: 2 ** 40,
};

/** Bytes in a size such as `512Mi`, `4Gi`, `1.5G`, `100MB` or `1024`. Throws a RangeError for anything else. */
export function parseByteSize(s: string): number {
  if (!SIZE_RE.test(s)) throw new RangeError(`not a size: ${JSON.stringify(s)} (use e.g. 512Mi, 4Gi)`);
  const [, amount, unit] = /^([0-9.]+)([KMGT]i?)?/.exec(s)!;
  return Math.floor(Number(amount) * SIZE_MULTIPLIERS[unit ?? ""]!);
}

const TRUE_WORDS = new Set(["true", "yes", "on", "1"]);
const FALSE_WORDS = new Set(["false", "no", "off", "0"]);
const NUMBER_RE = /^[+-]?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$/;

/**
 * Turns a string from the environment or `-c Key=Value` into the schema's type:
 * booleans (true/false, yes/no, on/off, 1/0), numbers, comma-separated lists,
 * and `k=v,k2=v2` maps. A string that does not parse is returned unchanged so
 * that validation reports it with the key path and what was expected.
 */
export function coerceConfigString(schema: TSchema, raw: string): unknown {
  switch (schema[Kind]) {
    case "Boolean": {
      const word = raw.trim().toLowerCase();
      return TRUE_WORDS.has(word) ? true : FALSE_WORDS.has(word) ? false : raw;
    }
    case "Integer":
    case "Number":
      return NUMBER_RE.test(raw.trim()) ? Number(raw.trim()) : raw;
    case "Array":
      return splitList(raw).map((item) => coerceConfigString(schema.items as TSchema, item));
    case "Record": {
      const map: Record<string, string> = {};
      for (const item of splitList(raw)) {
        const eq = item.indexOf("=");
        if (eq <= 0) return raw;
        map[item.slice(0, eq).trim()] = item.slice(eq + 1).trim();
      }
      return map;
    }
    default:
      return raw;
  }
}

function splitList(raw: string): string[] {
  return raw
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s !== "");
}

/** A value as `-c Key=Value` would take it: lists comma-joined, maps as `k=v,k2=v2`. */
export function formatConfigValue(value: unknown): string {
  if (Array.isArray(value)) return value.map(formatConfigValue).join(",");
  if (value !== null && typeof value === "object") {
    return Object.entries(value)
      .map(([k, v]) => `${k}=${formatConfigValue(v)}`)
      .join(",");
  }
  return String(value);
}

/** What a value of this schema must look like, for error messages and docs. */
export function describeExpectation(schema: TSchema): string {
  if (typeof schema["x-shoal-expect"] === "string") return schema["x-shoal-expect"];
  switch (schema[Kind]) {
    case "Union":
      return `one of ${(schema.anyOf as TSchema[]).map((s) => String(s.const)).join(", ")}`;
    case "Boolean":
      return "true or false";
    case "Integer":
      return schema.maximum === undefined
        ? `an integer of at least ${schema.minimum}`
        : `an integer from ${schema.minimum} to ${schema.maximum}`;
    case "Number":
      return "a number greater than 0";
    case "Array":
      return `a list, each ${describeExpectation(schema.items as TSchema)}`;
    case "Record":
      return "a map of names to strings (k=v,k2=v2 in env and -c)";
    case "String":
      if (schema["x-shoal"] === "duration") return "a duration like 30s, 5m or 24h";
      if (schema["x-shoal"] === "size") return "a size like 512Mi or 4Gi";
      if (schema["x-shoal"] === "path") return "a path (a leading ~ is the home directory)";
      return schema.minLength ? "a non-empty string" : "a string";
    default:
      return "a section of keys";
  }
}
