import { X509Certificate } from "node:crypto";
import { type FSWatcher, promises as fs, watch } from "node:fs";
import type { ServerOptions } from "node:https";
import os from "node:os";
import path from "node:path";
import type { SecureContextOptions, Server as TlsServer } from "node:tls";
import { isShoalError, type Logger, type ShoalConfig, ShoalError, silentLogger } from "../core/index.js";
import { openPki, type Pki, writeIssued } from "../pki/index.js";
import { AcmeIssuer, type AcmeIssuerOptions } from "./acme-issuer.js";
import { API_TLS_CODES, ApiTlsError } from "./api-tls-errors.js";
import {
  type ApiTlsSource,
  checkTlsMaterial,
  coversNames,
  loadTlsFiles,
  renewalTime,
  type TlsMaterial,
} from "./api-tls-material.js";
import { type ApiCertificateNames, apiCertificateNames } from "./api-tls-names.js";

export { ACME_CHALLENGE_PATH, AcmeIssuer, type AcmeIssuerOptions } from "./acme-issuer.js";
export { API_TLS_CODES, type ApiTlsCode, ApiTlsError } from "./api-tls-errors.js";
export {
  type ApiTlsSource,
  checkTlsMaterial,
  loadTlsFiles,
  renewalTime,
  type TlsMaterial,
} from "./api-tls-material.js";
export { type ApiCertificateNames, apiCertificateNames, canonicalIp } from "./api-tls-names.js";

/**
 * TLS settings of the HTTPS API: TLS 1.2 at least; for 1.2 only ECDHE key
 * exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305), so every session has
 * forward secrecy and no CBC/SHA-1/3DES/RSA-kex suite is offered; the server's
 * order wins. TLS 1.3 suites are all AEAD.
 */
export const DEFAULT_API_TLS_OPTIONS = Object.freeze({
  minVersion: "TLSv1.2",
  ciphers: [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
  ].join(":"),
  honorCipherOrder: true,
} satisfies SecureContextOptions);

/** @default 90 days: lifetime of a self-signed (built-in PKI) API certificate. */
export const DEFAULT_API_CERT_TTL_MS = 90 * 86_400_000;
/** @default 2/3: renew once this fraction of a certificate's lifetime has passed. */
export const DEFAULT_RENEW_FRACTION = 2 / 3;
/** @default 60 s: first retry delay after a failed renewal (doubles up to an hour). */
export const DEFAULT_RENEW_RETRY_MS = 60_000;
/** @default 250 ms: file changes within this window cause one reload. */
export const DEFAULT_RELOAD_DEBOUNCE_MS = 250;

const MAX_TIMER_MS = 2 ** 31 - 1;

/** What the manager reports, as data. */
export type ApiTlsEvent =
  | {
      type: "loaded";
      source: ApiTlsSource;
      reason: "start" | "reload" | "renewal";
      fingerprint: string;
      serial: string;
      notAfter: Date;
      sans: readonly string[];
    }
  | { type: "reload-failed"; code: string; message: string; keptFingerprint: string }
  | { type: "renewal-failed"; code: string; message: string; keptFingerprint: string; retryAt: Date };

/** The outcome of {@link ApiTlsManager.reload}: it never throws for a bad certificate. */
export type ReloadResult =
  | { ok: true; changed: boolean; material: TlsMaterial }
  | { ok: false; error: ShoalError; material: TlsMaterial };

/** The part of the config the manager reads. */
export type ApiTlsConfig = {
  Host: ShoalConfig["API"]["Host"];
  TLS: Pick<
    ShoalConfig["API"]["TLS"],
    "CertFile" | "KeyFile" | "SelfSigned" | "AutoCert" | "AutoCertDirectory" | "AutoCertCachePath"
  >;
};

