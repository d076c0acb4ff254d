import { createPrivateKey, randomBytes, X509Certificate } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import { type Logger, silentLogger } from "../core/index.js";
import {
  certificateRenewalTime,
  createCsr,
  exportPrivateKey,
  generatePrivateKey,
  keyTypeOf,
} from "../pki/index.js";
import { COMPUTE_CODES, ComputeError } from "./errors.js";
import { loadNodeIdentity, type NodeIdentity } from "./node-identity.js";

/** First retry after a failed renewal; doubles up to {@link MAX_RENEW_RETRY_MS}, never past expiry. @default 1 s */
export const DEFAULT_RENEW_RETRY_MS = 1000;
/** @default 30 s */
export const MAX_RENEW_RETRY_MS = 30_000;
const MAX_TIMER_MS = 2 ** 31 - 1;

export interface CertificateRenewerOptions {
  /** The identity in use now (its files are replaced on renewal). */
  identity: NodeIdentity;
  /** PKI.RenewBefore: renew this long before expiry (at most a third of the certificate's life ahead). */
  renewBeforeMs: number;
  /** Sends the CSR (a signed `renew` request) and resolves to the new chain, or rejects. */
  request: (csrPem: string) => Promise<string>;
  /** The new identity is on disk; switch to it (signer, reconnect). */
  onRenewed: (identity: NodeIdentity) => Promise<void>;
  /** The certificate expired before a renewal succeeded; the node cannot reconnect. */
  onExpired: (error: ComputeError) => void;
  /** @default DEFAULT_RENEW_RETRY_MS */
  retryBaseMs?: number;
  log?: Logger;
  /** @default Date.now */
  now?: () => number;
}

/** What a renewal attempt did, as data. */
export type RenewalOutcome =
  | { ok: true; identity: NodeIdentity }
  | { ok: false; error: Error; retryAt: Date };

/**
 * Keeps a compute node's certificate valid: at its renewal time it makes a
 * NEW key (same type), sends a CSR for the same identity, checks the chain it
 * gets back (chains to the CA, same SPIFFE id, matches the new key), and only
 * then replaces the files — the key 0600 — each by rename, so the old key is
 * gone from disk and a reader never sees half a file. A failure (orchestrator
 * offline, refused) keeps the current files and retries with backoff until
 * the certificate expires; then {@link CertificateRenewerOptions.onExpired}
 * gets SHOAL_COMPUTE_CERT_EXPIRED naming how to re-enroll.
 */
export class CertificateRenewer {
  readonly #o: CertificateRenewerOptions;
  readonly #log: Logger;
  readonly #now: () => number;
  #identity: NodeIdentity;
  #timer: NodeJS.Timeout | undefined;
  #retryMs: number;
  #running: Promise<unknown> = Promise.resolve();
  #closed = false;

  constructor(o: CertificateRenewerOptions) {
    this.#o = o;
    this.#identity = o.identity;
    this.#log = (o.log ?? silentLogger).child({ component: "certificate-renewal" });
    this.#now = o.now ?? Date.now;
    this.#retryMs = o.retryBaseMs ?? DEFAULT_RENEW_RETRY_MS;
  }

