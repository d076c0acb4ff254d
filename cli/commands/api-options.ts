import { readFileSync } from "node:fs";
import { Agent, request } from "node:https";
import type { Readable } from "node:stream";
import type { Argv } from "yargs";
import { ShoalError } from "../../core/index.js";

/** The options every API command takes (DESIGN.md "Client settings"). */
export interface ApiArgs {
  api?: string;
  "ca-cert"?: string;
  insecure?: boolean;
  output?: unknown;
}

export function withApiOptions<T>(yargs: Argv<T>): Argv<T & ApiArgs> {
  return yargs
    .option("api", {
      type: "string",
      describe: "orchestrator API URL [default: $SHOAL_API, else https://127.0.0.1:1234]",
    })
    .option("ca-cert", {
      type: "string",
      describe: "CA certificate to trust for the API (e.g. DATA-DIR/pki/ca.crt)",
    })
    .option("insecure", {
      type: "boolean",
      describe: "skip verification of the API certificate (dangerous)",
    }) as Argv<T & ApiArgs>;
}

/** An error the API answered with `{ error: { code, message, fix, field } }`. */
export class ApiRequestError extends ShoalError {
  constructor(
    readonly status: number,
    body: { code?: string; message?: string; fix?: string; field?: string },
  ) {
    super(
      body.code ?? "SHOAL_INTERNAL",
      `${body.message ?? `HTTP ${status}`}${body.field ? ` (field ${body.field})` : ""}`,
      {
        fix: body.fix,
      },
    );
    this.field = body.field;
  }
  readonly field: string | undefined;
}

/**
 * A minimal HTTPS client for the orchestrator API: JSON calls, NDJSON streams
 * and raw downloads, trusting `--ca-cert` (or the system roots).
 */
export class ApiClient {
  readonly #base: URL;
  readonly #agent: Agent;

  constructor(args: ApiArgs) {
    this.#base = new URL(args.api ?? process.env.SHOAL_API ?? "https://127.0.0.1:1234");
    if (args.insecure)
      process.stderr.write("shoal: WARNING: --insecure: the API's certificate is not verified\n");
    this.#agent = new Agent({
      keepAlive: true,
      ...(args["ca-cert"] ? { ca: readFileSync(args["ca-cert"]) } : {}),
      rejectUnauthorized: !args.insecure,
    });
  }

  async json<T = Record<string, unknown>>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.#send(method, path, body);
    const text = await readAll(res);
    return JSON.parse(text) as T;
  }

  /** Each NDJSON line of a streaming response, as it arrives. */
  async *lines<T = Record<string, unknown>>(path: string): AsyncIterable<T> {
    const res = await this.#send("GET", path);
    let buffered = "";
    for await (const chunk of res) {
      buffered += chunk.toString();
      let nl = buffered.indexOf("\n");
      while (nl >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        if (line.trim()) yield JSON.parse(line) as T;
        nl = buffered.indexOf("\n");
      }
    }
  }

  /** A raw response body (result downloads) with its headers. */
  async download(
    path: string,
  ): Promise<{ stream: Readable; headers: Record<string, string | string[] | undefined> }> {
    const res = await this.#send("GET", path);
    return { stream: res, headers: res.headers };
  }

  close(): void {
    this.#agent.destroy();
  }

  #send(method: string, path: string, body?: unknown): Promise<import("node:http").IncomingMessage> {
    const url = new URL(`/api/v1/${path}`, this.#base);
    const payload = body === undefined ? undefined : JSON.stringify(body);
    return new Promise((resolve, reject) => {
      const req = request(
        url,
        {
          method,
          agent: this.#agent,
          headers: payload
            ? { "content-type": "application/json", "content-length": Buffer.byteLength(payload) }
            : {},
        },
        (res) => {
          if ((res.statusCode ?? 500) < 400) return resolve(res);
          readAll(res).then((text) => {
            let err: { code?: string; message?: string; fix?: string; field?: string } = {};
            try {
              err = (JSON.parse(text) as { error?: typeof err }).error ?? {};
            } catch {
              err = { message: text };
            }
            reject(new ApiRequestError(res.statusCode ?? 500, err));
          }, reject);
        },
      );
      req.on("error", (cause: NodeJS.ErrnoException) =>
        reject(
          new ShoalError(
            "SHOAL_USAGE",
            `cannot reach the API at ${this.#base.origin}: ${cause.code ?? cause.message}`,
            {
              cause,
              fix: /CERT|SELF_SIGNED|issuer/i.test(String(cause.code ?? cause.message))
                ? "pass the fabric CA with --ca-cert DATA-DIR/pki/ca.crt"
                : "check --api / SHOAL_API and that `shoal orchestrator serve` runs",
            },
          ),
        ),
      );
      req.end(payload);
    });
  }
}

async function readAll(stream: Readable): Promise<string> {
  let text = "";
  for await (const chunk of stream) text += chunk.toString();
  return text;
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
