import { Agent, request } from "node:https";
import type { Readable } from "node:stream";
import { readFileChecked, ShoalError } from "../../core/index.js";
import { type ApiArgs, ApiClient, apiClientOptions, resolveApiUrl } from "../api-client.js";

export { type ApiArgs, withApiOptions } from "../api-client.js";

/** Runs `fn` with an API client built from `--api`, `--ca-cert`, `--insecure`; closes it afterwards. */
export async function withClient<T>(argv: ApiArgs, fn: (api: ApiClient) => Promise<T>): Promise<T> {
  const api = await ApiClient.create(apiClientOptions(argv));
  try {
    return await fn(api);
  } finally {
    api.close();
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
  return new Promise((resolve, reject) => {
    request(url, { agent }, (res) => {
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
