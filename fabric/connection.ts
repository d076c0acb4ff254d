import { readFile } from "node:fs/promises";
import { checkServerIdentity, type PeerCertificate } from "node:tls";
import {
  AuthorizationError,
  ClosedConnectionError,
  connect,
  DrainingConnectionError,
  type Msg,
  type NatsConnection,
  NoRespondersError,
  type Payload,
  PermissionViolationError,
  RequestError,
  type Subscription,
  type SubscriptionOptions,
  TimeoutError,
  UserAuthenticationExpiredError,
} from "@nats-io/transport-node";
import { FileReadError, type Logger, silentLogger } from "../core/index.js";
import { parseSpiffeId } from "../pki/index.js";
import { DEFAULT_MAX_ENVELOPE_BYTES } from "./envelope.js";
import {
  BrokerAuthorizationError,
  BrokerUnreachableError,
  FABRIC_CODES,
  FabricError,
  PermissionViolation,
  RequestFailedError,
} from "./errors.js";
import { StatusStream } from "./status-stream.js";
import { subjects } from "./subjects.js";
import {
  type ClientTlsMaterial,
  diagnoseProbe,
  preflightClientCertificate,
  probeNatsServer,
} from "./tls-diagnosis.js";

export interface FabricConnectOptions {
  /** `tls://host:port` URLs of the broker (Compute.Orchestrators / the supervisor's url). */
  readonly servers: string | readonly string[];
  /** The fabric CA (the server's certificate must chain to it). */
  readonly caFile: string;
  /** Leaf + intermediate PEM; re-read at every reconnect, so rotation needs no restart. */
  readonly certFile: string;
  /** PKCS#8 PEM key; re-read at every reconnect. */
  readonly keyFile: string;
  /** This daemon's SPIFFE id; the certificate's URI SAN must be exactly this. */
  readonly identity: string;
  /** Client name shown in the broker's logs and monitoring. @default the identity */
  readonly name?: string;
  readonly logger?: Logger;
  /** How long the first connection may take. @default 10000 */
  readonly connectTimeoutMs?: number;
  /** Pause between reconnect attempts, plus up to `reconnectJitterMs` at random. @default 1000 */
  readonly reconnectTimeWaitMs?: number;
  /** @default 1000 */
  readonly reconnectJitterMs?: number;
  /** While disconnected longer than this, probe the server and report why. @default 3000 */
  readonly diagnoseAfterMs?: number;
  /** @default () => new Date() */
  readonly now?: () => Date;
}

export type FabricStatus =
  | { readonly type: "disconnected"; readonly server: string }
  | { readonly type: "reconnecting" }
  | { readonly type: "reconnected"; readonly server: string }
  | { readonly type: "stale" }
  | { readonly type: "slow-consumer"; readonly subject: string; readonly pending: number }
  | { readonly type: "error"; readonly error: FabricError }
  | { readonly type: "closed"; readonly error: FabricError | undefined };

/**
 * The smallest `max_payload` a broker of the fabric may have: the largest
 * message a daemon sends (a result with all the output a node keeps, a chunk
 * of a module or of result files) is signed to just under 1 MiB, nats-server's
 * default. A smaller limit would make such a message unsendable for good.
 */
const MIN_BROKER_MAX_PAYLOAD = DEFAULT_MAX_ENVELOPE_BYTES;

const RAISE_MAX_PAYLOAD = `set \`max_payload: ${MIN_BROKER_MAX_PAYLOAD}\` (1 MiB) or more in the configuration of every NATS server of the fabric and reload them`;

/** Why the server `nc` is connected to cannot carry the fabric's messages (its INFO's `max_payload`), if it cannot. */
function payloadTooSmall(nc: NatsConnection, server: string): FabricError | undefined {
  const maxPayload = nc.info?.max_payload ?? 0;
  if (maxPayload >= MIN_BROKER_MAX_PAYLOAD) return undefined;
  return new FabricError(
    FABRIC_CODES.SHOAL_NATS_MAX_PAYLOAD,
    `the NATS server ${server} accepts messages of at most ${maxPayload} bytes; the fabric needs ${MIN_BROKER_MAX_PAYLOAD}`,
    { fix: RAISE_MAX_PAYLOAD, details: { server, maxPayload, required: MIN_BROKER_MAX_PAYLOAD } },
  );
}

