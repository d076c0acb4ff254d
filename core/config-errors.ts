import { CORE_CODES, ShoalError } from "./errors.js";

/** Where a config value came from, as shown in errors: `file.yaml:12`, `env SHOAL_X`, `-c K=V`, `flag K`. */
export type ConfigSource = string;

/** A config problem; names the key path (when there is one), the nearest valid key and where the value came from. */
export class ConfigError extends ShoalError {
  constructor(
    code: string,
    message: string,
    readonly keyPath: string | undefined,
    readonly source: ConfigSource | undefined,
    readonly suggestion: string | undefined,
    options: { cause?: unknown; fix?: string } = {},
  ) {
    super(code, message, options);
  }

  override toJSON(): Record<string, unknown> {
    return {
      ...super.toJSON(),
      ...(this.keyPath === undefined ? {} : { keyPath: this.keyPath }),
      ...(this.source === undefined ? {} : { source: this.source }),
      ...(this.suggestion === undefined ? {} : { suggestion: this.suggestion }),
    };
  }
}

/** A key Shoal does not know (`SHOAL_CONFIG_UNKNOWN_KEY`). */
export class ConfigUnknownKeyError extends ConfigError {
  constructor(keyPath: string, source: ConfigSource, suggestion: string | undefined, display = keyPath) {
    super(
      CORE_CODES.SHOAL_CONFIG_UNKNOWN_KEY,
      `unknown config key ${display} (${source})${suggestion ? `; did you mean ${suggestion}?` : ""}`,
      keyPath,
      source,
      suggestion,
      {
        fix: suggestion
          ? `use ${suggestion}; shoal config list shows every key`
          : "remove it; shoal config list shows every key",
      },
    );
  }
}

/** A value of the wrong type, format or range, or keys that must be set together (`SHOAL_CONFIG_INVALID`). */
export class ConfigInvalidError extends ConfigError {
  constructor(keyPath: string, message: string, source: ConfigSource | undefined) {
    super(
      CORE_CODES.SHOAL_CONFIG_INVALID,
      source ? `${message} (${source})` : message,
      keyPath,
      source,
      undefined,
      {
        fix: `correct ${keyPath}; docs/config.md gives its type and default`,
      },
    );
  }
}

/** The config file cannot be read or is not valid YAML (`SHOAL_CONFIG_FILE`); `source` is `file:line`. */
export class ConfigFileError extends ConfigError {
  constructor(
    readonly file: string,
    message: string,
    readonly line: number | undefined,
    options: { cause?: unknown } = {},
  ) {
    const source = line === undefined ? file : `${file}:${line}`;
    super(CORE_CODES.SHOAL_CONFIG_FILE, `${source}: ${message}`, undefined, source, undefined, {
      fix: "fix the file, or point --config / SHOAL_CONFIG at the right one",
      ...options,
    });
  }
}

/**
 * The candidate nearest to `wanted`, or undefined when none is close. A
 * case-insensitive match always wins, then a candidate one edit away (with
 * transpositions), then the only candidate whose last segment matches, then
 * the nearest candidate within a third of the length.
 */
export function nearestKey(wanted: string, candidates: Iterable<string>): string | undefined {
  const lower = wanted.toLowerCase();
  const last = lower.slice(lower.lastIndexOf(".") + 1);
  let best: string | undefined;
  let bestDistance = Number.POSITIVE_INFINITY;
  const sameLeaf: string[] = [];
  for (const candidate of candidates) {
    const c = candidate.toLowerCase();
    if (c === lower) return candidate;
    const d = editDistance(lower, c);
    if (d < bestDistance) {
      best = candidate;
      bestDistance = d;
    }
    if (c.slice(c.lastIndexOf(".") + 1) === last) sameLeaf.push(candidate);
  }
  // A near-miss spelling wins; otherwise the key under another section (`Compute.CPU` → `Compute.Resources.CPU`).
  if (best !== undefined && bestDistance <= 1) return best;
  if (sameLeaf.length === 1) return sameLeaf[0];
  return best !== undefined && bestDistance <= Math.max(2, Math.floor(wanted.length / 3)) ? best : undefined;
}

/** Optimal string alignment distance: insertions, deletions, substitutions and adjacent transpositions. */
export function editDistance(a: string, b: string): number {
  const rows = a.length + 1;
  const cols = b.length + 1;
  const d: number[] = new Array(rows * cols).fill(0);
  const at = (i: number, j: number) => d[i * cols + j]!;
  for (let i = 0; i < rows; i++) d[i * cols] = i;
  for (let j = 0; j < cols; j++) d[j] = j;
  for (let i = 1; i < rows; i++) {
    for (let j = 1; j < cols; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let v = Math.min(at(i - 1, j) + 1, at(i, j - 1) + 1, at(i - 1, j - 1) + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1])
        v = Math.min(v, at(i - 2, j - 2) + 1);
      d[i * cols + j] = v;
    }
  }
  return at(rows - 1, cols - 1);
}
