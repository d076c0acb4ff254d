import { Agent, request } from "node:https";
import type { Readable } from "node:stream";
import { readFileChecked, ShoalError } from "../../core/index.js";
import { type ApiArgs, ApiClient, ApiResponseError, apiClientOptions, resolveApiUrl } from "../api-client.js";
import { sessionTokenProvider } from "../auth-session.js";
import { TokenStore } from "../token-store.js";

export { type ApiArgs, withApiOptions } from "../api-client.js";

/** Codes of tokens the API refused: the stored one is dropped and the command retried after a fresh login. */
const STALE_TOKEN_CODES = new Set([
  "SHOAL_AUTH_TOKEN_INVALID",
  "SHOAL_AUTH_TOKEN_EXPIRED",
  "SHOAL_AUTH_TOKEN_REVOKED",
  "SHOAL_AUTH_TOKEN_AUDIENCE",
]);

/**
 * Runs `fn` with an API client built from `--api`, `--ca-cert`, `--insecure`
 * that sends the session's token (see sessionTokenProvider); closes it
 * afterwards. A stored token the API refuses (expired, revoked, from an
 * earlier orchestrator at the same URL) is dropped and `fn` retried once
 * with a fresh login; nothing ran the first time, since authentication
 * comes before everything.
 */
export async function withClient<T>(argv: ApiArgs, fn: (api: ApiClient) => Promise<T>): Promise<T> {
  const options = apiClientOptions(argv);
  const store = new TokenStore();
  const attempt = async () => {
    const api = await ApiClient.create({ ...options, token: sessionTokenProvider(options, store) });
    try {
      return await fn(api);
    } finally {
      api.close();
    }
  };
  try {
    return await attempt();
  } catch (err) {
    const overridden = process.env.SHOAL_TOKEN || process.env.SHOAL_TOKEN_FILE;
    if (!(err instanceof ApiResponseError && STALE_TOKEN_CODES.has(err.code)) || overridden) throw err;
    await store.delete(resolveApiUrl(options.url));
    return attempt();
  }
}

/**
 * A raw download (result files are bytes, not JSON), trusting the same CA as
 * the API client. The caller checks the digest.
 */
export async function download(argv: ApiArgs, path: string): Promise<Readable> {
  const o = apiClientOptions(argv);
  const url = new URL(`${resolveApiUrl(o.url)}/api/v1/${path}`);
  const ca = o.caFile ? await readFileChecked(o.caFile) : undefined;
  const agent = new Agent({ rejectUnauthorized: !o.insecure, ...(ca ? { ca } : {}) });
  const token = await sessionTokenProvider(o)();
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  return new Promise((resolve, reject) => {
    request(url, { agent, headers }, (res) => {
      if ((res.statusCode ?? 500) < 400) return resolve(res);
      res.resume();
      reject(
        new ShoalError("SHOAL_USAGE", `GET ${path} answered ${res.statusCode}`, {
          fix: "list the results with GET .../results",
        }),
      );
    })
      .on("error", reject)
      .end();
  });
}

/** Prints rows as an aligned text table. */
export function printTable(headers: string[], rows: (string | number | undefined)[][]): void {
  const cells = [headers, ...rows.map((r) => r.map((c) => (c === undefined ? "" : String(c))))];
  const widths = headers.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? "").length)));
  for (const r of cells) {
    process.stdout.write(
      `${r
        .map((c, i) => (c ?? "").padEnd(widths[i] ?? 0))
        .join("  ")
        .trimEnd()}\n`,
    );
  }
}

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}
