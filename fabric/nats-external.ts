import { promises as fs } from "node:fs";
import { type Logger, silentLogger, writeFileAtomic } from "../core/index.js";
import { type BrokerIdentity, type BrokerUsers, computeBrokerUsers } from "./broker-users.js";
import { renderExternalAuthorization } from "./nats-config.js";

export interface ExternalAuthorizationOptions {
  /** Where the `authorization {}` block is kept (0600); the operator includes it in their server's config. */
  readonly file: string;
  /** The operator's servers (`Orchestrator.NATS.Servers`), named in the log lines. */
  readonly servers: readonly string[];
  /** The identities that may connect; see {@link computeBrokerUsers}. */
  readonly identities: readonly BrokerIdentity[];
  readonly logger?: Logger;
  /** @default () => new Date() */
  readonly now?: () => Date;
}

/** setTimeout's limit; expiries further away are re-checked when it fires. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * The broker users of operator-run NATS servers (`Orchestrator.NATS.Servers`):
 * the same users and permissions the supervised server gets, kept as an
 * `authorization {}` block in a file the operator includes in their server's
 * configuration. Shoal cannot reload a server it does not run, so whenever the
 * users change (enrollment, renewal, revocation, expiry) the file is rewritten
 * and a warning says the servers must be reloaded; until then an added identity
 * is refused by the server and a removed one stays connected (its envelopes are
 * refused by every verifier all the same).
 */
export class ExternalAuthorization {
  readonly #o: ExternalAuthorizationOptions;
  readonly #log: Logger;
  readonly #now: () => Date;
  #identities: readonly BrokerIdentity[];
  #users: BrokerUsers;
  #text: string | undefined;
  #timer: NodeJS.Timeout | undefined;
  #chain: Promise<void> = Promise.resolve();
  #closed = false;

  constructor(options: ExternalAuthorizationOptions) {
    this.#o = options;
    this.#log = (options.logger ?? silentLogger).child({ component: "nats-external" });
    this.#now = options.now ?? (() => new Date());
    this.#identities = options.identities;
    this.#users = computeBrokerUsers(this.#identities, this.#now());
  }

  get file(): string {
    return this.#o.file;
  }

  /** The users the block currently admits. */
  get users(): BrokerUsers {
    return this.#users;
  }

  /** Writes the block (if the file differs) and returns its text. */
  async start(): Promise<string> {
    this.#text = await fs.readFile(this.#o.file, "utf8").catch(() => undefined);
    await this.#enqueue("started");
    return this.#text ?? "";
  }

  /** Replaces the identities; rewrites the file and asks for a reload if the users change. */
  setIdentities(identities: readonly BrokerIdentity[]): Promise<void> {
    this.#identities = identities;
    return this.#enqueue("identities changed");
  }

  close(): void {
    this.#closed = true;
    clearTimeout(this.#timer);
  }

  #enqueue(reason: string): Promise<void> {
    const next = this.#chain.then(() => this.#write(reason));
    this.#chain = next.catch(() => {});
    return next;
  }

  async #write(reason: string): Promise<void> {
    if (this.#closed) return;
    const before = new Set(this.#users.users.map((u) => u.user));
    this.#users = computeBrokerUsers(this.#identities, this.#now());
    this.#schedule();
    const text = renderExternalAuthorization(this.#users);
    if (text === this.#text) return;
    await writeFileAtomic(this.#o.file, text, 0o600);
    const first = this.#text === undefined;
    this.#text = text;
    const after = this.#users.users.map((u) => u.user);
    const fields = {
      file: this.#o.file,
      servers: this.#o.servers,
      added: after.filter((u) => !before.has(u)),
      removed: [...before].filter((u) => !after.includes(u)),
      users: after.length,
      reason,
    };
    this.#log.warn(
      fields,
      first
        ? `wrote the NATS users block to ${this.#o.file}: include it in your nats-server configuration and reload the server`
        : `the NATS users changed (${reason}): ${this.#o.file} was rewritten; reload your nats-server (nats-server --signal reload) — until then new identities are refused and removed ones stay connected (their messages are already refused)`,
    );
  }

  #schedule(): void {
    clearTimeout(this.#timer);
    const at = this.#users.nextChangeAt;
    if (!at || this.#closed) return;
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, at.getTime() - this.#now().getTime() + 50));
    this.#timer = setTimeout(() => {
      this.#enqueue("a certificate expired or became valid").catch((err) =>
        this.#log.error({ err }, "cannot rewrite the NATS users block"),
      );
    }, delay);
    this.#timer.unref();
  }
}
