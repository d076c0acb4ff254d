import { X509Certificate } from "node:crypto";
import type { IncomingMessage } from "node:http";
import https from "node:https";
import { isIP } from "node:net";
import tls from "node:tls";
import type { Argv } from "yargs";
import { defineCodes, readFileChecked, type ShoalConfig, ShoalError } from "../core/index.js";
import { isUnknownCaCode } from "../pki/index.js";

/** Codes of the CLI's HTTPS client: each turns a transport or HTTP failure into a cause and a fix. */
export const API_CLIENT_CODES = defineCodes("api-tls", {
  SHOAL_API_BAD_URL: "The API URL (--api or SHOAL_API) is not an https:// URL.",
  SHOAL_API_UNREACHABLE:
    "Nothing answers at the API URL (connection refused, unknown host, unreachable network, reset before a reply).",
  SHOAL_API_TIMEOUT: "The API did not answer within the client's time limit.",
  SHOAL_API_TLS_UNKNOWN_CA:
    "The API's certificate is not signed by a CA this client trusts (by default the system roots; --ca-cert replaces them).",
  SHOAL_API_TLS_HOST_MISMATCH: "The API's certificate does not name the host or IP the client dialled.",
  SHOAL_API_TLS_CERT_EXPIRED:
    "The API's certificate is expired or not valid yet (or this machine's clock is wrong).",
  SHOAL_API_TLS_HANDSHAKE:
    "The TLS handshake with the API failed for another reason (no common protocol version or cipher, not a TLS server).",
  SHOAL_API_BAD_RESPONSE:
    "The API answered with something that is not the JSON (or NDJSON/SSE stream) expected.",
  SHOAL_API_HTTP_ERROR:
    "The API answered with an HTTP error that carries no Shoal error code (e.g. a proxy's 502).",
});

/** Where the CLI looks for the API when neither `--api` nor `SHOAL_API` names it. */
export const DEFAULT_API_URL = "https://127.0.0.1:1234";
/** @default 30 s: connect + handshake + response headers; streams are exempt once open. */
export const DEFAULT_API_TIMEOUT_MS = 30_000;

const EXPIRED_CODES = new Set(["CERT_HAS_EXPIRED", "CERT_NOT_YET_VALID"]);
const UNREACHABLE_CODES = new Set([
  "ECONNREFUSED",
  "ENOTFOUND",
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ECONNRESET",
  "EPIPE",
]);

/** A transport-level failure reaching the API, with the URL dialled and what the client saw. */
export class ApiClientError extends ShoalError {
  constructor(
    code: keyof typeof API_CLIENT_CODES,
    message: string,
    readonly url: string,
    options: { cause?: unknown; fix?: string; details?: Record<string, unknown> } = {},
  ) {
    super(code, message, options);
    this.details = options.details ?? {};
  }

  /** Facts for `--output json` and tests (e.g. the certificate's SANs, the host dialled). */
  readonly details: Record<string, unknown>;

  override toJSON(): Record<string, unknown> {
    return { ...super.toJSON(), url: this.url, ...this.details };
  }
}

/** The API refused a request: its `{ error: { code, message, fix } }` body as a ShoalError with that code. */
export class ApiResponseError extends ShoalError {
  constructor(
    code: string,
    message: string,
    readonly status: number,
    options: { fix?: string; field?: string } = {},
  ) {
    super(code, message, options.fix === undefined ? {} : { fix: options.fix });
    this.field = options.field;
  }

  /** The request field at fault, when the API names one. */
  readonly field: string | undefined;
}

/** Settings of {@link ApiClient}. */
export interface ApiClientOptions {
  /** Base URL of the API. @default `SHOAL_API`, else DEFAULT_API_URL */
  url?: string;
  /** PEM file of the CA(s) to trust instead of the system roots (`--ca-cert`, `API.TLS.CAFile`). */
  caFile?: string;
  /** PEM text of the CA(s) to trust (wins over caFile). */
  caPem?: string;
  /** A TLS client certificate and key (PEM files) to present: a user certificate for the mtls login. */
  clientCert?: { certFile: string; keyFile: string };
  /** Skip certificate verification; writes a warning to `warn` on every client created. @default false */
  insecure?: boolean;
  /** Supplies the bearer token per request; undefined sends no Authorization header. */
  token?: () => string | undefined | Promise<string | undefined>;
  /** Where warnings go. @default process.stderr */
  warn?: (line: string) => void;
  /** @default DEFAULT_API_TIMEOUT_MS */
  timeoutMs?: number;
  /** @default process.env */
  env?: NodeJS.ProcessEnv;
}