export interface ApiTlsManagerOptions {
  /** `API.Host` and `API.TLS.*` of the loaded config. */
  api: ApiTlsConfig;
  /** The data directory: default home of the PKI, the self-signed certificate and the ACME cache. */
  dataDir: string;
  /** The fabric PKI (open, or its directory) that issues the self-signed certificate. @default DATA-DIR/pki */
  pki?: Pki | string;
  /** Further names or addresses clients dial (e.g. `Orchestrator.Advertise`, a load balancer name). */
  advertise?: readonly string[];
  /** @default silentLogger */
  log?: Logger;
  /** Lifetime of a self-signed API certificate (capped at the issuing CA's). @default DEFAULT_API_CERT_TTL_MS */
  certTtlMs?: number;
  /** Fraction of a certificate's lifetime after which it is renewed (self-signed and ACME). @default 2/3 */
  renewFraction?: number;
  /** @default DEFAULT_RENEW_RETRY_MS */
  renewRetryMs?: number;
  /** @default DEFAULT_RELOAD_DEBOUNCE_MS */
  reloadDebounceMs?: number;
  /** ACME details not in the config (challenge listener, test CA trust). */
  acme?: Partial<
    Pick<
      AcmeIssuerOptions,
      "challengeHost" | "challengePort" | "challengeIdleMs" | "directoryCaPem" | "email" | "pollMinMs"
    >
  >;
  /** The clock. @default () => new Date() */
  now?: () => Date;
  /** This host's name. @default os.hostname */
  hostname?: () => string;
  /** This host's interfaces. @default os.networkInterfaces */
  networkInterfaces?: () => NodeJS.Dict<os.NetworkInterfaceInfo[]>;
}

/** Where a certificate comes from; one per mode. */
interface CertificateSource {
  readonly kind: ApiTlsSource;
  start(): Promise<void>;
  /** Fresh material, or `current` while it is still good; `force` always makes a new one. */
  provide(current: TlsMaterial | undefined, now: Date, force: boolean): Promise<TlsMaterial>;
  /** When to look again (renewal); undefined when only file changes matter. */
  nextCheck(m: TlsMaterial): Date | undefined;
  /** Files whose changes trigger a reload. */
  readonly watched: readonly string[];
  close(): Promise<void>;
}

/**
 * Provides the HTTPS API's certificate from operator files, the built-in PKI
 * or ACME, and swaps it on live servers (`setSecureContext`) on reload, file
 * change or renewal without dropping a request: open connections keep the
 * certificate they negotiated, new ones get the new one. A bad new certificate
 * is logged with its code and the old one kept.
 *
 * Use: `await m.start()`, create the server with {@link serverOptions}, then
 * {@link attach} it; wire SIGHUP to {@link reload}.
 */
export class ApiTlsManager implements AsyncDisposable {
  readonly #o: ApiTlsManagerOptions;
  readonly #log: Logger;
  readonly #now: () => Date;
  readonly #servers = new Set<TlsServer>();
  readonly #listeners = new Set<(e: ApiTlsEvent) => void>();
  readonly #watchers: FSWatcher[] = [];
  #source: CertificateSource | undefined;
  #material: TlsMaterial | undefined;
  #queue: Promise<unknown> = Promise.resolve();
  #timer: NodeJS.Timeout | undefined;
  #debounce: NodeJS.Timeout | undefined;
  #retryMs: number;
  #closing: Promise<void> | undefined;
  #error: Error | undefined;
  readonly #closed: Promise<Error | undefined>;
  #resolveClosed: (err: Error | undefined) => void = () => {};

  constructor(options: ApiTlsManagerOptions) {
    this.#o = options;
    this.#log = (options.log ?? silentLogger).child({ component: "api-tls" });
    this.#now = options.now ?? (() => new Date());
    this.#retryMs = options.renewRetryMs ?? DEFAULT_RENEW_RETRY_MS;
    this.#closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
    const fraction = options.renewFraction ?? DEFAULT_RENEW_FRACTION;
    if (!(fraction >= 0 && fraction <= 1)) {
      throw new ApiTlsError(
        API_TLS_CODES.SHOAL_API_TLS_CONFIG,
        `renewFraction must be in [0, 1], not ${fraction}`,
      );
    }
  }

