import { promises as fs } from "node:fs";
import http from "node:http";
import https from "node:https";
import type { AddressInfo } from "node:net";
import path from "node:path";
import acme from "acme-client";
import { FileWriteError, type Logger, writeFileAtomic } from "../core/index.js";
import { API_TLS_CODES, ApiTlsError } from "./api-tls-errors.js";
import { checkTlsMaterial, type TlsMaterial } from "./api-tls-material.js";

/** Path prefix of HTTP-01 challenge responses (RFC 8555 §8.3). */
export const ACME_CHALLENGE_PATH = "/.well-known/acme-challenge/";

/** Settings of {@link AcmeIssuer}. */
export interface AcmeIssuerOptions {
  /** The domain to obtain a certificate for (`API.TLS.AutoCert`). */
  domain: string;
  /** ACME directory URL (`API.TLS.AutoCertDirectory`). */
  directoryUrl: string;
  /** Directory holding the account key and the certificate (`API.TLS.AutoCertCachePath`), created 0700. */
  cachePath: string;
  /** Address the HTTP-01 challenge listener binds. @default "0.0.0.0" */
  challengeHost?: string;
  /**
   * Port of the HTTP-01 challenge listener. The CA dials port 80 of the domain, so
   * anything else needs a port forward (or a test CA configured to dial it); 0 picks a free port.
   * @default 80
   */
  challengePort?: number;
  /**
   * PEM CA certificate(s) to trust for the ACME directory's own HTTPS, instead of
   * the system roots. For test CAs (pebble) only. acme-client keeps one HTTP
   * client per process, so this applies to every ACME request of the process.
   */
  directoryCaPem?: string;
  /**
   * How long a connection to the challenge listener may stay silent before it
   * is closed (the CA's requests are answered at once, so anything longer is a
   * caller holding connections open). @default 10000
   */
  challengeIdleMs?: number;
  /** Contact address given to the CA when the account is created. */
  email?: string;
  /** First delay when polling the CA for an order's progress. @default 1000 */
  pollMinMs?: number;
  log: Logger;
  /** The clock. @default () => new Date() */
  now?: () => Date;
}

const ACCOUNT_KEY_FILE = "account.key";
/** The account URL the CA gave, with the directory it belongs to. */
const ACCOUNT_FILE = "account.json";

/**
 * Obtains certificates for one domain over ACME (HTTP-01) with acme-client, and
 * keeps the account key and the latest certificate in a cache directory (0600
 * files) so a restart reuses them. Runs the HTTP listener that answers the CA's
 * challenges for as long as it is open.
 */
export class AcmeIssuer {
  readonly #o: AcmeIssuerOptions;
  readonly #tokens = new Map<string, string>();
  #server: http.Server | undefined;

  constructor(options: AcmeIssuerOptions) {
    this.#o = options;
  }

