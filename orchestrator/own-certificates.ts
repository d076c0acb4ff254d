import type { Logger } from "../core/index.js";
import type { CertFiles } from "./certificates.js";

/** First retry after a failed renewal of the orchestrator's own certificates; doubles up to 5 minutes. */
export const DEFAULT_OWN_RENEW_RETRY_MS = 1000;
const MAX_RETRY_MS = 5 * 60_000;
const MAX_TIMER_MS = 2 ** 31 - 1;

/** One certificate the orchestrator uses itself: how to (re)issue it when due, and who to tell. */
export interface OwnCertificate {
  /** For log lines: "nats-server" or "identity". */
  name: string;
  /** Issues a new certificate when the current one is due (else returns it unchanged). */
  ensure: () => Promise<CertFiles>;
  /** Called after a new certificate was written (reload nats-server, swap the signer). */
  onRenewed: (files: CertFiles) => Promise<void>;
}

/**
 * Renews the orchestrator's NATS server certificate and fabric identity before
 * they expire (PKI.RenewBefore, at most a third of their life ahead), then has
 * their users pick up the new files: nats-server by a reload (connected
 * clients stay connected), the fabric link by a new signer. A failure keeps
 * the current files and retries with backoff.
 */
export class OwnCertificateRenewer {
  readonly #certs: readonly OwnCertificate[];
  readonly #log: Logger;
  readonly #retryBaseMs: number;
  #retryMs: number;
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> = Promise.resolve();
  #closed = false;

  constructor(certs: readonly OwnCertificate[], log: Logger, retryBaseMs = DEFAULT_OWN_RENEW_RETRY_MS) {
    this.#certs = certs;
    this.#log = log.child({ component: "own-certificates" });
    this.#retryBaseMs = retryBaseMs;
    this.#retryMs = retryBaseMs;
  }

  /** Checks now (and schedules the next check); SIGHUP calls this too. Never rejects. */
  check(): Promise<void> {
    this.#running = this.#running.then(() => this.#check());
    return this.#running;
  }

  async #check(): Promise<void> {
    if (this.#closed) return;
    clearTimeout(this.#timer);
    let next = Number.POSITIVE_INFINITY;
    let failed = false;
    for (const cert of this.#certs) {
      try {
        const files = await cert.ensure();
        if (files.renewed) {
          await cert.onRenewed(files);
          this.#log.info({ certificate: cert.name, notAfter: files.notAfter }, "own certificate renewed");
        }
        next = Math.min(next, files.renewAt.getTime());
      } catch (err) {
        failed = true;
        this.#log.error(
          { certificate: cert.name, code: (err as { code?: string }).code, err: (err as Error).message },
          "own certificate renewal failed; keeping the current one and retrying",
        );
      }
    }
    if (this.#closed) return;
    let delay: number;
    if (failed) {
      delay = this.#retryMs;
      this.#retryMs = Math.min(this.#retryMs * 2, MAX_RETRY_MS);
    } else {
      this.#retryMs = this.#retryBaseMs;
      delay = Math.max(0, next - Date.now());
    }
    // Long delays are split: an early wake-up just finds nothing due.
    this.#timer = setTimeout(() => void this.check(), Math.min(Math.max(delay, 50), MAX_TIMER_MS));
    this.#timer.unref();
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    await this.#running;
  }
}
