import { type ChildProcess, spawn } from "node:child_process";
import { promises as fs } from "node:fs";
import path from "node:path";
import { createInterface } from "node:readline";
import { dieWithParentLauncher, type Logger, silentLogger, within, writeFileAtomic } from "../core/index.js";
import {
  type BrokerIdentity,
  type BrokerUsers,
  computeBrokerUsers,
  sameBrokerUsers,
  usersLosingKeys,
} from "./broker-users.js";
import { FABRIC_CODES, NatsServerError } from "./errors.js";
import type { NatsClusterState } from "./nats-cluster.js";
import { type NatsServerState, renderNatsConfig } from "./nats-config.js";
import { type ClientRejection, parseNatsLogLine } from "./nats-log.js";
import { StatusStream } from "./status-stream.js";

export interface NatsSupervisorOptions {
  /** Directory for the generated `nats.conf` (0600) and the JetStream store; created 0700. */
  readonly dir: string;
  /** The nats-server binary (`Orchestrator.NATS.ServerPath`). @default "nats-server" */
  readonly serverPath?: string;
  /** @default "127.0.0.1" */
  readonly host?: string;
  /** Client port; `-1` lets nats-server choose a free one (then kept across restarts). @default 4222 */
  readonly port?: number;
  /** @default "shoal" */
  readonly serverName?: string;
  readonly tls: NatsServerState["tls"];
  /** The identities that may connect; see {@link computeBrokerUsers}. */
  readonly identities: readonly BrokerIdentity[];
  /** Routes to other servers (a cluster of orchestrators); absent runs a single server. */
  readonly cluster?: NatsClusterState;
  /** Run JetStream with its store under `dir`. @default true */
  readonly jetStream?: boolean;
  readonly logger?: Logger;
  /** How long to wait for "Server is ready". @default 15000 */
  readonly readyTimeoutMs?: number;
  /** Restart backoff after a crash: doubles from `initialMs` up to `maxMs`. @default { initialMs: 250, maxMs: 30000 } */
  readonly restartBackoff?: { readonly initialMs: number; readonly maxMs: number };
  /** The clock, for expiry. @default () => new Date() */
  readonly now?: () => Date;
  /**
   * Start nats-server so that it gets SIGTERM when this process dies, even by
   * SIGKILL (`setpriv --pdeathsig`, where util-linux has it). @default true
   */
  readonly dieWithParent?: boolean;
}

export type NatsSupervisorStatus =
  | { readonly type: "ready"; readonly pid: number; readonly host: string; readonly port: number }
  | { readonly type: "exited"; readonly code: number | null; readonly signal: string | null }
  | { readonly type: "restarting"; readonly attempt: number; readonly delayMs: number }
  | { readonly type: "reloaded"; readonly reason: string; readonly users: readonly string[] }
  | { readonly type: "reload-failed"; readonly error: NatsServerError }
  | { readonly type: "client-rejected"; readonly rejection: ClientRejection }
  | { readonly type: "route-rejected"; readonly rejection: ClientRejection }
  | { readonly type: "closed" };

/** A run of the child that lasted this long resets the restart backoff. */
const STABLE_RUN_MS = 30_000;
/** setTimeout's limit; expiries further away are re-checked when it fires. */
const MAX_TIMER_MS = 2 ** 31 - 1;

interface Running {
  readonly child: ChildProcess;
  readonly startedAt: number;
  readonly exited: Promise<void>;
  /** Set once "Server is ready" was seen: only a ready server is restarted on exit. */
  wasReady: boolean;
  /** Resolvers waiting for the outcome of a SIGHUP. */
  reloadWaiters: { resolve: () => void; reject: (e: NatsServerError) => void }[];
}

/**
 * The orchestrator's nats-server as a supervised child process: generated
 * configuration (0600), readiness, log lines forwarded into pino (with refused
 * clients decoded into fabric codes), restart with backoff, reload by SIGHUP when
 * the identities change or one expires, and a clean stop.
 */