/** Maps any NATS client error to the fabric error that explains it. */
export function toFabricError(
  err: unknown,
  identity: string | undefined,
  context: { subject?: string; server?: string } = {},
): FabricError {
  if (err instanceof FabricError) return err;
  if (err instanceof PermissionViolationError) {
    return new PermissionViolation(
      err.operation === "publish" ? "publish" : "subscribe",
      err.subject,
      identity,
      { cause: err },
    );
  }
  if (err instanceof AuthorizationError || err instanceof UserAuthenticationExpiredError) {
    return new BrokerAuthorizationError(identity, context.server ?? "the broker", { cause: err });
  }
  const cause = err instanceof RequestError ? (err.cause ?? err) : err;
  if (cause instanceof NoRespondersError || (err instanceof RequestError && err.isNoResponders())) {
    return new RequestFailedError(
      FABRIC_CODES.SHOAL_NATS_NO_RESPONDERS,
      `nobody listens on ${context.subject ?? "that subject"}`,
      {
        cause: err,
        fix: "the receiving daemon is not connected (check `shoal node list` or the orchestrator's status)",
        details: { subject: context.subject },
      },
    );
  }
  if (cause instanceof TimeoutError) {
    return new RequestFailedError(
      FABRIC_CODES.SHOAL_NATS_REQUEST_TIMEOUT,
      `no reply on ${context.subject ?? "the request"} in time`,
      {
        cause: err,
        fix: "the receiver is busy, disconnected or refused the message (its log says why); retry later",
        details: { subject: context.subject },
      },
    );
  }
  if (err instanceof ClosedConnectionError || err instanceof DrainingConnectionError) {
    return new FabricError(FABRIC_CODES.SHOAL_NATS_CLOSED, "the fabric connection is closed", {
      cause: err,
      fix: "this is a shutdown race; if it happens while running, the daemon's connection was closed by the broker (see its log)",
    });
  }
  return new FabricError(
    FABRIC_CODES.SHOAL_NATS_UNREACHABLE,
    `fabric connection failed: ${(err as Error)?.message ?? String(err)}`,
    {
      cause: err,
      fix: "check the orchestrator's address and that its NATS server runs",
      details: { server: context.server },
    },
  );
}

function hostPort(server: string): { host: string; port: number } {
  const url = new URL(server.includes("://") ? server : `tls://${server}`);
  return { host: url.hostname.replace(/^\[|\]$/g, ""), port: url.port ? Number(url.port) : 4222 };
}

/**
 * nats.js sets no TLS servername for IP-address servers, so Node checks the
 * server certificate against "localhost" instead of the dialed IP. Check it
 * against the configured server hosts instead: with one server this is exact,
 * with several the certificate must be valid for one of them.
 */
function serverIdentityCheck(
  servers: readonly string[],
): (name: string, cert: PeerCertificate) => Error | undefined {
  const hosts = servers.map((s) => hostPort(s).host);
  return (_name, cert) => {
    let first: Error | undefined;
    for (const host of hosts) {
      const err = checkServerIdentity(host, cert);
      if (!err) return undefined;
      first ??= err;
    }
    return first;
  };
}

async function readMaterial(o: FabricConnectOptions): Promise<ClientTlsMaterial> {
  const read = async (file: string) => {
    try {
      return await readFile(file, "utf8");
    } catch (err) {
      throw new FileReadError(file, err);
    }
  };
  return {
    caPem: await read(o.caFile),
    certPem: await read(o.certFile),
    keyPem: await read(o.keyFile),
    files: { ca: o.caFile, cert: o.certFile, key: o.keyFile },
  };
}

