import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { defineCodes, FileWriteError, ShoalError, withFileLock, writeFileAtomic } from "../core/index.js";

/** Codes of the CLI's token store. */
export const TOKEN_STORE_CODES = defineCodes("api-tls", {
  SHOAL_TOKEN_STORE_CORRUPT:
    "~/.shoal/tokens.json (or the file given) is not valid JSON of the expected shape; it is left untouched.",
  SHOAL_TOKEN_STORE_INSECURE:
    "The token file is readable or writable by other users (mode wider than 0600); its tokens may have leaked.",
  SHOAL_TOKEN_FILE_INVALID: "SHOAL_TOKEN_FILE names a file that cannot be read or holds no token.",
});

/** A token the CLI keeps for one API URL. */
export interface StoredToken {
  token: string;
  /** ISO 8601 time the token stops working. */
  expiresAt: string;
  /** The authentication method that obtained it (anonymous, clientKey, password, ...), or `env` for an override. */
  method: string;
  user?: string;
}

/** The file's shape: version 1, tokens keyed by normalised API URL. */
interface TokenFile {
  version: 1;
  tokens: Record<string, StoredToken>;
}

/** `~/.shoal/tokens.json`. */
export const DEFAULT_TOKEN_FILE = path.join(os.homedir(), ".shoal", "tokens.json");
/** @default 30 s: a token this close to expiry counts as expired, so a request does not fail mid-flight. */
export const TOKEN_EXPIRY_SKEW_MS = 30_000;

/** The key of an API URL in the store: scheme, host and port, lower case, no trailing slash. */
export function tokenStoreKey(apiUrl: string): string {
  const u = new URL(apiUrl);
  return `${u.origin}${u.pathname.replace(/\/+$/, "")}`.toLowerCase();
}

function corrupt(file: string, why: string, cause?: unknown): ShoalError {
  return new ShoalError(
    TOKEN_STORE_CODES.SHOAL_TOKEN_STORE_CORRUPT,
    `${file} is not a valid token store: ${why}`,
    {
      cause,
      fix: `repair or delete ${file} (it holds only tokens; \`shoal auth login\` gets new ones)`,
    },
  );
}

function isStoredToken(v: unknown): v is StoredToken {
  const t = v as StoredToken;
  return (
    typeof t === "object" &&
    t !== null &&
    typeof t.token === "string" &&
    t.token.length > 0 &&
    typeof t.expiresAt === "string" &&
    !Number.isNaN(Date.parse(t.expiresAt)) &&
    typeof t.method === "string" &&
    (t.user === undefined || typeof t.user === "string")
  );
}

/**
 * The CLI's API tokens: `~/.shoal/tokens.json` (0600 in a 0700 directory),
 * keyed by API URL, written atomically under a lock. `SHOAL_TOKEN` (the token
 * itself) or `SHOAL_TOKEN_FILE` (a file holding it) override the store for
 * every URL. A corrupt or over-readable file is an error, never silently replaced.
 */
export class TokenStore {
  readonly file: string;
  readonly #env: NodeJS.ProcessEnv;

  constructor(opts: { file?: string; env?: NodeJS.ProcessEnv } = {}) {
    this.file = opts.file ?? DEFAULT_TOKEN_FILE;
    this.#env = opts.env ?? process.env;
  }

  /**
   * The token to use for `apiUrl`: the override when set, else the stored one
   * unless it expires within {@link TOKEN_EXPIRY_SKEW_MS} of `now`.
   */
  async get(apiUrl: string, now = new Date()): Promise<StoredToken | undefined> {
    const override = await this.#override();
    if (override) return override;
    const entry = (await this.#read()).tokens[tokenStoreKey(apiUrl)];
    if (!entry || Date.parse(entry.expiresAt) - TOKEN_EXPIRY_SKEW_MS <= now.getTime()) return undefined;
    return entry;
  }

  /** Every stored token by URL (expired ones included); the override is not listed. */
  async list(): Promise<Record<string, StoredToken>> {
    return (await this.#read()).tokens;
  }

  /** Stores `entry` for `apiUrl`, replacing any earlier one. */
  async set(apiUrl: string, entry: StoredToken): Promise<void> {
    if (!isStoredToken(entry)) throw new ShoalError("SHOAL_INTERNAL", "TokenStore.set: not a token entry");
    await this.#update((f) => {
      f.tokens[tokenStoreKey(apiUrl)] = { ...entry };
    });
  }

