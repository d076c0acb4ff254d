import { X509Certificate } from "node:crypto";
import { EventEmitter, on } from "node:events";
import { promises as fs } from "node:fs";
import path from "node:path";
import type { Subscription } from "@nats-io/transport-node";
import {
  ConfigInvalidError,
  DiskSpace,
  isShoalError,
  jobResources,
  type Logger,
  LogThrottle,
  nodeLabelsProblem,
  parseByteSize,
  parseDuration,
  parseJobSpec,
  SHOAL_VERSION,
  type ShoalConfig,
  silentLogger,
} from "../core/index.js";
import {
  type Approval,
  broadcastAudience,
  connectFabric,
  EnvelopeSigner,
  EnvelopeVerifier,
  type FabricConnection,
  FabricError,
  FabricMessenger,
  type MessageBody,
  NODE_SEND_RATE,
  PeerCertificateCache,
  ReplayGuard,
  type SignedReplier,
  subjects,
  type VerifiedEnvelope,
} from "../fabric/index.js";
import { decideOnRefusal, readAdmission, recordAdmission } from "./broker-admission.js";
import { CapacityLedger } from "./capacity-ledger.js";
import { CertificateRenewer } from "./certificate-renewal.js";
import { lockDataDir } from "./data-dir-lock.js";
import { createEngineRunner, type EngineRunner } from "./engine-runner.js";
import { ExecAllowList, realPathOf } from "./engines/exec-allow-list.js";
import { hardLinksProtected } from "./engines/job-inputs.js";
import { ensureEnrolled, type JoinOptions, readEnrollment } from "./enrollment.js";
import { COMPUTE_CODES, ComputeError } from "./errors.js";
import { ExecutionManager, type ExecutionRequest, failedOutcome } from "./execution-manager.js";
import { decideBid, type JobSelectionPolicy, jobDemand } from "./job-selection.js";
import { defaultTlsFiles, loadNodeIdentity, type NodeIdentity } from "./node-identity.js";
import { ResultSpool, type SpooledResult } from "./result-spool.js";
import { StoredModules } from "./stored-modules.js";

/** Running executions may finish for this long when the node shuts down. @default 30 s */
export const DEFAULT_SHUTDOWN_GRACE_MS = 30_000;
/** How long a shutting-down node keeps trying to deliver spooled results. @default 3 s */
export const DEFAULT_DELIVERY_FLUSH_MS = 3000;
/** Timeout of `register` and `result` requests. @default 10 s */
export const DEFAULT_REQUEST_TIMEOUT_MS = 10_000;
/** An accepted bid's reservation is released when no `run` follows within this time. @default 60 s */
export const DEFAULT_BID_RESERVATION_MS = 60_000;
/** A result refused (`stored: false`) this many times is dropped from the spool. */
export const MAX_RESULT_REFUSALS = 3;
/**
 * Results a node has sent and not yet had answered, at most: each waits for
 * the orchestrator's durable write before its answer, so one at a time capped
 * a node near 1 / (that round trip) results a second.
 */
export const DELIVERY_WINDOW = 16;
/**
 * Of those, results with files, at most: the orchestrator stages each one's
 * chunks (up to the byte budget of a result) until its manifest comes.
 */
export const DELIVERY_WINDOW_WITH_FILES = 2;
/** Longest pause between retries (registration, result delivery, first connection). @default 30 s */
export const MAX_RETRY_BACKOFF_MS = 30_000;
/** While the broker has not admitted a new identity, the "still waiting" warning repeats at most this often. @default 5 min */
export const NOT_ADMITTED_WARN_EVERY_MS = 300_000;

export interface ComputeNodeOptions {
  /** The validated config (`loadConfig`); `DataDir` and `Compute.*` are used. */
  config: ShoalConfig;
  logger?: Logger;
  /**
   * Enroll with a join token when the data directory holds no identity yet
   * (`--join`, `--ca-fingerprint`, `--id`); ignored once enrolled.
   */
  join?: JoinOptions;
  /** The version the node reports when it registers. @default SHOAL_VERSION */
  version?: string;
  /** @default DEFAULT_SHUTDOWN_GRACE_MS */
  shutdownGraceMs?: number;
  /** @default DEFAULT_DELIVERY_FLUSH_MS */
  deliveryFlushMs?: number;
  /** @default DEFAULT_REQUEST_TIMEOUT_MS */
  requestTimeoutMs?: number;
  /** @default DEFAULT_BID_RESERVATION_MS */
  bidReservationMs?: number;
  /** First retry pause; doubles up to MAX_RETRY_BACKOFF_MS, with jitter. @default 500 */
  retryBaseMs?: number;
  /** Where `fs.protected_hardlinks` is read (a test's file). @default PROTECTED_HARDLINKS_FILE */
  protectedHardlinksFile?: string;
}

/** What happens to a node, as data (see {@link ComputeNode.events}). */
export type ComputeNodeEvent =
  | { type: "connected"; server: string }
  | { type: "disconnected" }
  | { type: "reconnected" }
  | { type: "registered"; approval: Approval; orchestrator: string }
  | { type: "bid"; executionId: string; accept: boolean; reason?: string; started?: boolean }
  | { type: "run"; executionId: string; accepted: boolean; reason?: string }
  | { type: "cancelled"; executionId: string; reason: string }
  | { type: "result-spooled"; executionId: string; state: "Completed" | "Failed" }
  | { type: "result-acknowledged"; executionId: string }
  | { type: "result-refused"; executionId: string; reason: string; dropped: boolean }
  | { type: "message-refused"; subject: string; code: string; reason: string }
  | { type: "certificate-renewed"; serial: string; fingerprint: string; notAfter: Date }
  | { type: "closed"; error: Error | undefined };

/** The compute node's lifecycle phase. */
type Phase = "new" | "starting" | "running" | "closing" | "closed";

type RegisterReply = MessageBody<"register-reply"> & { iss: string };

interface PendingDelivery {
  entry: SpooledResult;
  /** Whether its spool entry has a chunk directory (the entry may be replaced by one without). */
  chunks: boolean;
  refusals: number;
  /** Settles once the entry is on disk (see ExecutionManagerOptions.onResult); removed only after. */
  stored: Promise<unknown>;
}

const ORCHESTRATOR_ROLE = "orchestrator";