  /** When the current certificate is due. */
  get renewAt(): Date {
    const leaf = new X509Certificate(this.#identity.chainPem);
    return certificateRenewalTime(new Date(leaf.validFrom), new Date(leaf.validTo), this.#o.renewBeforeMs);
  }

  /** Arms the timer for the current certificate. */
  start(): void {
    this.#arm(this.renewAt.getTime() - this.#now());
  }

  /** Renews now (serialized with the timer's attempts). */
  renewNow(): Promise<RenewalOutcome> {
    const run = this.#running.then(() => this.#attempt());
    this.#running = run.catch(() => {});
    return run;
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    await this.#running;
  }

  #arm(delayMs: number): void {
    if (this.#closed) return;
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => void this.renewNow(), Math.min(Math.max(delayMs, 0), MAX_TIMER_MS));
    this.#timer.unref();
  }

  async #attempt(): Promise<RenewalOutcome> {
    const current = this.#identity;
    if (this.#closed) return { ok: true, identity: current };
    try {
      const identity = await this.#renew(current);
      this.#identity = identity;
      this.#retryMs = this.#o.retryBaseMs ?? DEFAULT_RENEW_RETRY_MS;
      this.#log.info(
        { fingerprint: identity.fingerprint, notAfter: identity.notAfter },
        "certificate renewed with a new key",
      );
      await this.#o.onRenewed(identity);
      this.start();
      return { ok: true, identity };
    } catch (err) {
      const expiresIn = current.notAfter.getTime() - this.#now();
      if (expiresIn <= 0) {
        const error = new ComputeError(
          COMPUTE_CODES.SHOAL_COMPUTE_CERT_EXPIRED,
          `the node certificate ${current.files.clientCert} expired at ${current.notAfter.toISOString()} before it could be renewed (last attempt: ${(err as Error).message})`,
          {
            cause: err,
            fix: "enroll again: shoal compute serve --join TOKEN --ca-fingerprint sha256:HEX (a token from `shoal pki join-token create`), or install a new certificate from `shoal pki issue compute --id ID`",
          },
        );
        this.#log.error({ code: error.code, fix: error.fix }, error.message);
        this.#o.onExpired(error);
        return { ok: false, error, retryAt: new Date(Number.NaN) };
      }
      const delay = Math.min(this.#retryMs, expiresIn);
      this.#retryMs = Math.min(this.#retryMs * 2, MAX_RENEW_RETRY_MS);
      const retryAt = new Date(this.#now() + delay);
      this.#log.warn(
        {
          code: (err as { code?: string }).code,
          reason: (err as Error).message,
          retryAt,
          notAfter: current.notAfter,
        },
        "certificate renewal failed; keeping the current certificate and retrying",
      );
      this.#arm(delay);
      return { ok: false, error: err as Error, retryAt };
    }
  }

  /** New key, CSR, chain from the orchestrator, checked, then the files replaced. */
  async #renew(current: NodeIdentity): Promise<NodeIdentity> {
    const key = generatePrivateKey(keyTypeOf(createPrivateKey(current.keyPem)));
    const chainPem = await this.#o.request(createCsr(key, current.id));
    const { clientCert, clientKey } = current.files;
    const suffix = `.${randomBytes(6).toString("hex")}.new`;
    const staged = { ...current.files, clientCert: clientCert + suffix, clientKey: clientKey + suffix };
    try {
      await writeStaged(staged.clientKey, exportPrivateKey(key), 0o600);
      await writeStaged(staged.clientCert, chainPem, 0o644);
      const checked = await loadNodeIdentity(staged, new Date(this.#now()));
      if (checked.spiffeId !== current.spiffeId) {
        throw new ComputeError(
          COMPUTE_CODES.SHOAL_COMPUTE_IDENTITY,
          `the renewed certificate names ${checked.spiffeId}, not ${current.spiffeId}`,
          { fix: "the orchestrator must renew the same identity; check its PKI" },
        );
      }
      // Key first: until the certificate follows, a reconnect fails its handshake and retries.
      await fs.rename(staged.clientKey, clientKey);
      await fs.rename(staged.clientCert, clientCert);
    } finally {
      await Promise.all([
        fs.rm(staged.clientKey, { force: true }),
        fs.rm(staged.clientCert, { force: true }),
      ]);
    }
    return loadNodeIdentity(current.files, new Date(this.#now()));
  }
}

/** Writes `file` fully and flushed (mode set before any byte lands), for a later rename. */
async function writeStaged(file: string, data: string, mode: number): Promise<void> {
  await fs.mkdir(path.dirname(file), { recursive: true });
  const handle = await fs.open(file, "wx", mode);
  try {
    await handle.writeFile(data);
    await handle.chmod(mode);
    await handle.sync();
  } finally {
    await handle.close();
  }
}