export class NatsSupervisor {
  readonly #o: NatsSupervisorOptions;
  readonly #log: Logger;
  readonly #serverLog: Logger;
  readonly #status = new StatusStream<NatsSupervisorStatus>();
  readonly #now: () => Date;
  readonly #configFile: string;
  #identities: readonly BrokerIdentity[];
  #users: BrokerUsers;
  #port: number;
  #routePort: number | undefined;
  #running: Running | undefined;
  #closing: Promise<NatsServerError | undefined> | undefined;
  #closedResolve!: (e: NatsServerError | undefined) => void;
  readonly #closed = new Promise<NatsServerError | undefined>((r) => {
    this.#closedResolve = r;
  });
  #restartTimer: NodeJS.Timeout | undefined;
  #expiryTimer: NodeJS.Timeout | undefined;
  #attempt = 0;
  #reloadChain: Promise<void> = Promise.resolve();

  constructor(options: NatsSupervisorOptions) {
    this.#o = options;
    this.#log = (options.logger ?? silentLogger).child({ component: "nats-supervisor" });
    this.#serverLog = (options.logger ?? silentLogger).child({ component: "nats-server" });
    this.#now = options.now ?? (() => new Date());
    this.#configFile = path.join(options.dir, "nats.conf");
    this.#identities = options.identities;
    this.#users = computeBrokerUsers(this.#identities, this.#now());
    this.#port = options.port ?? 4222;
    this.#routePort = options.cluster?.port;
  }

  /** The port the server listens on (the chosen one once ready, when started with `-1`). */
  get port(): number {
    return this.#port;
  }

  /** The route port (the chosen one once ready, when started with `-1`); undefined without a cluster. */
  get routePort(): number | undefined {
    return this.#routePort;
  }

  get host(): string {
    return this.#o.host ?? "127.0.0.1";
  }

  /** `tls://host:port`, for clients on this machine. */
  get url(): string {
    return `tls://${this.host.includes(":") ? `[${this.host}]` : this.host}:${this.#port}`;
  }

  get configFile(): string {
    return this.#configFile;
  }

  /** The users the broker currently admits. */
  get users(): BrokerUsers {
    return this.#users;
  }

  get pid(): number | undefined {
    return this.#running?.child.pid;
  }

  /** Typed status events from now on (ready, exited, restarting, reloaded, client-rejected...). */
  status(): AsyncIterable<NatsSupervisorStatus> {
    return this.#status.iterate();
  }

  /** Writes the configuration, starts nats-server and resolves once it is ready. */
  async start(): Promise<void> {
    await fs.mkdir(this.#o.dir, { recursive: true, mode: 0o700 });
    this.#logExclusions(this.#users);
    try {
      if (this.#o.cluster && this.#o.jetStream !== false) await refuseStandaloneStore(this.#storeDir);
      await this.#spawn();
    } catch (err) {
      const error = err as NatsServerError;
      this.#closing = Promise.resolve(error);
      this.#status.end();
      this.#closedResolve(error);
      throw error;
    }
    this.#scheduleExpiry();
  }

  /** Replaces the identities; reloads the server if its users change. */
  setIdentities(identities: readonly BrokerIdentity[]): Promise<void> {
    this.#identities = identities;
    return this.#refresh("identities changed");
  }

  /**
   * Rewrites the configuration and reloads (SIGHUP). Also re-reads the server's
   * certificate files, e.g. after rotation. Resolves once nats-server confirms.
   */
  reload(reason = "requested"): Promise<void> {
    return this.#enqueue(() => this.#applyUsers(computeBrokerUsers(this.#identities, this.#now()), reason));
  }

  /** Stops the server (SIGTERM, then SIGKILL after 10 s). Idempotent. */
  close(): Promise<NatsServerError | undefined> {
    if (!this.#closing) {
      this.#closing = (async () => {
        clearTimeout(this.#restartTimer);
        clearTimeout(this.#expiryTimer);
        await this.#reloadChain.catch(() => {});
        const running = this.#running;
        if (running) {
          running.child.kill("SIGTERM");
          const killer = setTimeout(() => running.child.kill("SIGKILL"), 10_000);
          await running.exited;
          clearTimeout(killer);
        }
        this.#status.push({ type: "closed" });
        this.#status.end();
        this.#closedResolve(undefined);
        return undefined;
      })();
    }
    return this.#closing;
  }

  /**
   * Stops a server that runs but no longer serves (SIGTERM, then SIGKILL after
   * `graceMs`: a server stuck on its own locks does not finish a shutdown), so
   * that it is started again as after a crash. Does nothing while the server is
   * starting or the supervisor is closing.
   */
  async restart(reason: string, graceMs = 5_000): Promise<void> {
    const running = this.#running;
    if (this.#closing || !running?.wasReady) return;
    this.#log.error({ reason, pid: running.child.pid }, "stopping nats-server to start it again");
    running.child.kill("SIGTERM");
    const killer = setTimeout(() => running.child.kill("SIGKILL"), graceMs);
    await running.exited;
    clearTimeout(killer);
  }

  /** Resolves when the supervisor has stopped: to the error that stopped it, if any. */
  closed(): Promise<NatsServerError | undefined> {
    return this.#closed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** The `store_dir` of the server's JetStream (it keeps its files in a `jetstream` directory under it). */
  get #storeDir(): string {
    return path.join(this.#o.dir, "jetstream");
  }

  #render(users: BrokerUsers): string {
    return renderNatsConfig({
      host: this.host,
      port: this.#port,
      serverName: this.#o.serverName ?? "shoal",
      tls: this.#o.tls,
      users,
      ...(this.#o.cluster && this.#routePort !== undefined
        ? { cluster: { ...this.#o.cluster, port: this.#routePort } }
        : {}),
      ...(this.#o.jetStream === false ? {} : { jetStream: { storeDir: this.#storeDir } }),
    });
  }

  /**
   * Writes the server's config file, unless it holds exactly this already: a
   * server started again on a full disk (JetStreamWatchdog) needs no new file.
   */
  async #writeConfig(users: BrokerUsers): Promise<void> {
    const text = this.#render(users);
    const current = await fs.readFile(this.#configFile, "utf8").catch(() => undefined);
    if (current !== text) await writeFileAtomic(this.#configFile, text, 0o600);
  }

  async #spawn(): Promise<void> {
    await this.#writeConfig(this.#users);
    const serverPath = this.#o.serverPath ?? "nats-server";
    const notFound = (err?: NodeJS.ErrnoException) =>
      new NatsServerError(
        FABRIC_CODES.SHOAL_NATS_SERVER_NOT_FOUND,
        `cannot run ${serverPath}: ${err ? (err.code ?? err.message) : "not found or not executable"}`,
        {
          ...(err ? { cause: err } : {}),
          fix: "install nats-server (Debian: apt-get install nats-server) or set Orchestrator.NATS.ServerPath",
          details: { serverPath },
        },
      );
    const launcher = this.#o.dieWithParent === false ? [] : await dieWithParentLauncher();
    const [command = serverPath, ...args] = [...launcher, serverPath, "-c", this.#configFile];
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"] });
    const recent: string[] = [];
    let readyResolve!: (port: number) => void;
    let readyReject!: (e: NatsServerError) => void;
    const ready = new Promise<number>((res, rej) => {
      readyResolve = res;
      readyReject = rej;
    });
    let listenPort: number | undefined;
    let routeListenPort: number | undefined;
    let routeListening!: () => void;
    const routeListener = new Promise<void>((r) => {
      routeListening = r;
    });
    let exitedOnError!: () => void;
    const running: Running = {
      child,
      startedAt: Date.now(),
      wasReady: false,
      reloadWaiters: [],
      exited: new Promise<void>((resolve) => {
        // A binary that cannot be spawned reports "error" and never "exit".
        exitedOnError = resolve;
        child.once("exit", (code, signal) => {
          // setpriv exits 127 (126) when it cannot exec the server.
          if (launcher.length > 0 && (code === 127 || code === 126)) readyReject(notFound());
          readyReject(
            new NatsServerError(
              FABRIC_CODES.SHOAL_NATS_SERVER_START,
              `nats-server exited (${signal ?? `code ${code}`}) before it was ready: ${recent.slice(-3).join(" | ") || "no output"}`,
              {
                fix: "read the nats-server lines above; a port in use needs another Orchestrator.Port, a bad certificate path needs Orchestrator.TLS.* fixed",
                details: { code, signal, lines: recent.slice(-10) },
              },
            ),
          );
          resolve();
          this.#onExit(running, code, signal);
        });
      }),
    };
    child.once("error", (err: NodeJS.ErrnoException) => {
      exitedOnError();
      readyReject(notFound(err));
    });
    this.#running = running;
    const onLine = (line: string) => {
      const parsed = parseNatsLogLine(line);
      if (parsed.level === "error" || parsed.level === "fatal" || parsed.level === "warn") {
        recent.push(parsed.message);
        if (recent.length > 20) recent.shift();
      }
      const fields: Record<string, unknown> = { natsPid: child.pid };
      if (parsed.rejection) {
        Object.assign(fields, { ...parsed.rejection });
        const route = parsed.rejection.code === FABRIC_CODES.SHOAL_NATS_ROUTE_REJECTED;
        this.#status.push({
          type: route ? "route-rejected" : "client-rejected",
          rejection: parsed.rejection,
        });
      }
      this.#serverLog[parsed.level](fields, parsed.message);
      const listen = /^Listening for client connections on .*:(\d+)$/.exec(parsed.message);
      if (listen) listenPort = Number(listen[1]);
      const routes = /^Listening for route connections on .*:(\d+)$/.exec(parsed.message);
      if (routes) {
        routeListenPort = Number(routes[1]);
        routeListening();
      }
      if (parsed.message === "Server is ready") readyResolve(listenPort ?? this.#port);
      if (parsed.message === "Reloaded server configuration") {
        for (const w of running.reloadWaiters.splice(0)) w.resolve();
      } else if (/^Failed to reload server configuration/.test(parsed.message)) {
        const error = new NatsServerError(
          FABRIC_CODES.SHOAL_NATS_SERVER_RELOAD,
          `nats-server refused the new configuration: ${parsed.message}`,
          {
            fix: "the previous configuration stays active; fix the reported option and reload again",
            details: { line: parsed.message },
          },
        );
        for (const w of running.reloadWaiters.splice(0)) w.reject(error);
      }
    };
    if (child.stdout) createInterface({ input: child.stdout }).on("line", onLine);
    if (child.stderr) createInterface({ input: child.stderr }).on("line", onLine);

    const timeoutMs = this.#o.readyTimeoutMs ?? 15_000;
    const timer = setTimeout(
      () =>
        readyReject(
          new NatsServerError(
            FABRIC_CODES.SHOAL_NATS_SERVER_START,
            `nats-server was not ready within ${timeoutMs} ms`,
            {
              fix: "check the nats-server log lines; a slow JetStream recovery may need a longer start",
              details: { lines: recent.slice(-10) },
            },
          ),
        ),
      timeoutMs,
    );
    try {
      const port = await ready;
      // Without JetStream, nats-server opens the route listener just after "Server is ready".
      if (this.#o.cluster) {
        await within(routeListener, 5000);
      }
      const routePort = this.#routePort === undefined ? undefined : (routeListenPort ?? this.#routePort);
      if (port !== this.#port || routePort !== this.#routePort) {
        // Chosen by nats-server (`-1`): keep them across restarts and reloads.
        this.#port = port;
        this.#routePort = routePort;
        await this.#writeConfig(this.#users);
      }
    } catch (err) {
      child.kill("SIGKILL");
      await running.exited;
      throw err;
    } finally {
      clearTimeout(timer);
    }
    running.wasReady = true;
    this.#log.info(
      { pid: child.pid, port: this.#port, users: this.#users.users.length },
      "nats-server is ready",
    );
    this.#status.push({ type: "ready", pid: child.pid ?? 0, host: this.host, port: this.#port });
  }

  #onExit(running: Running, code: number | null, signal: NodeJS.Signals | null): void {
    if (this.#running !== running) return;
    this.#running = undefined;
    for (const w of running.reloadWaiters.splice(0)) {
      w.reject(
        new NatsServerError(FABRIC_CODES.SHOAL_NATS_SERVER_RELOAD, "nats-server exited during a reload"),
      );
    }
    if (this.#closing || !running.wasReady) return; // a failed start is reported by #spawn's caller
    this.#status.push({ type: "exited", code, signal });
    if (Date.now() - running.startedAt > STABLE_RUN_MS) this.#attempt = 0;
    this.#scheduleRestart();
    this.#log.error({ code, signal }, "nats-server exited; restarting");
  }

  #scheduleRestart(): void {
    const { initialMs, maxMs } = this.#o.restartBackoff ?? { initialMs: 250, maxMs: 30_000 };
    const attempt = ++this.#attempt;
    const base = Math.min(maxMs, initialMs * 2 ** (attempt - 1));
    const delayMs = Math.round(base / 2 + (Math.random() * base) / 2);
    this.#status.push({ type: "restarting", attempt, delayMs });
    this.#restartTimer = setTimeout(() => {
      if (this.#closing) return;
      this.#users = computeBrokerUsers(this.#identities, this.#now());
      this.#spawn().then(
        () => this.#scheduleExpiry(),
        (err: NatsServerError) => {
          this.#log.error({ code: err.code, err }, "nats-server restart failed");
          if (!this.#closing && !this.#running) this.#scheduleRestart();
        },
      );
    }, delayMs);
  }

  #enqueue(step: () => Promise<void>): Promise<void> {
    const next = this.#reloadChain.then(step);
    this.#reloadChain = next.catch(() => {});
    return next;
  }

  #refresh(reason: string): Promise<void> {
    return this.#enqueue(async () => {
      const next = computeBrokerUsers(this.#identities, this.#now());
      if (!sameBrokerUsers(next, this.#users)) {
        const kicked = usersLosingKeys(this.#users, next);
        if (kicked.length) {
          // nats-server keeps connections whose key is no longer pinned; dropping
          // the user for one reload closes them, the valid holder reconnects.
          const without = { ...next, users: next.users.filter((u) => !kicked.includes(u.user)) };
          await this.#applyUsers(
            without,
            `closing connections of ${kicked.join(", ")} (a certificate was revoked or expired)`,
          );
        }
        await this.#applyUsers(next, reason);
      }
      this.#scheduleExpiry();
    });
  }

  async #applyUsers(users: BrokerUsers, reason: string): Promise<void> {
    if (this.#closing) return;
    this.#logExclusions(users);
    this.#users = users;
    await this.#writeConfig(users);
    const running = this.#running;
    if (!running?.child.pid) return; // a restart picks the new file up
    let timer: NodeJS.Timeout | undefined;
    const confirmed = new Promise<void>((resolve, reject) => {
      const waiter = { resolve, reject };
      running.reloadWaiters.push(waiter);
      // Neither "Reloaded" nor "Failed to reload" in time: do not hang the reload chain.
      timer = setTimeout(() => {
        running.reloadWaiters = running.reloadWaiters.filter((w) => w !== waiter);
        reject(
          new NatsServerError(
            FABRIC_CODES.SHOAL_NATS_SERVER_RELOAD,
            "nats-server did not confirm the reload within 10 s",
            {
              fix: "check the nats-server log lines; the next identity change or expiry reloads again",
            },
          ),
        );
      }, 10_000);
    });
    running.child.kill("SIGHUP");
    try {
      await confirmed;
    } catch (err) {
      this.#status.push({ type: "reload-failed", error: err as NatsServerError });
      throw err;
    } finally {
      clearTimeout(timer);
    }
    const names = users.users.map((u) => u.user);
    this.#log.info({ reason, users: names.length }, "nats-server reloaded");
    this.#status.push({ type: "reloaded", reason, users: names });
  }

  #scheduleExpiry(): void {
    clearTimeout(this.#expiryTimer);
    const at = this.#users.nextChangeAt;
    if (!at || this.#closing) return;
    // A little after the instant, so the recomputation sees it as past.
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, at.getTime() - this.#now().getTime() + 50));
    this.#expiryTimer = setTimeout(() => {
      this.#refresh("a certificate expired or became valid").catch((err) =>
        this.#log.error({ err }, "reload at certificate expiry failed"),
      );
    }, delay);
  }

  #logExclusions(users: BrokerUsers): void {
    for (const e of users.excluded) {
      if (e.reason === "inbox-conflict") {
        this.#log.warn(e, "compute identity refused: its id is also an orchestrator's id (shared inbox)");
      } else {
        this.#log.debug(e, "identity is not a broker user");
      }
    }
  }
}