function jitter(ms: number): number {
  return Math.round(ms / 2 + Math.random() * (ms / 2));
}

/**
 * A compute node: proves its identity (from its certificate), connects to the
 * fabric over mTLS, registers, heartbeats, answers bids by its job-selection
 * policy, runs executions, streams their logs, and delivers results from an
 * on-disk spool until the orchestrator acknowledges them. Every incoming
 * message is a verified envelope from an orchestrator addressed to this node;
 * anything else is logged and ignored.
 *
 * Usable in-process (tests, benchmarks); `shoal compute serve` wraps it.
 */
export class ComputeNode {
  readonly #o: ComputeNodeOptions;
  readonly #log: Logger;
  readonly #dataDir: string;
  readonly #events = new EventEmitter();
  readonly #stopEvents = new AbortController();
  /** Aborted by close(): stops a start that waits (for enrollment approval). */
  readonly #stopStarting = new AbortController();
  readonly #deliveries = new Map<string, PendingDelivery>();
  /** Spool removals of acknowledged results still under way (awaited before the data directory is released). */
  readonly #removals = new Set<Promise<void>>();
  readonly #reservations = new Map<string, NodeJS.Timeout>();
  readonly #subscriptions: Subscription[] = [];
  #phase: Phase = "new";
  #identity: NodeIdentity | undefined;
  #fabric: FabricConnection | undefined;
  #messenger: FabricMessenger | undefined;
  #verifier: EnvelopeVerifier | undefined;
  #peers: PeerCertificateCache | undefined;
  #engines: EngineRunner | undefined;
  #manager: ExecutionManager | undefined;
  #spool: ResultSpool | undefined;
  #ledger: CapacityLedger | undefined;
  #policy: JobSelectionPolicy | undefined;
  /** The data directory's free space against `Compute.Storage.MinFree`: jobs are declined below it. */
  #disk: DiskSpace | undefined;
  /** The "declining jobs" warning, at most once a minute. */
  readonly #lowDiskWarnings = new LogThrottle(60_000);
  #unlock: (() => Promise<void>) | undefined;
  #labels: Record<string, string> = {};
  #renewer: CertificateRenewer | undefined;
  /** The orchestrator's identity, learned from its register reply; the audience of what we send. */
  #orchestrator: string | undefined;
  #approval: Approval | undefined;
  #connected = false;
  #needRegister = true;
  #heartbeat: NodeJS.Timeout | undefined;
  #heartbeatMs = 0;
  #heartbeatSeq = 0;
  /** Wakes the session and delivery loops (reconnect, new result, registration, close). */
  #wakers = new Set<() => void>();
  #loops: Promise<void>[] = [];
  #closing: Promise<void> | undefined;
  #fatal: Error | undefined;
  readonly #closed: Promise<Error | undefined>;
  #resolveClosed!: (err: Error | undefined) => void;

  constructor(options: ComputeNodeOptions) {
    this.#o = options;
    this.#log = (options.logger ?? silentLogger).child({ component: "compute" });
    this.#dataDir = options.config.DataDir;
    this.#events.setMaxListeners(0);
    this.#closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
  }