/** The local certificate's problem (expired, wrong key...) as an error, if any. */
function localProblem(material: ClientTlsMaterial, identity: string, now: Date): FabricError | undefined {
  try {
    preflightClientCertificate(material, identity, now);
    return undefined;
  } catch (err) {
    return toFabricError(err, identity);
  }
}

/**
 * Probes `server` and returns the error that explains why it cannot be used,
 * or `undefined` when it is fine now. Exported for `shoal compute serve` and
 * tests; connectFabric calls it after a failure.
 */
export async function diagnoseServer(
  server: string,
  material: ClientTlsMaterial,
  identity: string | undefined,
  timeoutMs = 5000,
): Promise<FabricError | undefined> {
  const { host, port } = hostPort(server);
  return diagnoseProbe(
    server,
    host,
    await probeNatsServer(host, port, material, timeoutMs),
    material,
    identity,
  );
}

/**
 * Connects a daemon to the fabric over mutual TLS: checks its own certificate
 * first, then dials with a per-identity inbox prefix (`_INBOX_<id>`), reconnects
 * for ever with jitter (but gives up when the broker refuses the identity twice:
 * revoked), and turns every failure into a typed {@link FabricError}.
 */
export async function connectFabric(options: FabricConnectOptions): Promise<FabricConnection> {
  const now = options.now ?? (() => new Date());
  const parsed = parseSpiffeId(options.identity);
  if (!parsed) {
    throw new FabricError(
      FABRIC_CODES.SHOAL_NATS_CONFIG,
      `${JSON.stringify(options.identity)} is not a Shoal SPIFFE id`,
      {
        fix: "identities look like spiffe://<trust-domain>/<compute|orchestrator>/<id>",
      },
    );
  }
  const servers = typeof options.servers === "string" ? [options.servers] : [...options.servers];
  const material = await readMaterial(options);
  preflightClientCertificate(material, options.identity, now());
  const first = servers[0] ?? "tls://127.0.0.1:4222";
  // nats.js hands these to node:tls as they are, including checkServerIdentity.
  const tls = {
    caFile: options.caFile,
    certFile: options.certFile,
    keyFile: options.keyFile,
    checkServerIdentity: serverIdentityCheck(servers),
  };
  let nc: NatsConnection;
  try {
    nc = await connect({
      servers,
      name: options.name ?? options.identity,
      inboxPrefix: subjects.inboxPrefix(parsed.id),
      tls,
      // Gossiped cluster URLs would be dialed without our host check list.
      ignoreClusterUpdates: true,
      timeout: options.connectTimeoutMs ?? 10_000,
      maxReconnectAttempts: -1,
      reconnectTimeWait: options.reconnectTimeWaitMs ?? 1000,
      reconnectJitterTLS: options.reconnectJitterMs ?? 1000,
      reconnectJitter: options.reconnectJitterMs ?? 1000,
      pingInterval: 20_000,
      maxPingOut: 3,
      // Otherwise every request (each KV put too) builds two Errors with stacks up
      // front in case it fails (~0.5 ms of the main thread per job in bench:jobs);
      // a failure still has its class and cause, and toFabricError names the subject.
      noAsyncTraces: true,
    });
  } catch (err) {
    if (err instanceof AuthorizationError)
      throw new BrokerAuthorizationError(options.identity, first, { cause: err });
    const diagnosed = await diagnoseServer(first, material, options.identity);
    if (diagnosed) throw diagnosed;
    throw new BrokerUnreachableError(
      FABRIC_CODES.SHOAL_NATS_UNREACHABLE,
      `no NATS session with ${servers.join(", ")}: ${(err as Error).message}`,
      {
        cause: err,
        fix: "the server answered the probe but not the client: check the orchestrator's nats-server log for this client",
        details: { servers },
      },
    );
  }
  const tooSmall = payloadTooSmall(nc, nc.getServer());
  if (tooSmall) {
    await nc.close();
    throw tooSmall;
  }
  return new FabricConnection(nc, options, parsed.id, material);
}