/**
 * Refuses a JetStream store written by a server that ran alone (streams on
 * disk, no cluster metadata): nats-server 2.9 does not carry such streams
 * into a cluster. Started with a `cluster {}` block it lists none of them and
 * treats them as orphans, so an orchestrator would find its buckets empty
 * and create new ones over its jobs, nodes and users.
 *
 * @throws NatsServerError SHOAL_NATS_STANDALONE_STORE
 */
async function refuseStandaloneStore(storeDir: string): Promise<void> {
  const store = path.join(storeDir, "jetstream");
  const clustered = await fs.stat(path.join(store, "$SYS", "_js_", "_meta_")).then(
    () => true,
    () => false,
  );
  if (clustered) return;
  for (const account of await fs.readdir(store).catch(() => [] as string[])) {
    const streams = await fs.readdir(path.join(store, account, "streams")).catch(() => [] as string[]);
    if (streams.length === 0) continue;
    throw new NatsServerError(
      FABRIC_CODES.SHOAL_NATS_STANDALONE_STORE,
      `${store} holds the streams of a nats-server that ran without a cluster (${streams.slice(0, 3).join(", ")}${streams.length > 3 ? ", ..." : ""}); nats-server does not carry them into a cluster, and the state in them would be lost`,
      {
        fix: "start the orchestrators of a cluster with fresh data directories, or run this one without Orchestrator.Cluster.*; keep this data directory to go on without a cluster",
      },
    );
  }
}