  /** This node's id (from its certificate); known once start() has checked the identity. */
  get id(): string {
    if (!this.#identity)
      throw new ComputeError(COMPUTE_CODES.SHOAL_COMPUTE_NOT_RUNNING, "the node has not started");
    return this.#identity.id;
  }

  /** `spiffe://<td>/compute/<id>`. */
  get identity(): string {
    if (!this.#identity)
      throw new ComputeError(COMPUTE_CODES.SHOAL_COMPUTE_NOT_RUNNING, "the node has not started");
    return this.#identity.spiffeId;
  }

  /** The approval from the last register reply, if any. */
  get approval(): Approval | undefined {
    return this.#approval;
  }

  get dataDir(): string {
    return this.#dataDir;
  }

  /** Executions running now. */
  running(): string[] {
    return this.#manager?.running() ?? [];
  }

  /** Executions whose results wait for the orchestrator's acknowledgement. */
  pendingResults(): string[] {
    return [...this.#deliveries.keys()];
  }

  /**
   * Status events from now on, until the node is closed. The listener is
   * attached when this is called, so call it before start() to see everything.
   */
  events(): AsyncIterable<ComputeNodeEvent> {
    const iterator = on(this.#events, "event", { signal: this.#stopEvents.signal });
    return (async function* () {
      try {
        for await (const [event] of iterator) yield event as ComputeNodeEvent;
      } catch (err) {
        if ((err as Error).name !== "AbortError") throw err;
      }
    })();
  }

  #emit(event: ComputeNodeEvent): void {
    this.#events.emit("event", event);
  }

  /**
   * Checks the identity, locks the data directory, recovers the spool and
   * interrupted executions, connects to the fabric (retrying while nothing
   * answers) and starts registering. Resolves once connected and subscribed;
   * registration, heartbeats and result delivery continue in the background.
   *
   * @throws ComputeError SHOAL_COMPUTE_IDENTITY, SHOAL_COMPUTE_DATA_DIR_LOCKED; FabricError for TLS/broker refusals.
   */
  async start(): Promise<void> {
    if (this.#phase !== "new") {
      throw new ComputeError(COMPUTE_CODES.SHOAL_COMPUTE_NOT_RUNNING, "start() may be called once");
    }
    this.#phase = "starting";
    try {
      await this.#startUp();
    } catch (err) {
      this.#fatal = err as Error;
      await this.close();
      throw err;
    }
  }

  async #startUp(): Promise<void> {
    const c = this.#o.config.Compute;
    const defaults = defaultTlsFiles(this.#dataDir);
    // Before anything is written: a node that cannot start must not enroll first.
    const execAllow = await ExecAllowList.resolve(c.Engines.Exec.Allow);
    if (
      c.Inputs.AllowedPaths.length > 0 &&
      (await hardLinksProtected(this.#o.protectedHardlinksFile)) === false
    ) {
      this.#log.warn(
        { allowedPaths: c.Inputs.AllowedPaths, sysctl: "fs.protected_hardlinks=0" },
        "any user who can write to an allowed input path can hard-link into it files they do not own, which jobs may then read: set fs.protected_hardlinks=1",
      );
    }
    // Locked first: two nodes on one data directory must not both enroll into it.
    const hadDataDir = await fs.access(this.#dataDir).then(
      () => true,
      () => false,
    );
    this.#unlock = await lockDataDir(this.#dataDir);
    if (this.#o.join) {
      try {
        await ensureEnrolled({
          dataDir: this.#dataDir,
          join: this.#o.join,
          api: c.API,
          orchestrators: c.Orchestrators,
          configured: { caCert: c.TLS.CACert, clientCert: c.TLS.ClientCert, clientKey: c.TLS.ClientKey },
          log: this.#log,
          signal: this.#stopStarting.signal,
        });
      } catch (err) {
        // A failed enrollment leaves nothing behind, not even the directory the lock needed.
        await this.#unlock();
        this.#unlock = undefined;
        if (!hadDataDir) await fs.rmdir(this.#dataDir).catch(() => {});
        throw err;
      }
    }
    const identity = await loadNodeIdentity({
      caCert: c.TLS.CACert || defaults.caCert,
      clientCert: c.TLS.ClientCert || defaults.clientCert,
      clientKey: c.TLS.ClientKey || defaults.clientKey,
    });
    this.#identity = identity;
    const log = this.#log.child({ node: identity.id });
    // Labels from the join token are the operator's word on this node: they win over local config.
    this.#labels = { ...c.Labels, ...(await readEnrollment(this.#dataDir))?.Labels };
    // Each set is valid alone; together they may be too many for an orchestrator to accept.
    const labelsProblem = nodeLabelsProblem(this.#labels);
    if (labelsProblem) {
      throw new ConfigInvalidError(
        "Compute.Labels",
        `Compute.Labels with the join token's labels: ${labelsProblem}`,
        undefined,
      );
    }

    this.#spool = new ResultSpool(path.join(this.#dataDir, "spool"));
    await this.#spool.init();
    const modules = new StoredModules({
      dir: path.join(this.#dataDir, "modules"),
      request: (body) => this.#requestModule(body),
      log,
    });
    await modules.init();
    this.#engines = await createEngineRunner({
      execAllow,
      allowedInputPaths: c.Inputs.AllowedPaths,
      wasmMaxMemoryBytes: parseByteSize(c.Engines.WASM.MaxMemory),
      storedModule: (executionId, digest) => modules.get(executionId, digest),
      log,
    });
    this.#ledger = new CapacityLedger({ cpu: c.Resources.CPU, memory: parseByteSize(c.Resources.Memory) });
    this.#disk = new DiskSpace(this.#dataDir, parseByteSize(c.Storage.MinFree), "Compute.Storage.MinFree");
    this.#policy = {
      engines: this.#engines.engines,
      execAllow: execAllow.realPaths,
      labels: this.#labels,
      locality: c.JobSelection.Locality,
      rejectStatelessJobs: c.JobSelection.RejectStatelessJobs,
      allowedSubmitters: c.JobSelection.AllowedSubmitters,
      allowedInputPaths: c.Inputs.AllowedPaths,
    };
    this.#manager = new ExecutionManager({
      root: path.join(this.#dataDir, "executions"),
      spool: this.#spool,
      runner: this.#engines.run,
      log,
      onLog: (executionId, stream, seq, data) =>
        this.#publish("logs", { executionId, stream, seq, data: Buffer.from(data).toString("base64") }),
      onResult: (entry, stored) => {
        this.#ledger?.release(entry.result.executionId);
        this.#queueDelivery(entry, stored);
        void stored.then((onDisk) => {
          if (onDisk) {
            this.#emit({
              type: "result-spooled",
              executionId: entry.result.executionId,
              state: entry.result.state,
            });
          }
        });
      },
      onCancelled: (executionId, reason) => {
        this.#ledger?.release(executionId);
        this.#publish("status", { executionId, state: "Cancelled", error: reason });
        this.#emit({ type: "cancelled", executionId, reason });
      },
    });
    await this.#manager.recover();
    for (const entry of await this.#spool.list((id, err) =>
      log.error({ executionId: id, err }, "unreadable spool entry left in place"),
    )) {
      this.#queueDelivery(entry);
    }

    this.#peers = new PeerCertificateCache({ caPem: identity.caPem, trustDomain: identity.trustDomain });
    this.#verifier = new EnvelopeVerifier({
      identity: identity.spiffeId,
      peers: this.#peers,
      replayGuard: new ReplayGuard(),
    });
    const signer = new EnvelopeSigner({ certPem: identity.chainPem, keyPem: identity.keyPem });
    this.#fabric = await this.#connect(identity);
    if (!this.#fabric) return; // closed while waiting for the broker
    this.#messenger = new FabricMessenger(
      this.#fabric,
      signer,
      this.#verifier,
      this.#o.logger ?? silentLogger,
      NODE_SEND_RATE,
    );
    this.#connected = true;
    this.#emit({ type: "connected", server: this.#fabric.nc.getServer() });

    this.#subscriptions.push(
      await this.#messenger.subscribeVerified(
        subjects.computeIn(identity.id),
        (env, reply) => this.#onMessage(env, reply),
        (error, msg) => this.#refused(msg.subject, error),
      ),
      await this.#messenger.subscribeVerified(
        subjects.broadcast("revocation"),
        (env) => {
          if (env.kind !== "revocation") return;
          const removed = this.#peers?.revoke(env.body as MessageBody<"revocation">) ?? 0;
          log.info({ removed }, "revocation applied");
        },
        (error, msg) => this.#refused(msg.subject, error),
      ),
    );
    this.#subscriptions.push(
      await this.#fabric.subscribe(subjects.broadcast("certificate"), {
        callback: (err, msg) => {
          if (!err) this.#learnOrchestratorChain(msg.string(), msg.subject);
        },
      }),
    );
    void this.#watchFabric(this.#fabric);
    this.#renewer = new CertificateRenewer({
      identity,
      renewBeforeMs: parseDuration(this.#o.config.PKI.RenewBefore),
      request: (csrPem) => this.#requestRenewal(csrPem),
      onRenewed: (renewed) => this.#useIdentity(renewed),
      onExpired: (error) => {
        this.#fatal = error;
        void this.close();
      },
      ...(this.#o.retryBaseMs ? { retryBaseMs: this.#o.retryBaseMs } : {}),
      log,
    });
    this.#renewer.start();
    this.#phase = "running";
    this.#loops.push(this.#sessionLoop(), this.#deliveryLoop());
    log.info(
      { identity: identity.spiffeId, engines: this.#policy.engines, capacity: this.#ledger.capacity },
      "compute node started",
    );
  }

  /**
   * Dials the fabric; while nothing answers, or while the broker refuses an
   * identity it never admitted (not reloaded for it yet), retries with backoff
   * until it connects or the node closes. A refusal of an identity the broker
   * admitted before means it was revoked, deleted or expired: that is thrown.
   */
  async #connect(identity: NodeIdentity): Promise<FabricConnection | undefined> {
    const c = this.#o.config.Compute;
    let delay = this.#o.retryBaseMs ?? 500;
    let waitingSince: Date | undefined;
    let lastWarned = 0;
    let refusals = 0;
    for (;;) {
      try {
        const fabric = await connectFabric({
          servers: c.Orchestrators,
          caFile: identity.files.caCert,
          certFile: identity.files.clientCert,
          keyFile: identity.files.clientKey,
          identity: identity.spiffeId,
          ...(this.#o.logger ? { logger: this.#o.logger } : {}),
        });
        if (waitingSince) {
          this.#log.info(
            { identity: identity.spiffeId, waitedMs: Date.now() - waitingSince.getTime(), refusals },
            "the broker admits this identity now",
          );
        }
        await recordAdmission(this.#dataDir, identity.spiffeId, new Date()).catch((err: unknown) =>
          this.#log.warn(
            { err },
            "cannot record the broker's admission (a later refusal will be waited out)",
          ),
        );
        return fabric;
      } catch (err) {
        if (isShoalError(err, "SHOAL_NATS_AUTHORIZATION")) {
          const decision = decideOnRefusal(identity.spiffeId, await readAdmission(this.#dataDir));
          if (decision.action === "stop") {
            this.#log.error(
              { code: err.code, identity: identity.spiffeId, admittedAt: decision.admittedAt },
              "the broker admitted this identity before and refuses it now: it was revoked, deleted or expired",
            );
            throw err;
          }
          refusals++;
          waitingSince ??= new Date();
          const now = Date.now();
          const notice = {
            code: COMPUTE_CODES.SHOAL_COMPUTE_NOT_ADMITTED,
            identity: identity.spiffeId,
            servers: c.Orchestrators,
            since: waitingSince.toISOString(),
            refusals,
          };
          const message =
            "the broker has not admitted this identity yet (external NATS: the operator must reload their nats-server after Shoal rewrote nats-external-authorization.conf); waiting and retrying";
          if (now - lastWarned >= NOT_ADMITTED_WARN_EVERY_MS) {
            lastWarned = now;
            this.#log.warn(notice, message);
          } else {
            this.#log.debug(notice, message);
          }
        } else if (isShoalError(err, "SHOAL_NATS_UNREACHABLE")) {
          this.#log.warn({ code: err.code, reason: err.message }, "no orchestrator answers yet; retrying");
        } else {
          throw err;
        }
        await this.#sleep(jitter(delay));
        delay = Math.min(delay * 2, MAX_RETRY_BACKOFF_MS);
        if (this.#phase === "closing" || this.#phase === "closed") return undefined;
      }
    }
  }

  async #watchFabric(fabric: FabricConnection): Promise<void> {
    for await (const s of fabric.status()) {
      if (s.type === "disconnected") {
        this.#connected = false;
        this.#emit({ type: "disconnected" });
      } else if (s.type === "reconnected") {
        this.#connected = true;
        this.#needRegister = true;
        this.#emit({ type: "reconnected" });
        this.#wake();
      } else if (s.type === "closed") {
        this.#connected = false;
        if (this.#phase === "running") {
          this.#fatal = s.error ?? new FabricError("SHOAL_NATS_CLOSED", "the fabric connection closed");
          void this.close();
        }
      }
    }
  }

  // ---- certificate rotation --------------------------------------------------------------------

  /** Sends a CSR in a signed `renew` request to the orchestrator we registered with; resolves to the new chain. */
  async #requestRenewal(csrPem: string): Promise<string> {
    const orchestrator = this.#orchestrator;
    if (!this.#connected || !orchestrator || !this.#messenger) {
      throw new FabricError("SHOAL_NATS_CLOSED", "not connected and registered with an orchestrator");
    }
    const env = await this.#messenger.requestSigned(
      subjects.computeOut(this.#identity!.id, "renew"),
      "renew",
      orchestrator,
      { csrPem },
      this.#o.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
    );
    const body = env.body as MessageBody<"renew-reply">;
    if (env.kind !== "renew-reply" || !body.chainPem) {
      throw new FabricError(
        "SHOAL_ENVELOPE_KIND",
        `the orchestrator did not renew the certificate: ${body.reason ?? env.kind}`,
      );
    }
    return body.chainPem;
  }

  /** One signed `module` request (part of a stored module an execution runs) to the orchestrator. */
  async #requestModule(body: MessageBody<"module">): Promise<MessageBody<"module-reply">> {
    if (!this.#connected || !this.#messenger) {
      throw new FabricError("SHOAL_NATS_CLOSED", "not connected to an orchestrator");
    }
    const env = await this.#messenger.requestSigned(
      subjects.computeOut(this.#identity!.id, "module"),
      "module",
      this.#audience(),
      body,
      this.#o.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
    );
    if (env.kind !== "module-reply" || env.sender.role !== ORCHESTRATOR_ROLE) {
      throw new FabricError("SHOAL_ENVELOPE_KIND", `module answered with ${env.kind} by ${env.iss}`);
    }
    return env.body as MessageBody<"module-reply">;
  }

  /**
   * The renewed certificate is on disk: sign with its key from now on, and
   * reconnect so the broker sees it (nats.js reads the files again when it
   * dials). Running executions go on; the node registers again with the new
   * chain after the reconnect, so the orchestrator keeps its record.
   */
  async #useIdentity(identity: NodeIdentity): Promise<void> {
    this.#identity = identity;
    this.#messenger?.useSigner(new EnvelopeSigner({ certPem: identity.chainPem, keyPem: identity.keyPem }));
    const serial = new X509Certificate(identity.chainPem).serialNumber.toLowerCase();
    this.#emit({
      type: "certificate-renewed",
      serial,
      fingerprint: identity.fingerprint,
      notAfter: identity.notAfter,
    });
    if (this.#fabric && !this.#fabric.nc.isClosed()) await this.#fabric.nc.reconnect();
  }

  /**
   * A `certificate` broadcast: the orchestrator's renewed chain. It is path
   * validated against the CA before it is cached, then the envelope itself
   * (signed with the new key) must verify as an orchestrator broadcast.
   */
  #learnOrchestratorChain(token: string, subject: string): void {
    try {
      const chainPem = unverifiedChain(token);
      if (chainPem) this.#peers?.add(chainPem);
      this.#verifier?.verify(token, { subject });
    } catch (err) {
      if (err instanceof FabricError) this.#refused(subject, err);
      else this.#log.warn({ subject, err }, "certificate broadcast refused");
    }
  }

  // ---- messages ------------------------------------------------------------------------------

  #refused(subject: string, error: FabricError): void {
    this.#log.warn(
      { code: error.code, subject, details: error.details },
      `message refused: ${error.message}`,
    );
    this.#emit({ type: "message-refused", subject, code: error.code, reason: error.message });
  }

  async #onMessage(env: VerifiedEnvelope, reply: SignedReplier | undefined): Promise<void> {
    if (env.sender.role !== ORCHESTRATOR_ROLE || env.aud !== this.#identity?.spiffeId) {
      const reason = `${env.kind} from ${env.iss} to ${env.aud}: only an orchestrator may send to this node, addressed to it`;
      this.#log.warn({ kind: env.kind, iss: env.iss, aud: env.aud }, "message refused");
      this.#emit({ type: "message-refused", subject: "in", code: "SHOAL_ENVELOPE_AUDIENCE", reason });
      return;
    }
    switch (env.kind) {
      case "bid": {
        const body = env.body as MessageBody<"bid">;
        const answer = await this.#bid(body);
        this.#emit({ type: "bid", executionId: body.executionId, ...answer });
        reply?.respond("bid-reply", answer);
        return;
      }
      case "run": {
        const body = env.body as MessageBody<"run">;
        const answer = await this.#run(body);
        this.#emit({ type: "run", executionId: body.executionId, ...answer });
        reply?.respond("run-reply", answer);
        if (answer.accepted && this.#manager?.has(body.executionId)) {
          this.#publish("status", { executionId: body.executionId, state: "Running" });
        }
        return;
      }
      case "cancel":
        await this.#cancel(env.body as MessageBody<"cancel">);
        return;
      default:
        this.#log.warn(
          { kind: env.kind, iss: env.iss },
          "unexpected message kind on the node's subject; ignored",
        );
    }
  }

  #parseSpec(spec: unknown): ReturnType<typeof parseJobSpec> | string {
    try {
      return parseJobSpec(spec as object);
    } catch (err) {
      return `invalid job spec: ${(err as Error).message}`;
    }
  }

  /** The job-selection decision, with the host paths looked up. */
  async #decide(
    spec: ReturnType<typeof parseJobSpec>,
    submitter: MessageBody<"bid">["submitter"],
    resources: MessageBody<"bid">["resources"],
  ): Promise<{ accept: boolean; reason?: string; busy?: boolean; lowDisk?: string }> {
    // Inputs, work files and the result's spool entry need room: a job taken now would fail half-way.
    const short = await this.#disk!.shortfall();
    if (short !== undefined) {
      this.#lowDiskWarnings.warn(
        this.#log,
        "disk",
        { shortfall: short },
        "declining jobs: the disk is short of room",
      );
      return { accept: false, reason: `no room on the node: ${short}`, lowDisk: short };
    }
    const demand = jobDemand(spec, submitter, resources);
    const commandRealPath = demand.command === undefined ? undefined : await realPathOf(demand.command);
    const inputs = await Promise.all(
      demand.inputs.map(async (i) =>
        i.localPath === undefined
          ? i
          : {
              ...i,
              present: await fs.access(i.localPath).then(
                () => true,
                () => false,
              ),
            },
      ),
    );
    const decision = decideBid(this.#policy!, { ...demand, inputs, commandRealPath }, this.#ledger!.free());
    if (decision.accept) return { accept: true };
    return {
      accept: false,
      reason: decision.reason,
      ...(decision.check === "capacity" ? { busy: true } : {}),
    };
  }

  async #bid(body: MessageBody<"bid">): Promise<MessageBody<"bid-reply">> {
    if (this.#phase !== "running") return { accept: false, reason: "the node is shutting down" };
    if (this.#approval !== "APPROVED")
      return { accept: false, reason: `the node is ${this.#approval ?? "not registered"}` };
    const { executionId, run } = body;
    // Asked again for an execution it holds (an orchestrator took the job over before it
    // stored the answer): running or finished, it is not run a second time.
    if (this.#holds(executionId)) return run ? { accept: true, started: true } : { accept: true };
    if (this.#ledger?.has(executionId)) return { accept: true };
    const spec = this.#parseSpec(body.spec);
    if (typeof spec === "string") return { accept: false, reason: spec };
    const decision = await this.#decide(spec, body.submitter, body.resources);
    if (!decision.accept) return decision;
    if (!run) {
      this.#reserve(executionId, body.resources);
      return decision;
    }
    // The bid carries the run: start now, on the resources just judged free.
    this.#ledger!.hold(executionId, body.resources);
    const started = this.#start({
      jobId: body.jobId,
      executionId,
      spec,
      submitter: body.submitter,
      timeoutMs: run.timeoutMs,
    });
    return started.accepted
      ? { accept: true, started: true }
      : { accept: false, ...(started.reason ? { reason: started.reason } : {}) };
  }

  /** Whether the execution runs here, or its result waits for delivery (which is then tried at once). */
  #holds(executionId: string): boolean {
    if (this.#manager?.has(executionId)) return true;
    if (!this.#deliveries.has(executionId)) return false;
    this.#wake();
    return true;
  }

  #reserve(executionId: string, resources: MessageBody<"bid">["resources"]): void {
    this.#ledger!.hold(executionId, resources);
    clearTimeout(this.#reservations.get(executionId));
    const timer = setTimeout(() => {
      this.#reservations.delete(executionId);
      if (!this.#manager?.has(executionId)) this.#ledger?.release(executionId);
    }, this.#o.bidReservationMs ?? DEFAULT_BID_RESERVATION_MS);
    timer.unref();
    this.#reservations.set(executionId, timer);
  }

  async #run(body: MessageBody<"run">): Promise<{ accepted: boolean; reason?: string }> {
    if (this.#phase !== "running") return { accepted: false, reason: "the node is shutting down" };
    if (this.#approval !== "APPROVED") {
      return { accepted: false, reason: `the node is ${this.#approval ?? "not registered"}` };
    }
    const { executionId } = body;
    if (this.#holds(executionId)) return { accepted: true };
    const spec = this.#parseSpec(body.spec);
    if (typeof spec === "string") return { accepted: false, reason: spec };
    clearTimeout(this.#reservations.get(executionId));
    this.#reservations.delete(executionId);
    if (!this.#ledger!.has(executionId)) {
      // No bid before (or its reservation expired): apply the policy now.
      const resources = jobResources(spec);
      const decision = await this.#decide(spec, body.submitter, resources);
      if (!decision.accept) return { accepted: false, reason: decision.reason ?? "refused" };
      this.#ledger!.hold(executionId, resources);
    }
    return this.#start({
      jobId: body.jobId,
      executionId,
      spec,
      submitter: body.submitter,
      timeoutMs: body.timeoutMs,
    });
  }

  /** Starts an execution whose resources are held in the ledger; releases them if it cannot start. */
  #start(request: ExecutionRequest): { accepted: boolean; reason?: string } {
    try {
      this.#manager!.start(request);
    } catch (err) {
      this.#ledger!.release(request.executionId);
      return { accepted: false, reason: (err as Error).message };
    }
    return { accepted: true };
  }

  async #cancel(body: MessageBody<"cancel">): Promise<void> {
    const { executionId, reason } = body;
    if (this.#manager?.cancel(executionId, reason)) return;
    if (this.#ledger?.has(executionId)) {
      clearTimeout(this.#reservations.get(executionId));
      this.#reservations.delete(executionId);
      this.#ledger.release(executionId);
      this.#emit({ type: "cancelled", executionId, reason });
      return;
    }
    const pending = this.#deliveries.get(executionId);
    if (pending) {
      this.#deliveries.delete(executionId);
      // The orchestrator no longer wants this result (it does not know the execution, or it ended otherwise).
      await this.#unspool(pending);
      this.#log.info({ executionId, reason }, "spooled result dropped on the orchestrator's cancel");
      this.#emit({ type: "cancelled", executionId, reason });
    }
  }

  /**
   * Publishes a signed message to the orchestrator, within {@link NODE_SEND_RATE};
   * dropped when not connected yet, logged when the connection is closed.
   */
  #publish<K extends "logs" | "status" | "heartbeat">(kind: K, body: MessageBody<K>): void {
    if (!this.#messenger || !this.#identity) return;
    this.#messenger.publishSigned(subjects.computeOut(this.#identity.id, kind), kind, this.#audience(), body);
  }

  #audience(): string {
    return this.#orchestrator ?? broadcastAudience(this.#identity!.trustDomain);
  }

  // ---- registration and heartbeats ------------------------------------------------------------

  #heldExecutions(): MessageBody<"register">["executions"] {
    return [
      ...(this.#manager?.running() ?? []).map((executionId) => ({ executionId, state: "Running" })),
      ...[...this.#deliveries.values()].map((d) => ({
        executionId: d.entry.result.executionId,
        state: d.entry.result.state,
      })),
    ];
  }

  /**
   * One `register` round trip. The reply carries the orchestrator's chain,
   * which is needed to verify the reply itself: it is path-validated against
   * the CA before it is trusted, then the reply's signature, subject, replay
   * and role (orchestrator) are checked.
   */
  async #register(): Promise<RegisterReply> {
    const identity = this.#identity!;
    const lowDisk = await this.#disk!.shortfall();
    const body: MessageBody<"register"> = {
      nodeId: identity.id,
      chainPem: identity.chainPem,
      labels: { ...this.#labels },
      capacity: { ...this.#ledger!.capacity },
      engines: [...this.#policy!.engines],
      version: this.#o.version ?? SHOAL_VERSION,
      executions: this.#heldExecutions(),
      ...(lowDisk === undefined ? {} : { lowDisk }),
    };
    const msg = await this.#fabric!.request(
      subjects.computeOut(identity.id, "register"),
      this.#messenger!.signer.sign("register", broadcastAudience(identity.trustDomain), body),
      this.#o.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
    );
    const token = msg.string();
    const chainPem = unverifiedChain(token);
    if (chainPem) this.#peers!.add(chainPem);
    const env = this.#verifier!.verify(token, { subject: msg.subject, expectedAud: identity.spiffeId });
    if (env.kind !== "register-reply" || env.sender.role !== ORCHESTRATOR_ROLE) {
      throw new FabricError("SHOAL_ENVELOPE_ROLE", `register answered with ${env.kind} by ${env.iss}`);
    }
    return { ...(env.body as MessageBody<"register-reply">), iss: env.iss };
  }

  /** Registers (again after every reconnect), re-registers while PENDING, stops on REJECTED. */
  async #sessionLoop(): Promise<void> {
    let delay = this.#o.retryBaseMs ?? 500;
    while (this.#phase === "running") {
      if (!this.#needRegister || !this.#connected) {
        await this.#sleep(this.#approval === "PENDING" ? this.#heartbeatMs : MAX_RETRY_BACKOFF_MS);
        if (this.#approval === "PENDING") this.#needRegister = true;
        continue;
      }
      let reply: RegisterReply;
      try {
        reply = await this.#register();
      } catch (err) {
        const code = (err as { code?: string }).code;
        this.#log.warn({ code, reason: (err as Error).message }, "registration failed; retrying");
        await this.#sleep(jitter(delay));
        delay = Math.min(delay * 2, MAX_RETRY_BACKOFF_MS);
        continue;
      }
      delay = this.#o.retryBaseMs ?? 500;
      this.#needRegister = false;
      this.#orchestrator = reply.iss;
      this.#approval = reply.approval;
      this.#log.info(
        { approval: reply.approval, orchestrator: reply.iss, reason: reply.reason },
        "registered",
      );
      this.#emit({ type: "registered", approval: reply.approval, orchestrator: reply.iss });
      if (reply.approval === "REJECTED") {
        this.#fatal = new ComputeError(
          COMPUTE_CODES.SHOAL_COMPUTE_REJECTED,
          `the orchestrator rejected node ${this.#identity!.id}${reply.reason ? `: ${reply.reason}` : ""}`,
          { fix: "ask the operator to approve it (shoal node delete, then approve), or stop this node" },
        );
        void this.close();
        return;
      }
      const configured = parseDuration(this.#o.config.Compute.Heartbeat.Interval);
      this.#startHeartbeat(Math.max(100, Math.min(configured, reply.heartbeatIntervalMs)));
      this.#wake();
    }
  }

  #startHeartbeat(intervalMs: number): void {
    if (this.#heartbeat && this.#heartbeatMs === intervalMs) return;
    clearInterval(this.#heartbeat);
    this.#heartbeatMs = intervalMs;
    this.#heartbeat = setInterval(() => {
      if (!this.#connected || !this.#orchestrator) return;
      // The orchestrator places no job here while the disk is short of room (Compute.Storage.MinFree).
      void this.#disk!.shortfall().then((lowDisk) =>
        this.#publish("heartbeat", {
          nodeId: this.#identity!.id,
          seq: this.#heartbeatSeq++,
          allocated: this.#ledger!.allocated(),
          running: this.#manager!.running(),
          ...(lowDisk === undefined ? {} : { lowDisk }),
        }),
      );
    }, intervalMs);
    this.#heartbeat.unref();
  }

  // ---- results ---------------------------------------------------------------------------------

  #queueDelivery(entry: SpooledResult, stored: Promise<unknown> = Promise.resolve()): void {
    const existing = this.#deliveries.get(entry.result.executionId);
    this.#deliveries.set(entry.result.executionId, {
      entry,
      chunks: existing?.chunks === true || entry.result.files.length > 0,
      refusals: existing?.refusals ?? 0,
      stored,
    });
    this.#wake();
  }

  /** Removes a delivery's spool entry once it is written (it may still be being written). */
  async #unspool(pending: PendingDelivery): Promise<void> {
    await pending.stored;
    await this.#spool!.remove(pending.entry.result.executionId, { chunks: pending.chunks });
  }

  #canDeliver(): boolean {
    return (
      this.#connected &&
      this.#orchestrator !== undefined &&
      this.#approval !== "REJECTED" &&
      !this.#needRegister
    );
  }

  /**
   * Sends spooled results, oldest first, up to {@link DELIVERY_WINDOW} at once
   * ({@link DELIVERY_WINDOW_WITH_FILES} of them with files; a result without
   * files may go past one with files that waits for its turn),
   * until each is acknowledged or refused for good. A delivery that fails
   * (no answer, no connection) holds back new sends for a backoff that doubles
   * up to MAX_RETRY_BACKOFF_MS; the result is tried again after it.
   */
  async #deliveryLoop(): Promise<void> {
    const base = this.#o.retryBaseMs ?? 500;
    let delay = base;
    let retryAt = 0;
    const inFlight = new Map<string, Promise<void>>();
    let withFiles = 0;
    // Runs on while closing, so results spooled by the drain still get their chance.
    while (this.#phase === "running" || this.#phase === "closing") {
      const wait = retryAt - Date.now();
      if (!this.#canDeliver() || wait > 0) {
        await this.#sleep(wait > 0 ? wait : MAX_RETRY_BACKOFF_MS);
        continue;
      }
      const pending =
        inFlight.size < DELIVERY_WINDOW
          ? this.#nextDelivery((id) => inFlight.has(id), withFiles < DELIVERY_WINDOW_WITH_FILES)
          : undefined;
      if (!pending) {
        await this.#sleep(MAX_RETRY_BACKOFF_MS); // woken by a new result or an answer
        continue;
      }
      const executionId = pending.entry.result.executionId;
      const files = pending.entry.result.files.length > 0;
      if (files) withFiles++;
      const paced = this.#deliverOnce(pending).then((ok) => {
        if (ok) delay = base;
        else {
          retryAt = Date.now() + jitter(delay);
          delay = Math.min(delay * 2, MAX_RETRY_BACKOFF_MS);
        }
      });
      inFlight.set(
        executionId,
        paced.finally(() => {
          inFlight.delete(executionId);
          if (files) withFiles--;
          this.#wake();
        }),
      );
    }
    await Promise.all(inFlight.values());
  }

  /** The oldest result waiting for delivery that `sending` does not name; with files only when `files`. */
  #nextDelivery(sending: (executionId: string) => boolean, files: boolean): PendingDelivery | undefined {
    for (const [executionId, pending] of this.#deliveries) {
      if (!sending(executionId) && (files || pending.entry.result.files.length === 0)) return pending;
    }
    return undefined;
  }

  /**
   * Sends one result and acts on the answer: acknowledged, it leaves the spool
   * (off the next sends' path); refused, it goes to the back of the queue, or
   * is dropped after MAX_RESULT_REFUSALS. False when it could not be sent or is
   * to be sent again. Never rejects: each delivery runs on its own, with no
   * caller to catch it.
   */
  async #deliverOnce(pending: PendingDelivery): Promise<boolean> {
    const executionId = pending.entry.result.executionId;
    let reply: MessageBody<"result-reply">;
    try {
      reply = await this.#deliver(pending);
    } catch (err) {
      const code = (err as { code?: string }).code;
      this.#log.warn(
        { executionId, code, reason: (err as Error).message },
        "result not delivered; will retry",
      );
      return false;
    }
    if (reply.stored) {
      this.#deliveries.delete(executionId);
      // The next result need not wait for this removal (slow where freeing disk blocks is).
      const removal = this.#unspool(pending).then(
        () => {
          this.#log.info({ executionId }, "result acknowledged");
          this.#emit({ type: "result-acknowledged", executionId });
        },
        (err) => this.#log.warn({ executionId, err }, "acknowledged result not removed from the spool"),
      );
      this.#removals.add(removal);
      void removal.finally(() => this.#removals.delete(removal));
      return true;
    }
    pending.refusals++;
    const reason = reply.reason ?? "no reason given";
    const dropped = pending.refusals >= MAX_RESULT_REFUSALS;
    this.#log.warn(
      { executionId, reason, refusals: pending.refusals, dropped },
      "result refused by the orchestrator",
    );
    this.#deliveries.delete(executionId);
    if (dropped) {
      try {
        await this.#unspool(pending);
      } catch (err) {
        // The entry stays on disk, for the next start.
        this.#log.warn({ executionId, err }, "a dropped result's spool entry was not removed");
        return false;
      }
    }
    // Else to the back, so one refused result does not hold up the others.
    else this.#deliveries.set(executionId, pending);
    this.#emit({ type: "result-refused", executionId, reason, dropped });
    // A refusal kept for another try backs off like a failure: the orchestrator's store may be failing.
    return dropped;
  }

  /**
   * Sends a spooled result ({@link #send}). One that can never go as it is — its
   * files rotted on disk, or it is larger than the broker accepts — is replaced
   * in the spool by a failure saying why, and that is sent instead: the
   * orchestrator learns the execution's fate, and the result stops holding up
   * the node's later ones.
   */
  async #deliver(pending: PendingDelivery): Promise<MessageBody<"result-reply">> {
    const { entry } = pending;
    const executionId = entry.result.executionId;
    try {
      return await this.#send(entry);
    } catch (err) {
      const why = isShoalError(err, COMPUTE_CODES.SHOAL_COMPUTE_SPOOL)
        ? `the node lost the result files: ${err.message}`
        : isShoalError(err, "SHOAL_NATS_MAX_PAYLOAD")
          ? `the result cannot be sent: ${err.message} (${err.fix})`
          : undefined;
      if (why === undefined) throw err;
      this.#log.error({ executionId, err }, "the spooled result cannot be sent; reporting a failure instead");
      pending.entry = await this.#spool!.put(entry.jobId, failedOutcome(executionId, why), []);
      return this.#send(pending.entry);
    }
  }

  /** Publishes every chunk of a spooled result, then requests the manifest's acknowledgement. */
  async #send(entry: SpooledResult): Promise<MessageBody<"result-reply">> {
    const identity = this.#identity!;
    const executionId = entry.result.executionId;
    for (const file of entry.result.files) {
      for (const [index, digest] of file.chunks.entries()) {
        const data = await this.#spool!.readChunk(executionId, digest);
        await this.#messenger!.publishSignedInTurn(
          subjects.computeOut(identity.id, "result-chunk"),
          "result-chunk",
          this.#audience(),
          { executionId, file: file.name, index, sha256: digest, data: data.toString("base64") },
        );
      }
      await this.#fabric!.flush();
    }
    const env = await this.#messenger!.requestSigned(
      subjects.computeOut(identity.id, "result"),
      "result",
      this.#audience(),
      entry.result,
      this.#o.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
    );
    if (env.kind !== "result-reply" || env.sender.role !== ORCHESTRATOR_ROLE) {
      throw new FabricError("SHOAL_ENVELOPE_KIND", `result answered with ${env.kind} by ${env.iss}`);
    }
    return env.body as MessageBody<"result-reply">;
  }

  // ---- waiting and shutdown --------------------------------------------------------------------

  #wake(): void {
    const wakers = [...this.#wakers];
    this.#wakers.clear();
    for (const w of wakers) w();
  }

  /** Sleeps up to `ms`, or until woken (reconnect, new result, registration, close). */
  #sleep(ms: number): Promise<void> {
    if (this.#phase === "closed") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#wakers.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.#wakers.add(done);
    });
  }

  /**
   * Shuts down in order: refuse new bids and runs, let running executions
   * finish (up to the grace period, then abort them; their results are
   * spooled), try briefly to deliver spooled results, drain the connection,
   * release the data directory. Idempotent: returns the same promise.
   */
  close(): Promise<void> {
    this.#closing ??= this.#shutdown();
    return this.#closing;
  }

  async #shutdown(): Promise<void> {
    this.#stopStarting.abort();
    const wasRunning = this.#phase === "running";
    this.#phase = "closing";
    this.#wake();
    try {
      await this.#renewer?.close();
      for (const t of this.#reservations.values()) clearTimeout(t);
      this.#reservations.clear();
      await this.#manager?.drain(this.#o.shutdownGraceMs ?? DEFAULT_SHUTDOWN_GRACE_MS);
      await this.#engines?.close();
      if (wasRunning && this.#deliveries.size > 0 && this.#canDeliver()) {
        await this.#flushDeliveries(this.#o.deliveryFlushMs ?? DEFAULT_DELIVERY_FLUSH_MS);
      }
      this.#phase = "closed";
      this.#wake();
      clearInterval(this.#heartbeat);
      await Promise.all(this.#loops);
      for (const sub of this.#subscriptions) sub.unsubscribe();
      await this.#fabric?.close();
    } catch (err) {
      this.#fatal ??= err as Error;
    } finally {
      this.#phase = "closed";
      clearInterval(this.#heartbeat);
      await Promise.all(this.#removals);
      await this.#unlock?.().catch(() => {});
      if (this.#deliveries.size > 0) {
        this.#log.info({ pending: this.pendingResults() }, "results kept in the spool until the next start");
      }
      this.#log.info({ error: this.#fatal?.message }, "compute node stopped");
      this.#emit({ type: "closed", error: this.#fatal });
      this.#stopEvents.abort();
      this.#resolveClosed(this.#fatal);
    }
  }

  /** Waits until every spooled result is acknowledged (or dropped) or `ms` passes. */
  async #flushDeliveries(ms: number): Promise<void> {
    const deadline = Date.now() + ms;
    this.#wake();
    while (this.#deliveries.size > 0 && Date.now() < deadline) await this.#sleep(deadline - Date.now());
  }

  /** Resolves (never rejects) when the node has stopped: to the error that stopped it, if any. */
  closed(): Promise<Error | undefined> {
    return this.#closed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** The chain an orchestrator puts in its register reply, read before the reply can be verified. */
function unverifiedChain(token: string): string | undefined {
  const payload = token.split(".")[1];
  if (!payload) return undefined;
  try {
    const claims = JSON.parse(Buffer.from(payload, "base64url").toString("utf8")) as {
      body?: { chainPem?: unknown };
    };
    return typeof claims.body?.chainPem === "string" ? claims.body.chainPem : undefined;
  } catch {
    return undefined;
  }
}