/** One request. `query` values that are undefined are left out; an array is the parameter repeated. */
export interface RequestOptions {
  body?: unknown;
  query?: Record<string, string | number | boolean | readonly string[] | undefined>;
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

/** The API URL: `--api`, else `SHOAL_API`, else {@link DEFAULT_API_URL}; checked to be https:// and trailing slashes dropped. */
export function resolveApiUrl(flag?: string, env: NodeJS.ProcessEnv = process.env): string {
  const raw = flag || env.SHOAL_API || DEFAULT_API_URL;
  let url: URL;
  try {
    url = new URL(raw);
  } catch (err) {
    throw new ApiClientError(API_CLIENT_CODES.SHOAL_API_BAD_URL, `${JSON.stringify(raw)} is not a URL`, raw, {
      cause: err,
      fix: "give --api https://HOST:1234 (or set SHOAL_API)",
    });
  }
  if (url.protocol !== "https:") {
    throw new ApiClientError(API_CLIENT_CODES.SHOAL_API_BAD_URL, `${raw} is not an https:// URL`, raw, {
      fix: `the API serves HTTPS only: use https://${url.host || "HOST:1234"}`,
    });
  }
  return `${url.origin}${url.pathname.replace(/\/+$/, "")}`;
}

/** The host as dialled, without IPv6 brackets. */
function dialledHost(url: URL): string {
  return url.hostname.replace(/^\[|\]$/g, "");
}

/**
 * The CLI's HTTPS client for the orchestrator API: keep-alive, verified TLS
 * (system roots, or only the given CA), JSON in and out, bearer tokens, and
 * NDJSON/SSE streams. Every failure is a ShoalError: transport and TLS failures
 * become {@link ApiClientError} with a fix, API error bodies {@link ApiResponseError}.
 */
export class ApiClient {
  readonly url: string;
  readonly #agent: https.Agent;
  readonly #o: ApiClientOptions;
  readonly #caFile: string | undefined;

  private constructor(url: string, agent: https.Agent, o: ApiClientOptions) {
    this.url = url;
    this.#agent = agent;
    this.#o = o;
    this.#caFile = o.caPem === undefined ? o.caFile : undefined;
  }

  /** Resolves the URL, reads the CA file, and warns when verification is off. */
  static async create(o: ApiClientOptions = {}): Promise<ApiClient> {
    const url = resolveApiUrl(o.url, o.env ?? process.env);
    const ca = o.caPem ?? (o.caFile ? (await readFileChecked(o.caFile)).toString("utf8") : undefined);
    if (o.insecure) {
      (o.warn ?? ((line: string) => process.stderr.write(line)))(
        `WARNING: --insecure: the certificate of ${url} is NOT verified. Anyone on the network path can read and change this traffic, including your token. Use --ca-cert FILE instead.\n`,
      );
    }
    const identity = o.clientCert
      ? {
          cert: await readFileChecked(o.clientCert.certFile),
          key: await readFileChecked(o.clientCert.keyFile),
        }
      : {};
    const agent = new https.Agent({
      keepAlive: true,
      minVersion: "TLSv1.2",
      rejectUnauthorized: !o.insecure,
      ...(ca ? { ca } : {}),
      ...identity,
    });
    return new ApiClient(url, agent, o);
  }

  /** Sends a JSON request and returns the parsed JSON reply (undefined for an empty body). */
  async request<T = unknown>(method: string, path: string, opts: RequestOptions = {}): Promise<T> {
    const res = await this.#send(method, path, opts, "application/json");
    const text = await readBody(res, this.url);
    if (res.statusCode! >= 400) throw this.#httpError(res, text);
    if (text.length === 0) return undefined as T;
    try {
      return JSON.parse(text) as T;
    } catch (err) {
      throw new ApiClientError(
        API_CLIENT_CODES.SHOAL_API_BAD_RESPONSE,
        `${method} ${path} answered ${res.statusCode} with a body that is not JSON: ${text.slice(0, 120)}`,
        this.url,
        {
          cause: err,
          fix: `check that ${this.url} is a Shoal orchestrator API and not another service or a proxy`,
        },
      );
    }
  }

  get<T = unknown>(path: string, opts?: RequestOptions): Promise<T> {
    return this.request<T>("GET", path, opts);
  }

  put<T = unknown>(path: string, body: unknown, opts: RequestOptions = {}): Promise<T> {
    return this.request<T>("PUT", path, { ...opts, body });
  }

