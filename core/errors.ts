/**
 * The project's base error. Every failure a user can see is a subclass with a
 * stable `code` (e.g. `SHOAL_TLS_SAN_MISMATCH`), a one-line `fix` telling the
 * operator what to do, and the fields a caller needs.
 *
 * Each module keeps its own subclasses next to the code that throws them and
 * registers its codes with {@link defineCodes}, so the catalogue test can check
 * that every code is unique and documented in docs/errors.md.
 */
export class ShoalError extends Error {
  /** Stable, documented code; never reworded once released. */
  readonly code: string;
  /** One line telling the operator how to fix it, when there is something to do. */
  readonly fix: string | undefined;

  constructor(code: string, message: string, options: { cause?: unknown; fix?: string } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.fix = options.fix;
  }

  /** The message with its fix, as printed by the CLI. */
  describe(): string {
    return this.fix ? `${this.message}\n  fix: ${this.fix}` : this.message;
  }

  toJSON(): Record<string, unknown> {
    return {
      name: this.name,
      code: this.code,
      message: this.message,
      ...(this.fix ? { fix: this.fix } : {}),
    };
  }
}

/** True when `err` is a ShoalError, optionally with the given code. */
export function isShoalError(err: unknown, code?: string): err is ShoalError {
  return err instanceof ShoalError && (code === undefined || err.code === code);
}

const catalogue = new Map<string, { module: string; description: string }>();

/**
 * Registers a module's error codes with a one-line description each and returns
 * them as a frozen map of code → code, so call sites use `CODES.X` not strings.
 * A code registered twice (by two modules) throws at import time.
 */
export function defineCodes<const T extends Record<string, string>>(
  module: string,
  codes: T,
): { readonly [K in keyof T]: K } {
  const out: Record<string, string> = {};
  for (const [code, description] of Object.entries(codes)) {
    const existing = catalogue.get(code);
    if (existing && existing.module !== module) {
      throw new Error(`error code ${code} registered by both ${existing.module} and ${module}`);
    }
    catalogue.set(code, { module, description });
    out[code] = code;
  }
  return Object.freeze(out) as { readonly [K in keyof T]: K };
}

/** Every registered code, for the catalogue test and `docs/errors.md`. */
export function errorCatalogue(): ReadonlyMap<string, { module: string; description: string }> {
  return catalogue;
}

export const CORE_CODES = defineCodes("core", {
  SHOAL_CONFIG_UNKNOWN_KEY: "A config key that Shoal does not know; the message names the nearest valid key.",
  SHOAL_CONFIG_INVALID: "A config value of the wrong type or out of range; the message names the key path.",
  SHOAL_CONFIG_FILE: "The config file cannot be read or is not valid YAML.",
  SHOAL_FILE_READ: "A file named on the command line or in config cannot be read.",
  SHOAL_FILE_WRITE: "A file cannot be written (permissions, disk full); nothing partial is left behind.",
  SHOAL_USAGE: "The command line is wrong: a missing or conflicting argument.",
  SHOAL_INTERNAL: "A bug: an unexpected failure. Please report it with the log.",
});