  /** The certificate being served (after {@link start}). */
  get current(): TlsMaterial {
    if (!this.#material) throw new ShoalError("SHOAL_INTERNAL", "ApiTlsManager used before start()");
    return this.#material;
  }

  /** Which source is in use (after {@link start}). */
  get source(): ApiTlsSource | undefined {
    return this.#source?.kind;
  }

  /** The ACME issuer, in AutoCert mode (e.g. to learn the challenge listener's address). */
  get acme(): AcmeIssuer | undefined {
    return this.#source instanceof AcmeSource ? this.#source.issuer : undefined;
  }

  /** Picks the source from the config, obtains the first certificate, and starts watching/renewing. */
  async start(): Promise<void> {
    const source = this.#pickSource();
    await source.start();
    try {
      const material = await source.provide(undefined, this.#now(), false);
      this.#source = source;
      this.#swap(material, "start");
    } catch (err) {
      await source.close();
      throw err;
    }
    for (const dir of await watchedDirectories(source.watched)) {
      const w = watch(dir, { persistent: false }, () => this.#scheduleReload());
      w.on("error", (err) =>
        this.#log.warn({ dir, err: err.message }, "cannot watch for certificate changes"),
      );
      this.#watchers.push(w);
    }
    this.#schedule();
  }

  #pickSource(): CertificateSource {
    const tls = this.#o.api.TLS;
    const now = this.#now;
    if (tls.CertFile || tls.KeyFile) {
      if (!tls.CertFile || !tls.KeyFile) {
        throw new ApiTlsError(
          API_TLS_CODES.SHOAL_API_TLS_CONFIG,
          `API.TLS.${tls.CertFile ? "KeyFile" : "CertFile"} is empty while API.TLS.${tls.CertFile ? "CertFile" : "KeyFile"} is set`,
          {
            fix: "set both API.TLS.CertFile and API.TLS.KeyFile, or neither (to use SelfSigned or AutoCert)",
          },
        );
      }
      if (tls.AutoCert) {
        throw new ApiTlsError(
          API_TLS_CODES.SHOAL_API_TLS_CONFIG,
          "API.TLS.CertFile/KeyFile and API.TLS.AutoCert are both set",
          { fix: "choose one: operator files (CertFile/KeyFile) or ACME (AutoCert)" },
        );
      }
      return new FileSource(path.resolve(tls.CertFile), path.resolve(tls.KeyFile));
    }
    const fraction = this.#o.renewFraction ?? DEFAULT_RENEW_FRACTION;
    if (tls.AutoCert) {
      const issuer = new AcmeIssuer({
        ...this.#o.acme,
        challengeHost: this.#o.acme?.challengeHost ?? this.#o.api.Host,
        domain: tls.AutoCert.toLowerCase(),
        directoryUrl: tls.AutoCertDirectory,
        cachePath: path.resolve(tls.AutoCertCachePath || path.join(this.#o.dataDir, "autocert")),
        log: this.#log,
        now,
      });
      return new AcmeSource(issuer, fraction, this.#log);
    }
    if (tls.SelfSigned) {
      return new SelfSignedSource({
        pki: this.#o.pki ?? path.join(this.#o.dataDir, "pki"),
        prefix: path.join(this.#o.dataDir, "api-tls", "server"),
        ttlMs: this.#o.certTtlMs ?? DEFAULT_API_CERT_TTL_MS,
        fraction,
        names: () => {
          const names = apiCertificateNames({
            host: this.#o.api.Host,
            hostname: (this.#o.hostname ?? os.hostname)(),
            interfaces: (this.#o.networkInterfaces ?? os.networkInterfaces)(),
            advertise: this.#o.advertise ?? [],
          });
          if (names.skipped.length > 0) {
            this.#log.warn(
              { skipped: names.skipped },
              "names left out of the API certificate: not valid DNS names",
            );
          }
          return names;
        },
        log: this.#log,
        now,
      });
    }
    throw new ApiTlsError(API_TLS_CODES.SHOAL_API_TLS_CONFIG, "the API has no TLS certificate source", {
      fix: "set API.TLS.CertFile and API.TLS.KeyFile, or API.TLS.AutoCert, or leave API.TLS.SelfSigned=true (the API serves HTTPS only)",
    });
  }

  /** Options for `https.createServer`: the current certificate plus {@link DEFAULT_API_TLS_OPTIONS}. */
  serverOptions(): ServerOptions {
    return this.#contextOptions(this.current);
  }

  #contextOptions(m: TlsMaterial): SecureContextOptions {
    return { ...DEFAULT_API_TLS_OPTIONS, cert: m.certPem, key: m.keyPem };
  }

  /**
   * Keeps `server`'s certificate current: set now and on every later swap,
   * until the server closes. For fastify, pass `fastify.server`.
   */
  attach(server: TlsServer): void {
    server.setSecureContext(this.#contextOptions(this.current));
    this.#servers.add(server);
    server.once("close", () => this.#servers.delete(server));
  }

  /**
   * Looks again now: re-reads operator files, or re-checks the names and age of
   * a PKI/ACME certificate and renews it if due. A bad new certificate is logged
   * with its code and the old one kept. Wire SIGHUP here.
   */
  reload(): Promise<ReloadResult> {
    return this.#serialize(() => this.#refresh("reload", false));
  }

  /** Obtains a new certificate now (PKI or ACME) even if the current one is not due. */
  renew(): Promise<ReloadResult> {
    return this.#serialize(() => this.#refresh("renewal", true));
  }

  /** Calls `listener` for every event until the manager closes; returns the unsubscribe function. */
  onEvent(listener: (e: ApiTlsEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** The events as an async iterable that ends when the manager closes. */
  async *status(): AsyncIterable<ApiTlsEvent> {
    const queue: ApiTlsEvent[] = [];
    let wake: (() => void) | undefined;
    const off = this.onEvent((e) => {
      queue.push(e);
      wake?.();
    });
    void this.#closed.then(() => wake?.());
    try {
      for (;;) {
        const next = queue.shift();
        if (next) {
          yield next;
          continue;
        }
        if (this.#closing) return;
        await new Promise<void>((resolve) => {
          wake = resolve;
        });
        wake = undefined;
      }
    } finally {
      off();
    }
  }

  #serialize<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(fn, fn);
    this.#queue = run.catch(() => {});
    return run;
  }

  async #refresh(reason: "reload" | "renewal", force: boolean): Promise<ReloadResult> {
    const source = this.#source;
    const old = this.current;
    if (!source || this.#closing) return { ok: true, changed: false, material: old };
    try {
      const next = await source.provide(old, this.#now(), force);
      const changed = next.certPem !== old.certPem || next.keyPem !== old.keyPem;
      if (changed) this.#swap(next, reason);
      if (changed) this.#retryMs = this.#o.renewRetryMs ?? DEFAULT_RENEW_RETRY_MS;
      this.#schedule();
      return { ok: true, changed, material: this.current };
    } catch (err) {
      const error = isShoalError(err)
        ? err
        : new ShoalError("SHOAL_INTERNAL", `certificate ${reason} failed: ${(err as Error).message}`, {
            cause: err,
          });
      const base = { code: error.code, message: error.message, keptFingerprint: old.fingerprint };
      if (source.kind === "files") {
        this.#log.error(
          { ...base, fix: error.fix },
          "API certificate reload failed; keeping the current one",
        );
        this.#emit({ type: "reload-failed", ...base });
      } else {
        const retryAt = new Date(this.#now().getTime() + this.#retryMs);
        this.#log.error(
          { ...base, fix: error.fix, retryAt },
          "API certificate renewal failed; keeping the current one",
        );
        this.#emit({ type: "renewal-failed", ...base, retryAt });
        this.#retry();
      }
      return { ok: false, error, material: old };
    }
  }

  #swap(m: TlsMaterial, reason: "start" | "reload" | "renewal"): void {
    this.#material = m;
    for (const server of this.#servers) server.setSecureContext(this.#contextOptions(m));
    const { source, fingerprint, serial, notAfter, sans } = m;
    this.#log.info({ source, reason, fingerprint, serial, notAfter, sans }, "API certificate in use");
    this.#emit({ type: "loaded", source, reason, fingerprint, serial, notAfter, sans });
  }

  #emit(e: ApiTlsEvent): void {
    for (const l of this.#listeners) l(e);
  }

  #scheduleReload(): void {
    if (this.#closing) return;
    clearTimeout(this.#debounce);
    this.#debounce = setTimeout(
      () => void this.reload(),
      this.#o.reloadDebounceMs ?? DEFAULT_RELOAD_DEBOUNCE_MS,
    );
    this.#debounce.unref();
  }

  /** Arms the renewal timer for the current certificate; one already due (a failed renewal) is retried with backoff. */
  #schedule(): void {
    const at = this.#source?.nextCheck(this.current);
    if (!at) return;
    const delay = at.getTime() - this.#now().getTime();
    if (delay > 0) this.#arm(delay);
    else this.#retry();
  }

  #retry(): void {
    this.#arm(this.#retryMs);
    this.#retryMs = Math.min(this.#retryMs * 2, 3_600_000);
  }

  #arm(delayMs: number): void {
    if (this.#closing) return;
    clearTimeout(this.#timer);
    // Long delays are split: the timer fires early and #refresh re-checks the age.
    this.#timer = setTimeout(
      () => void this.#serialize(() => this.#refresh("renewal", false)),
      Math.min(delayMs, MAX_TIMER_MS),
    );
    this.#timer.unref();
  }

  /** Stops timers and watchers and the ACME challenge listener. Idempotent; the same promise each time. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      clearTimeout(this.#timer);
      clearTimeout(this.#debounce);
      for (const w of this.#watchers) w.close();
      this.#servers.clear();
      await this.#queue;
      await this.#source?.close().catch((err: Error) => {
        this.#error = err;
      });
      this.#listeners.clear();
      this.#resolveClosed(this.#error);
    })();
    return this.#closing;
  }

  /** Resolves once closed, to the error met while closing, if any; never rejects. */
  closed(): Promise<Error | undefined> {
    return this.#closed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** The directories to watch for `files`: each file's own and, for a symlink, its target's. */
async function watchedDirectories(files: readonly string[]): Promise<string[]> {
  const dirs = new Set<string>();
  for (const f of files) {
    dirs.add(path.dirname(f));
    const real = await fs.realpath(f).catch(() => f);
    dirs.add(path.dirname(real));
  }
  return [...dirs];
}

/** Operator files (`API.TLS.CertFile`/`KeyFile`), re-read on change or reload. */
class FileSource implements CertificateSource {
  readonly kind = "files";
  readonly watched: readonly string[];

  constructor(
    readonly certFile: string,
    readonly keyFile: string,
  ) {
    this.watched = [certFile, keyFile];
  }

  async start(): Promise<void> {}

  provide(_current: TlsMaterial | undefined, now: Date): Promise<TlsMaterial> {
    return loadTlsFiles(this.certFile, this.keyFile, "files", now);
  }

  nextCheck(): Date | undefined {
    return undefined;
  }

  async close(): Promise<void> {}
}

/** A server certificate from the fabric PKI, kept at PREFIX.crt/.key and renewed at `fraction` of its life. */
class SelfSignedSource implements CertificateSource {
  readonly kind = "self-signed";
  readonly watched: readonly string[] = [];
  #pki: Pki | undefined;

  constructor(
    private readonly o: {
      pki: Pki | string;
      prefix: string;
      ttlMs: number;
      fraction: number;
      names: () => ApiCertificateNames;
      log: Logger;
      now: () => Date;
    },
  ) {}

  async start(): Promise<void> {
    this.#pki = typeof this.o.pki === "string" ? await openPki(this.o.pki, { now: this.o.now }) : this.o.pki;
  }

  async provide(current: TlsMaterial | undefined, now: Date, force: boolean): Promise<TlsMaterial> {
    const pki = this.#pki!;
    const names = this.o.names();
    const usable = (m: TlsMaterial | undefined): m is TlsMaterial =>
      m !== undefined && coversNames(m, names) && now < renewalTime(m, this.o.fraction) && issuedBy(m, pki);
    if (!force && usable(current)) return current;
    if (!force && current === undefined) {
      const stored = await this.#stored(now);
      if (usable(stored)) return stored;
    }
    try {
      const notAfter = new Date(Math.min(now.getTime() + this.o.ttlMs, pki.issuerNotAfter.getTime()));
      const issued = await pki.issue({ role: "server", id: "api", dns: names.dns, ip: names.ip, notAfter });
      await fs.mkdir(path.dirname(this.o.prefix), { recursive: true, mode: 0o700 });
      await writeIssued(this.o.prefix, issued);
      return checkTlsMaterial(issued.certPem, issued.keyPem!, "self-signed", now, {
        cert: `${this.o.prefix}.crt`,
        key: `${this.o.prefix}.key`,
      });
    } catch (err) {
      throw new ApiTlsError(
        API_TLS_CODES.SHOAL_API_TLS_ISSUE_FAILED,
        `the built-in PKI (${pki.dir}) could not issue the API certificate: ${(err as Error).message}`,
        {
          cause: err,
          fix: isShoalError(err) && err.fix ? err.fix : "check the PKI directory's files and permissions",
        },
      );
    }
  }

  async #stored(now: Date): Promise<TlsMaterial | undefined> {
    const { prefix } = this.o;
    const present = await fs.access(`${prefix}.crt`).then(
      () => true,
      () => false,
    );
    if (!present) return undefined;
    try {
      return await loadTlsFiles(`${prefix}.crt`, `${prefix}.key`, "self-signed", now);
    } catch (err) {
      this.o.log.warn(
        { code: (err as ShoalError).code, err: (err as Error).message },
        "stored API certificate unusable; issuing a new one",
      );
      return undefined;
    }
  }

  nextCheck(m: TlsMaterial): Date {
    return renewalTime(m, this.o.fraction);
  }

  async close(): Promise<void> {}
}

/** True when `m`'s leaf was signed by the PKI's issuing CA (a stored certificate from another PKI is replaced). */
function issuedBy(m: TlsMaterial, pki: Pki): boolean {
  const leaf = new X509Certificate(m.certPem);
  const issuer = new X509Certificate(pki.issuerCertPem);
  return leaf.checkIssued(issuer) && leaf.verify(issuer.publicKey);
}

/** An ACME certificate for `API.TLS.AutoCert`, cached, renewed at `fraction` of its life. */
class AcmeSource implements CertificateSource {
  readonly kind = "acme";
  readonly watched: readonly string[] = [];

  constructor(
    readonly issuer: AcmeIssuer,
    private readonly fraction: number,
    private readonly log: Logger,
  ) {}

  start(): Promise<void> {
    return this.issuer.start();
  }

  async provide(current: TlsMaterial | undefined, now: Date, force: boolean): Promise<TlsMaterial> {
    const have = current ?? (await this.issuer.cached(now));
    if (!force && have && now < renewalTime(have, this.fraction)) return have;
    try {
      return await this.issuer.obtain();
    } catch (err) {
      // A still-valid certificate keeps serving at start-up; renewal retries later.
      if (current === undefined && have && now < have.notAfter) {
        this.log.error(
          { code: (err as ShoalError).code, err: (err as Error).message, notAfter: have.notAfter },
          "ACME renewal failed at start-up; serving the cached certificate until it can be renewed",
        );
        return have;
      }
      throw err;
    }
  }

  nextCheck(m: TlsMaterial): Date {
    return renewalTime(m, this.fraction);
  }

  close(): Promise<void> {
    return this.issuer.close();
  }
}