  post<T = unknown>(path: string, body: unknown, opts: RequestOptions = {}): Promise<T> {
    return this.request<T>("POST", path, { ...opts, body });
  }

  delete<T = unknown>(path: string, opts?: RequestOptions): Promise<T> {
    return this.request<T>("DELETE", path, opts);
  }

  /**
   * A streaming GET: yields each JSON value of an NDJSON body (one per line), or
   * the parsed `data:` of each SSE event, until the server ends the stream or
   * `signal` aborts. Breaking out of the loop closes the connection.
   */
  async *stream<T = unknown>(path: string, opts: RequestOptions = {}): AsyncGenerator<T> {
    const res = await this.#send("GET", path, opts, "application/x-ndjson, text/event-stream");
    if (res.statusCode! >= 400) throw this.#httpError(res, await readBody(res, this.url));
    const sse = (res.headers["content-type"] ?? "").startsWith("text/event-stream");
    res.setEncoding("utf8");
    let buffer = "";
    let data: string[] = [];
    const parse = (text: string): T => {
      try {
        return JSON.parse(text) as T;
      } catch (err) {
        throw new ApiClientError(
          API_CLIENT_CODES.SHOAL_API_BAD_RESPONSE,
          `GET ${path} streamed a line that is not JSON: ${text.slice(0, 120)}`,
          this.url,
          { cause: err, fix: "check that the orchestrator and this CLI are the same Shoal version" },
        );
      }
    };
    try {
      for await (const chunk of res as AsyncIterable<string>) {
        buffer += chunk;
        let nl = buffer.indexOf("\n");
        while (nl >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, "");
          buffer = buffer.slice(nl + 1);
          nl = buffer.indexOf("\n");
          if (!sse) {
            if (line.trim()) yield parse(line);
          } else if (line === "") {
            if (data.length > 0) yield parse(data.join("\n"));
            data = [];
          } else if (line.startsWith("data:")) {
            data.push(line.slice(5).replace(/^ /, ""));
          }
        }
      }
    } catch (err) {
      if (opts.signal?.aborted) return;
      throw this.#transportError(err);
    } finally {
      res.destroy();
    }
    if (!sse && buffer.trim()) yield parse(buffer);
  }

  /** Closes idle keep-alive connections. */
  close(): void {
    this.#agent.destroy();
  }

  async #send(method: string, path: string, opts: RequestOptions, accept: string): Promise<IncomingMessage> {
    const target = new URL(`${this.url}${path.startsWith("/") ? path : `/${path}`}`);
    for (const [k, v] of Object.entries(opts.query ?? {})) {
      for (const one of v === undefined ? [] : Array.isArray(v) ? v : [v])
        target.searchParams.append(k, String(one));
    }
    const body = opts.body === undefined ? undefined : Buffer.from(JSON.stringify(opts.body));
    const token = await this.#o.token?.();
    const headers: Record<string, string> = {
      accept,
      ...(body ? { "content-type": "application/json", "content-length": String(body.length) } : {}),
      ...(token ? { authorization: `Bearer ${token}` } : {}),
      ...opts.headers,
    };
    const timeoutMs = this.#o.timeoutMs ?? DEFAULT_API_TIMEOUT_MS;
    return new Promise<IncomingMessage>((resolve, reject) => {
      const req = https.request(
        target,
        { method, agent: this.#agent, headers, signal: opts.signal },
        (res) => {
          req.setTimeout(0);
          resolve(res);
        },
      );
      req.setTimeout(timeoutMs, () => {
        req.destroy(
          new ApiClientError(
            API_CLIENT_CODES.SHOAL_API_TIMEOUT,
            `${method} ${target.pathname} got no answer from ${this.url} within ${timeoutMs} ms`,
            this.url,
            { fix: `check that the orchestrator at ${this.url} is healthy (shoal agent alive)` },
          ),
        );
      });
      req.on("error", (err) => {
        this.#diagnose(err, target).then(reject, reject);
      });
      req.end(body);
    });
  }