  /** The cached certificate chain file. */
  get certFile(): string {
    return path.join(this.#o.cachePath, `${this.#o.domain}.crt`);
  }

  /** The cached private key file (0600). */
  get keyFile(): string {
    return path.join(this.#o.cachePath, `${this.#o.domain}.key`);
  }

  /** Where the challenge listener is bound, once started. */
  get challengeAddress(): AddressInfo | undefined {
    return (this.#server?.address() as AddressInfo | null) ?? undefined;
  }

  /** Creates the cache directory and binds the HTTP-01 challenge listener. */
  async start(): Promise<void> {
    try {
      await fs.mkdir(this.#o.cachePath, { recursive: true, mode: 0o700 });
    } catch (err) {
      throw new FileWriteError(this.#o.cachePath, err);
    }
    if (this.#o.directoryCaPem) {
      acme.axios.defaults.httpsAgent = new https.Agent({ ca: this.#o.directoryCaPem, minVersion: "TLSv1.2" });
    }
    const idleMs = this.#o.challengeIdleMs ?? 10_000;
    const server = http.createServer(
      { headersTimeout: idleMs, requestTimeout: idleMs, connectionsCheckingInterval: Math.min(idleMs, 1000) },
      (req, res) => this.#answer(req, res),
    );
    // Node's header timeout starts with a request's first byte; a connection that sends none waits for this.
    server.setTimeout(idleMs);
    const host = this.#o.challengeHost ?? "0.0.0.0";
    const port = this.#o.challengePort ?? 80;
    await new Promise<void>((resolve, reject) => {
      server.once("error", (err) =>
        reject(
          new ApiTlsError(
            API_TLS_CODES.SHOAL_API_TLS_CHALLENGE_LISTEN,
            `cannot listen on ${host}:${port} for ACME HTTP-01 challenges: ${(err as NodeJS.ErrnoException).code ?? err.message}`,
            {
              cause: err,
              fix:
                port < 1024
                  ? "free the port, or run the orchestrator with CAP_NET_BIND_SERVICE (ports below 1024 need it)"
                  : "free the port or choose another challenge port",
            },
          ),
        ),
      );
      server.listen(port, host, () => resolve());
    });
    this.#server = server;
  }

  #answer(req: http.IncomingMessage, res: http.ServerResponse): void {
    const url = req.url ?? "";
    const token = url.startsWith(ACME_CHALLENGE_PATH) ? url.slice(ACME_CHALLENGE_PATH.length) : undefined;
    const keyAuthorization = token === undefined ? undefined : this.#tokens.get(token);
    if (req.method !== "GET" || keyAuthorization === undefined) {
      res
        .writeHead(404, { "content-type": "text/plain" })
        .end("not found: this listener only answers ACME challenges\n");
      return;
    }
    res.writeHead(200, { "content-type": "application/octet-stream" }).end(keyAuthorization);
  }

  /**
   * The cached certificate, checked (parses, key matches, in its validity window,
   * names the domain); undefined when there is none or it is unusable, which is
   * logged with its code so the operator sees why a new one is ordered.
   */
  async cached(now: Date): Promise<TlsMaterial | undefined> {
    const [certPem, keyPem] = await Promise.all([
      fs.readFile(this.certFile, "utf8").catch(() => undefined),
      fs.readFile(this.keyFile, "utf8").catch(() => undefined),
    ]);
    if (certPem === undefined || keyPem === undefined) return undefined;
    try {
      const m = checkTlsMaterial(certPem, keyPem, "acme", now, { cert: this.certFile, key: this.keyFile });
      if (!m.sans.includes(`DNS:${this.#o.domain.toLowerCase()}`)) {
        this.#o.log.warn(
          { file: this.certFile, sans: m.sans },
          "cached ACME certificate is for other names; ordering a new one",
        );
        return undefined;
      }
      return m;
    } catch (err) {
      this.#o.log.warn(
        { code: (err as ApiTlsError).code, err: (err as Error).message },
        "cached ACME certificate unusable; ordering a new one",
      );
      return undefined;
    }
  }

  /** Orders a new certificate, answers its HTTP-01 challenge, and caches the result. */
  async obtain(): Promise<TlsMaterial> {
    const { domain, directoryUrl } = this.#o;
    const log = this.#o.log;
    await this.#reachDirectory();
    const account = await this.#account();
    try {
      const client = new acme.Client({
        directoryUrl,
        accountKey: account.key,
        ...(account.url ? { accountUrl: account.url } : {}),
        backoffMin: this.#o.pollMinMs ?? 1000,
        backoffMax: Math.max(this.#o.pollMinMs ?? 1000, 10_000),
      });
      const [keyPem, csr] = await acme.crypto.createCsr(
        { commonName: domain, altNames: [domain] },
        await acme.crypto.createPrivateEcdsaKey(),
      );
      log.info({ domain, directoryUrl }, "ordering ACME certificate");
      const certPem = await client.auto({
        csr,
        ...(this.#o.email ? { email: this.#o.email } : {}),
        termsOfServiceAgreed: true,
        challengePriority: ["http-01"],
        // acme-client's self-check dials the domain on port 80 through a process-wide
        // setting; the CA's own validation is the one that counts and names the cause.
        skipChallengeVerification: true,
        challengeCreateFn: async (_authz, challenge, keyAuthorization) => {
          this.#tokens.set(challenge.token, keyAuthorization);
        },
        challengeRemoveFn: async (_authz, challenge) => {
          this.#tokens.delete(challenge.token);
        },
      });
      if (!account.url) await this.#saveAccountUrl(client.getAccountUrl());
      const now = (this.#o.now ?? (() => new Date()))();
      const material = checkTlsMaterial(certPem, keyPem.toString("utf8"), "acme", now, {
        cert: `the certificate from ${directoryUrl}`,
        key: "the key generated for it",
      });
      // Key first: a crash between the two writes leaves a mismatched pair, which
      // cached() rejects, rather than a new certificate without its key.
      await writeFileAtomic(this.keyFile, material.keyPem, 0o600);
      await writeFileAtomic(this.certFile, material.certPem, 0o600);
      log.info({ domain, serial: material.serial, notAfter: material.notAfter }, "ACME certificate obtained");
      return material;
    } catch (err) {
      if (err instanceof ApiTlsError || err instanceof FileWriteError) throw err;
      // The CA may have forgotten the account (a reset test CA): register afresh next time.
      if (account.url) await fs.rm(path.join(this.#o.cachePath, ACCOUNT_FILE), { force: true });
      throw new ApiTlsError(
        API_TLS_CODES.SHOAL_API_TLS_ACME_FAILED,
        `ACME order for ${domain} at ${directoryUrl} failed: ${(err as Error).message}`,
        {
          cause: err,
          fix: `check that ${domain} resolves to this host and that the CA reaches the challenge listener (${this.#describeListener()}) on port 80 of ${domain}`,
        },
      );
    }
  }

  /**
   * Fetches the directory once with node's own client, so an unreachable or
   * untrusted CA gets a precise error (acme-client 5.4 turns network errors
   * into "Cannot read properties of undefined").
   */
  async #reachDirectory(): Promise<void> {
    const { directoryUrl } = this.#o;
    const fail = (why: string, cause?: unknown) =>
      new ApiTlsError(
        API_TLS_CODES.SHOAL_API_TLS_ACME_FAILED,
        `cannot reach the ACME directory ${directoryUrl}: ${why}`,
        {
          cause,
          fix: "check API.TLS.AutoCertDirectory and that this host may make outbound HTTPS requests to it",
        },
      );
    await new Promise<void>((resolve, reject) => {
      const req = https.get(
        directoryUrl,
        { timeout: 30_000, ...(this.#o.directoryCaPem ? { ca: this.#o.directoryCaPem } : {}) },
        (res) => {
          res.resume();
          if (res.statusCode === 200) resolve();
          else reject(fail(`HTTP ${res.statusCode}`));
        },
      );
      req.on("timeout", () => req.destroy(new Error("no answer within 30 s")));
      req.on("error", (err: NodeJS.ErrnoException) => reject(fail(err.code ?? err.message, err)));
    });
  }

  #describeListener(): string {
    const a = this.challengeAddress;
    return a ? `${a.address}:${a.port}` : "not listening";
  }

  /**
   * The cached account key (a new one is written 0600; an unreadable one is
   * replaced and logged) and, when known for this directory, the account URL.
   * Passing the URL skips acme-client's re-registration, which sends an account
   * update that some CAs (pebble) refuse.
   */
  async #account(): Promise<{ key: string; url?: string }> {
    const file = path.join(this.#o.cachePath, ACCOUNT_KEY_FILE);
    let key = await fs.readFile(file, "utf8").catch(() => undefined);
    if (!key?.includes("PRIVATE KEY")) {
      if (key !== undefined)
        this.#o.log.warn({ file }, "ACME account key unreadable; creating a new account");
      key = (await acme.crypto.createPrivateEcdsaKey()).toString("utf8");
      await writeFileAtomic(file, key, 0o600);
      await fs.rm(path.join(this.#o.cachePath, ACCOUNT_FILE), { force: true });
      return { key };
    }
    const saved = await fs
      .readFile(path.join(this.#o.cachePath, ACCOUNT_FILE), "utf8")
      .then((t) => JSON.parse(t) as { directoryUrl?: unknown; url?: unknown })
      .catch(() => undefined);
    return saved?.directoryUrl === this.#o.directoryUrl && typeof saved.url === "string"
      ? { key, url: saved.url }
      : { key };
  }

  async #saveAccountUrl(url: string): Promise<void> {
    const record = { directoryUrl: this.#o.directoryUrl, url };
    await writeFileAtomic(path.join(this.#o.cachePath, ACCOUNT_FILE), `${JSON.stringify(record)}\n`, 0o600);
  }

  /** Stops the challenge listener. */
  async close(): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    if (!server) return;
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
  }
}