  /** Forgets the token for `apiUrl`; true when there was one. */
  async delete(apiUrl: string): Promise<boolean> {
    let had = false;
    await this.#update((f) => {
      const key = tokenStoreKey(apiUrl);
      had = key in f.tokens;
      delete f.tokens[key];
    });
    return had;
  }

  /** A token provider for {@link ApiClient}: the current token for `apiUrl`, read per request. */
  provider(apiUrl: string): () => Promise<string | undefined> {
    return async () => (await this.get(apiUrl))?.token;
  }

  async #override(): Promise<StoredToken | undefined> {
    const far = new Date(8_640_000_000_000_000).toISOString();
    const token = this.#env.SHOAL_TOKEN?.trim();
    if (token) return { token, expiresAt: far, method: "env" };
    const file = this.#env.SHOAL_TOKEN_FILE;
    if (!file) return undefined;
    let text: string;
    try {
      text = (await fs.readFile(file, "utf8")).trim();
    } catch (err) {
      throw new ShoalError(
        TOKEN_STORE_CODES.SHOAL_TOKEN_FILE_INVALID,
        `SHOAL_TOKEN_FILE=${file} cannot be read: ${(err as NodeJS.ErrnoException).code ?? err}`,
        { cause: err, fix: "point SHOAL_TOKEN_FILE at a readable file holding the token, or unset it" },
      );
    }
    if (!text || /\s/.test(text)) {
      throw new ShoalError(
        TOKEN_STORE_CODES.SHOAL_TOKEN_FILE_INVALID,
        `SHOAL_TOKEN_FILE=${file} ${text ? "holds more than one word" : "is empty"}`,
        { fix: "put exactly the token in the file (one line), or unset SHOAL_TOKEN_FILE" },
      );
    }
    return { token: text, expiresAt: far, method: "env" };
  }

  async #read(): Promise<TokenFile> {
    let text: string;
    try {
      const st = await fs.stat(this.file);
      if (process.platform !== "win32" && (st.mode & 0o077) !== 0) {
        throw new ShoalError(
          TOKEN_STORE_CODES.SHOAL_TOKEN_STORE_INSECURE,
          `${this.file} has mode 0${(st.mode & 0o777).toString(8)}: other users may read or change its tokens`,
          {
            fix: `chmod 600 ${this.file}; if others could read it, revoke its tokens (shoal auth token revoke) and log in again`,
          },
        );
      }
      text = await fs.readFile(this.file, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return { version: 1, tokens: {} };
      if (err instanceof ShoalError) throw err;
      throw corrupt(this.file, `cannot read it (${(err as NodeJS.ErrnoException).code ?? err})`, err);
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (err) {
      throw corrupt(this.file, (err as Error).message, err);
    }
    const f = parsed as TokenFile;
    if (
      typeof f !== "object" ||
      f === null ||
      f.version !== 1 ||
      typeof f.tokens !== "object" ||
      f.tokens === null
    ) {
      throw corrupt(this.file, 'expected {"version": 1, "tokens": {...}}');
    }
    for (const [url, entry] of Object.entries(f.tokens)) {
      if (!isStoredToken(entry))
        throw corrupt(this.file, `the entry for ${url} lacks token, expiresAt or method`);
    }
    return f;
  }

  async #update(change: (f: TokenFile) => void): Promise<void> {
    const dir = path.dirname(this.file);
    try {
      await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    } catch (err) {
      throw new FileWriteError(dir, err);
    }
    await withFileLock(`${this.file}.lock`, async () => {
      const f = await this.#read();
      change(f);
      await writeFileAtomic(this.file, `${JSON.stringify(f, null, 2)}\n`, 0o600);
    });
  }
}