  /** Turns a request error into an ApiClientError; for an unknown CA, looks at the presented chain to say who issued it. */
  async #diagnose(err: unknown, target: URL): Promise<ShoalError> {
    const code = (err as NodeJS.ErrnoException).code ?? "";
    if (isUnknownCaCode(code)) {
      const issuer = await presentedIssuer(target, this.#o.timeoutMs ?? DEFAULT_API_TIMEOUT_MS);
      const trusted = this.#caFile
        ? `the CA in ${this.#caFile}`
        : this.#o.caPem
          ? "the CA given"
          : "the system's CAs";
      return new ApiClientError(
        API_CLIENT_CODES.SHOAL_API_TLS_UNKNOWN_CA,
        `the certificate of ${this.url}${issuer ? ` (issued by ${issuer})` : ""} is not signed by ${trusted} (${code})`,
        this.url,
        {
          cause: err,
          fix: this.#caFile
            ? `pass the CA that issued the orchestrator's API certificate: --ca-cert DATA_DIR/pki/ca.crt of that orchestrator (or API.TLS.CAFile); ${this.#caFile} is another CA`
            : "pass --ca-cert DATA_DIR/pki/ca.crt (the orchestrator's CA; `curl -k URL/api/v1/pki/ca` fetches it, check its fingerprint out of band) or set API.TLS.CAFile",
          details: { tlsCode: code, ...(issuer ? { issuer } : {}) },
        },
      );
    }
    return this.#transportError(err, target);
  }

  #transportError(err: unknown, target = new URL(this.url)): ShoalError {
    if (err instanceof ShoalError) return err;
    const e = err as NodeJS.ErrnoException & {
      host?: string;
      cert?: { subjectaltname?: string };
      reason?: string;
    };
    const code = e.code ?? "";
    const host = dialledHost(target);
    if (code === "ERR_TLS_CERT_ALTNAME_INVALID") {
      const sans = (e.cert?.subjectaltname ?? "").split(", ").filter(Boolean);
      const flag = isIP(host) ? "--ip" : "--dns";
      return new ApiClientError(
        API_CLIENT_CODES.SHOAL_API_TLS_HOST_MISMATCH,
        `the certificate of ${this.url} is valid for ${sans.join(", ") || "no names"} — not ${host}`,
        this.url,
        {
          cause: err,
          fix: `dial one of the names the certificate carries (--api https://NAME:PORT), or reissue the API certificate with ${flag} ${host} (e.g. set API.Host or Orchestrator.Advertise to ${host})`,
          details: { host, sans },
        },
      );
    }
    if (EXPIRED_CODES.has(code)) {
      return new ApiClientError(
        API_CLIENT_CODES.SHOAL_API_TLS_CERT_EXPIRED,
        `the certificate of ${this.url} is ${code === "CERT_HAS_EXPIRED" ? "expired" : "not valid yet"}`,
        this.url,
        {
          cause: err,
          fix: "check this machine's clock; otherwise the orchestrator's API certificate must be renewed (it renews a self-signed or ACME certificate itself; replace API.TLS.CertFile)",
          details: { tlsCode: code },
        },
      );
    }
    if (UNREACHABLE_CODES.has(code)) {
      return new ApiClientError(
        API_CLIENT_CODES.SHOAL_API_UNREACHABLE,
        `cannot reach ${this.url}: ${code}`,
        this.url,
        {
          cause: err,
          fix: `is the orchestrator running at ${this.url}? Start it with \`shoal orchestrator serve\`, or point --api / SHOAL_API at the right host and port`,
          details: { errno: code },
        },
      );
    }
    if (code === "ETIMEDOUT") {
      return new ApiClientError(
        API_CLIENT_CODES.SHOAL_API_TIMEOUT,
        `connecting to ${this.url} timed out`,
        this.url,
        {
          cause: err,
          fix: `check that ${host} is reachable from here and that a firewall lets the port through`,
        },
      );
    }
    if (code === "ABORT_ERR")
      return new ApiClientError(API_CLIENT_CODES.SHOAL_API_TIMEOUT, "request aborted", this.url, {
        cause: err,
      });
    if (code.startsWith("ERR_SSL") || code === "EPROTO" || code.startsWith("ERR_TLS")) {
      return new ApiClientError(
        API_CLIENT_CODES.SHOAL_API_TLS_HANDSHAKE,
        `TLS handshake with ${this.url} failed: ${e.reason ?? e.message}`,
        this.url,
        {
          cause: err,
          fix: /wrong version number|packet length too long|http request/i.test(e.message)
            ? `${this.url} does not speak TLS: check the port (the API listens on API.Port, 1234 by default)`
            : "the API accepts TLS 1.2+ with ECDHE AEAD ciphers only; check for a TLS-intercepting proxy",
          details: { tlsCode: code },
        },
      );
    }
    return new ApiClientError(
      API_CLIENT_CODES.SHOAL_API_UNREACHABLE,
      `request to ${this.url} failed: ${(err as Error).message}`,
      this.url,
      { cause: err, fix: `is the orchestrator running at ${this.url}?` },
    );
  }

  #httpError(res: IncomingMessage, text: string): ShoalError {
    const status = res.statusCode ?? 0;
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = undefined;
    }
    const error = (
      parsed as { error?: { code?: unknown; message?: unknown; fix?: unknown; field?: unknown } }
    )?.error;
    if (error && typeof error.code === "string" && error.code.startsWith("SHOAL_")) {
      return new ApiResponseError(
        error.code,
        typeof error.message === "string" ? error.message : `HTTP ${status}`,
        status,
        {
          ...(typeof error.fix === "string" ? { fix: error.fix } : {}),
          ...(typeof error.field === "string" ? { field: error.field } : {}),
        },
      );
    }
    return new ApiClientError(
      API_CLIENT_CODES.SHOAL_API_HTTP_ERROR,
      `${this.url} answered HTTP ${status}${res.statusMessage ? ` ${res.statusMessage}` : ""}: ${text.slice(0, 200) || "(empty body)"}`,
      this.url,
      {
        fix: "check that --api points at the orchestrator itself (not a proxy or another service) and see the orchestrator's log",
        details: { status },
      },
    );
  }
}