/** A daemon's live fabric connection; wraps the nats.js connection. */
export class FabricConnection {
  /** The underlying connection, for JetStream/KV (orchestrator) and raw use. */
  readonly nc: NatsConnection;
  readonly identity: string;
  /** The id part of the identity; names the inbox prefix. */
  readonly id: string;
  readonly inboxPrefix: string;
  readonly #log: Logger;
  readonly #status = new StatusStream<FabricStatus>();
  readonly #options: FabricConnectOptions;
  readonly #material: ClientTlsMaterial;
  readonly #closed: Promise<FabricError | undefined>;
  #closing: Promise<FabricError | undefined> | undefined;
  #diagnoseTimer: NodeJS.Timeout | undefined;
  #connected = true;
  /** Recent permission errors, so publishConfirmed() can tell which publish failed. */
  #violations: PermissionViolation[] = [];

  constructor(nc: NatsConnection, options: FabricConnectOptions, id: string, material: ClientTlsMaterial) {
    this.nc = nc;
    this.identity = options.identity;
    this.id = id;
    this.inboxPrefix = subjects.inboxPrefix(id);
    this.#options = options;
    this.#material = material;
    this.#log = (options.logger ?? silentLogger).child({ component: "fabric", identity: options.identity });
    this.#log.info({ server: nc.getServer() }, "connected to the fabric");
    void this.#watch();
    this.#closed = nc.closed().then((err) => {
      clearTimeout(this.#diagnoseTimer);
      const error = err ? toFabricError(err, this.identity, { server: nc.getServer() }) : undefined;
      if (error) this.#log.error({ code: error.code, err: error }, "fabric connection closed");
      this.#status.push({ type: "closed", error });
      this.#status.end();
      return error;
    });
  }

  /** Typed status events from now on. */
  status(): AsyncIterable<FabricStatus> {
    return this.#status.iterate();
  }

  async #watch(): Promise<void> {
    for await (const s of this.nc.status()) {
      switch (s.type) {
        case "disconnect":
          this.#connected = false;
          this.#log.warn({ server: s.server }, "disconnected from the fabric");
          this.#status.push({ type: "disconnected", server: s.server });
          this.#scheduleDiagnosis(s.server);
          break;
        case "reconnecting":
          this.#status.push({ type: "reconnecting" });
          break;
        case "reconnect": {
          this.#connected = true;
          clearTimeout(this.#diagnoseTimer);
          this.#log.info({ server: s.server }, "reconnected to the fabric");
          // Another server of an operator's cluster may be configured differently.
          const tooSmall = payloadTooSmall(this.nc, s.server);
          if (tooSmall)
            this.#log.error(
              { code: tooSmall.code, details: tooSmall.details, fix: tooSmall.fix },
              tooSmall.message,
            );
          this.#status.push({ type: "reconnected", server: s.server });
          break;
        }
        case "staleConnection":
          this.#status.push({ type: "stale" });
          break;
        case "slowConsumer":
          this.#status.push({ type: "slow-consumer", subject: s.sub.getSubject(), pending: s.pending });
          break;
        case "error": {
          const error = toFabricError(s.error, this.identity, { server: this.nc.getServer() });
          if (error instanceof PermissionViolation) {
            this.#violations.push(error);
            if (this.#violations.length > 100) this.#violations.shift();
          }
          this.#log.error({ code: error.code, details: error.details }, error.message);
          this.#status.push({ type: "error", error });
          break;
        }
        default:
          break;
      }
    }
  }

  /** While disconnected, probe now and then so the operator learns why (revoked, expired, SAN...). */
  #scheduleDiagnosis(server: string, delay = this.#options.diagnoseAfterMs ?? 3000): void {
    clearTimeout(this.#diagnoseTimer);
    this.#diagnoseTimer = setTimeout(async () => {
      if (this.nc.isClosed() || this.#closing) return;
      try {
        const material = await readMaterial(this.#options).catch(() => this.#material);
        const url = server.includes("://") ? server : `tls://${server}`;
        const error =
          (await localProblem(material, this.identity, this.#options.now?.() ?? new Date())) ??
          (await diagnoseServer(url, material, this.identity));
        if (error && !this.#closing) {
          this.#log.error({ code: error.code, details: error.details }, error.message);
          this.#status.push({ type: "error", error });
        }
      } finally {
        if (!this.#closing && !this.nc.isClosed())
          this.#scheduleDiagnosis(server, Math.min(delay * 2, 60_000));
      }
    }, delay);
    this.#diagnoseTimer.unref();
  }

  /** Publishes without waiting; a refusal by the broker arrives as an `error` status. */
  publish(subject: string, data: Payload): void {
    this.#checkSize(subject, data);
    this.nc.publish(subject, data);
  }

  /**
   * Throws `SHOAL_NATS_MAX_PAYLOAD` for a message larger than the broker
   * accepts, which no retry can send (nats.js would throw an untyped error).
   */
  #checkSize(subject: string, data: Payload): void {
    const maxPayload = this.nc.info?.max_payload;
    const bytes = typeof data === "string" ? Buffer.byteLength(data) : data.length;
    if (maxPayload === undefined || bytes <= maxPayload) return;
    throw new FabricError(
      FABRIC_CODES.SHOAL_NATS_MAX_PAYLOAD,
      `a ${bytes}-byte message on ${subject} is larger than the ${maxPayload} bytes the NATS server ${this.nc.getServer()} accepts`,
      { fix: RAISE_MAX_PAYLOAD, details: { subject, bytes, maxPayload, server: this.nc.getServer() } },
    );
  }

  /**
   * Publishes and waits one round trip to the broker; rejects with
   * {@link PermissionViolation} if the broker refused this subject.
   */
  async publishConfirmed(subject: string, data: Payload): Promise<void> {
    const mark = this.#violations.length;
    this.#checkSize(subject, data);
    this.nc.publish(subject, data);
    await this.flush();
    await new Promise((r) => setImmediate(r));
    const refused = this.#violations
      .slice(mark)
      .find((v) => v.operation === "publish" && v.subject === subject);
    if (refused) throw refused;
  }

  /**
   * Subscribes and waits one round trip to the broker, so the subscription is
   * known to be live; rejects with {@link PermissionViolation} if refused.
   */
  async subscribe(subject: string, opts?: SubscriptionOptions): Promise<Subscription> {
    const sub = this.nc.subscribe(subject, opts);
    await this.flush();
    await new Promise((r) => setImmediate(r));
    if (sub.isClosed()) {
      const err = await sub.closed.then(
        (e) => e,
        (e: unknown) => e,
      );
      throw toFabricError(err ?? new ClosedConnectionError(), this.identity, { subject });
    }
    return sub;
  }

  /** A request with its reply on this identity's inbox; failures are typed. */
  async request(subject: string, data: Payload, timeoutMs = 10_000): Promise<Msg> {
    this.#checkSize(subject, data);
    try {
      return await this.nc.request(subject, data, { timeout: timeoutMs });
    } catch (err) {
      throw toFabricError(err, this.identity, { subject });
    }
  }

  async flush(): Promise<void> {
    try {
      await this.nc.flush();
    } catch (err) {
      throw toFabricError(err, this.identity);
    }
  }

  /**
   * True once {@link close} was called or the connection closed: while it
   * drains, publishes are refused though nats.js does not call it closed yet.
   */
  isClosing(): boolean {
    return this.#closing !== undefined || this.nc.isClosed();
  }

  /** Drains (delivers what is buffered, unsubscribes) then closes. Idempotent. */
  close(): Promise<FabricError | undefined> {
    if (!this.#closing) {
      this.#closing = (async () => {
        clearTimeout(this.#diagnoseTimer);
        // Draining needs the server; while disconnected there is nothing to deliver.
        if (!this.nc.isClosed()) {
          await (this.#connected ? this.nc.drain() : this.nc.close()).catch(() => this.nc.close());
        }
        return this.#closed;
      })();
    }
    return this.#closing;
  }

  /** Resolves when the connection is closed: to the error that closed it, if any. */
  closed(): Promise<FabricError | undefined> {
    return this.#closed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
