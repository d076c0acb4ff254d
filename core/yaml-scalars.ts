import { Kind, type TSchema } from "@sinclair/typebox";
import { parse } from "yaml";

/**
 * YAML types a plain scalar by its look: `version: 1.10` is the number 1.1,
 * `zone: 007` the number 7, `id: 0x1F` the number 31. Where Shoal wants a
 * string (labels, constraint values, environment variables, program
 * arguments), it takes such a scalar as it is written in the file, so a label
 * from a YAML file and the same label from `-c Labels.version=1.10` are equal.
 */

/**
 * The document's values with every scalar as written: YAML's failsafe schema,
 * which types nothing (a parse {@link fitScalars} can look up by path).
 * Silent: the typed parse of the same text reports its problems, and tags
 * such as `!!int`, which the failsafe schema does not know, are no problem.
 * Undefined when the text does not parse that way either.
 */
export function writtenScalars(text: string): unknown {
  try {
    return parse(text, { schema: "failsafe", maxAliasCount: 100, logLevel: "silent" });
  } catch {
    return undefined;
  }
}

/**
 * `value` (parsed YAML or JSON) with each number or boolean that `schema`
 * wants as a string turned into one: its text in `written` (the same
 * document's {@link writtenScalars}, at the same path) when there is one, else
 * its JavaScript text (JSON, where `1.10` is already the number 1.1). Follows
 * objects, arrays and records; anything else is left for validation to judge.
 */
export function fitScalars(schema: TSchema, value: unknown, written?: unknown): unknown {
  switch (schema[Kind]) {
    case "String":
      if (typeof value !== "number" && typeof value !== "boolean") return value;
      return typeof written === "string" ? written : String(value);
    case "Object": {
      const props = schema.properties as Record<string, TSchema>;
      return mapEntries(value, written, (k) => props[k]);
    }
    case "Array":
      if (!Array.isArray(value)) return value;
      return value.map((v, i) => fitScalars(schema.items as TSchema, v, valueAt(written, [i])));
    case "Record": {
      const valueSchema = Object.values(schema.patternProperties as Record<string, TSchema>)[0]!;
      return mapEntries(value, written, () => valueSchema);
    }
    default:
      return value;
  }
}

function mapEntries(
  value: unknown,
  written: unknown,
  schemaOf: (key: string) => TSchema | undefined,
): unknown {
  if (!isMapping(value)) return value;
  return Object.fromEntries(
    Object.entries(value).map(([k, v]) => {
      const schema = schemaOf(k);
      return [k, schema ? fitScalars(schema, v, valueAt(written, [k])) : v];
    }),
  );
}

/** What `value` holds at `path` (own keys of mappings, indexes of arrays), or undefined. */
export function valueAt(value: unknown, path: readonly (string | number)[]): unknown {
  let at = value;
  for (const key of path) {
    if (typeof key === "number") at = Array.isArray(at) ? at[key] : undefined;
    else at = isMapping(at) && Object.hasOwn(at, key) ? at[key] : undefined;
  }
  return at;
}

function isMapping(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}