async function readBody(res: IncomingMessage, url: string): Promise<string> {
  res.setEncoding("utf8");
  let text = "";
  try {
    for await (const chunk of res as AsyncIterable<string>) text += chunk;
  } catch (err) {
    throw new ApiClientError(
      API_CLIENT_CODES.SHOAL_API_UNREACHABLE,
      `the connection to ${url} broke mid-reply`,
      url,
      {
        cause: err,
        fix: "retry; if it persists, see the orchestrator's log",
      },
    );
  }
  return text;
}

/**
 * Who issued the certificate a server presents, read over a second handshake
 * that does not verify it (nothing is sent). For error messages only.
 */
function presentedIssuer(target: URL, timeoutMs: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const host = dialledHost(target);
    const socket = tls.connect({
      host,
      port: Number(target.port || 443),
      rejectUnauthorized: false,
      ...(isIP(host) ? {} : { servername: host }),
    });
    const done = (value: string | undefined) => {
      socket.destroy();
      resolve(value);
    };
    socket.setTimeout(Math.min(timeoutMs, 5000), () => done(undefined));
    socket.once("error", () => done(undefined));
    socket.once("secureConnect", () => {
      const raw = socket.getPeerCertificate()?.raw;
      done(raw ? new X509Certificate(raw).issuer.replace(/\n/g, ", ") : undefined);
    });
  });
}

/** The client options `--api`, `--ca-cert` and `--insecure`, for commands that talk to the API. */
export interface ApiArgs {
  api?: string;
  "ca-cert"?: string;
  insecure?: boolean;
}

/** Adds `--api`, `--ca-cert` and `--insecure` to a command. */
export function withApiOptions<T>(yargs: Argv<T>): Argv<T & ApiArgs> {
  return yargs
    .option("api", {
      type: "string",
      describe: `orchestrator API URL [default: $SHOAL_API, else ${DEFAULT_API_URL}]`,
    })
    .option("ca-cert", {
      type: "string",
      describe:
        "CA certificate to trust for the API, e.g. DATA_DIR/pki/ca.crt (API.TLS.CAFile) [default: $SHOAL_API_TLS_CAFILE, else system roots]",
    })
    .option("insecure", {
      type: "boolean",
      describe: "do not verify the API's certificate (dangerous; warns every time) (API.TLS.Insecure)",
    }) as Argv<T & ApiArgs>;
}

/**
 * Client options from the command line, then the config (`API.TLS.CAFile`,
 * `API.TLS.Insecure`), then their environment variables
 * (`SHOAL_API_TLS_CAFILE`, `SHOAL_API_TLS_INSECURE=true`).
 */
export function apiClientOptions(
  argv: ApiArgs,
  config?: { API: { TLS: Pick<ShoalConfig["API"]["TLS"], "CAFile" | "Insecure"> } },
  env: NodeJS.ProcessEnv = process.env,
): ApiClientOptions {
  const caFile = argv["ca-cert"] || config?.API.TLS.CAFile || env.SHOAL_API_TLS_CAFILE || undefined;
  return {
    ...(argv.api ? { url: argv.api } : {}),
    ...(caFile ? { caFile } : {}),
    insecure: argv.insecure ?? config?.API.TLS.Insecure ?? env.SHOAL_API_TLS_INSECURE === "true",
  };
}
