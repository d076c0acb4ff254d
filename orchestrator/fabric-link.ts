import { promises as fs } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import type { Msg, Subscription } from "@nats-io/transport-node";
import { type JobSpec, type Logger, LogThrottle, storedModules, within } from "../core/index.js";
import {
  broadcastAudience,
  EnvelopeSigner,
  EnvelopeVerifier,
  type FabricConnection,
  type MessageBody,
  type MessageKind,
  MODULE_CHUNK_BYTES,
  MODULE_SERVE_MAX_WAIT_MS,
  NODE_CONTROL_LIMITS,
  NODE_MESSAGE_LIMIT,
  NODE_MODULE_BYTES,
  PeerCertificateCache,
  parseSubject,
  type Rate,
  RateLimit,
  ReplayGuard,
  subjects,
  type VerifiedEnvelope,
} from "../fabric/index.js";
import type { Pki } from "../pki/index.js";
import type { Dispatcher, NodeChannel } from "./dispatcher.js";
import type { OrchestratorMetrics } from "./metrics.js";
import type { ModuleStore } from "./module-store.js";
import type { NodeService } from "./node-service.js";
import { type NodeRecord, TERMINAL_EXECUTION_STATES } from "./records.js";
import type { StateStore } from "./state-store.js";

export interface FabricLinkOptions {
  fabric: FabricConnection;
  pki: Pki;
  store: StateStore;
  nodes: NodeService;
  /** The modules nodes fetch for their executions (`module` requests). */
  modules: ModuleStore;
  log: Logger;
  /** The orchestrator's identity certificate and key files. */
  identity: { certFile: string; keyFile: string };
  /** How long a bid or run request may take. @default 10000 */
  requestTimeoutMs?: number;
  /**
   * Issues a node's renewed certificate from its CSR (same identity, new key)
   * and returns the chain; absent means renewal is refused.
   */
  renewCertificate?: (nodeId: string, csrPem: string) => Promise<string>;
  /**
   * In a cluster a node takes the register reply (and with it the chain) of
   * whichever orchestrator answers first: every orchestrator then broadcasts
   * its chain, so the node also verifies the others' bids and runs.
   * @default false
   */
  announceOnRegister?: boolean;
  /**
   * In a cluster: the node's record as stored in the shared KV, whose
   * approval (approved or rejected at any orchestrator) a register adopts.
   */
  storedNode?: (nodeId: string) => Promise<NodeRecord | undefined>;
  /** What one node may send; past it, its messages are dropped unverified. @default NODE_MESSAGE_LIMIT */
  nodeMessageLimit?: Rate;
  /** Counts what is dropped and refused (orchestrator/metrics.ts). */
  metrics?: Pick<OrchestratorMetrics, "nodeMessageDropped" | "nodeMessageRefused">;
  /** What one node may send of its costliest messages; past it, they are dropped unverified. @default NODE_CONTROL_LIMITS */
  nodeControlLimits?: Partial<Record<keyof typeof NODE_CONTROL_LIMITS, Rate>>;
  /**
   * Module bytes served to one node; a `module` request past it waits up to
   * `maxWaitMs`, then is told to ask again.
   * @default { ...NODE_MODULE_BYTES, maxWaitMs: MODULE_SERVE_MAX_WAIT_MS }
   */
  moduleBytesLimit?: Rate & { maxWaitMs: number };
}

const NODE_ID = /^[a-z0-9][a-z0-9_-]{0,62}$/;

/** How long a stop waits for the node messages being handled. */
export const CLOSE_GRACE_MS = 5000;

/**
 * The orchestrator's side of the fabric: one subscription to every node's
 * `.out.>` subjects, where each message is a signed envelope verified against
 * the sender's certificate (chain, validity, role against the subject, replay)
 * before anything looks at its body; and the {@link NodeChannel} the dispatcher
 * uses to send signed bid/run/cancel messages. A node that sends garbage is
 * logged and ignored; one that sends more than its limit has the excess
 * dropped before verification. Either is logged at most once per node every
 * 10 s, with how many lines were held back.
 */
export class FabricLink implements NodeChannel {
  readonly #o: FabricLinkOptions;
  #signer: EnvelopeSigner;
  readonly #verifier: EnvelopeVerifier;
  readonly #peers: PeerCertificateCache;
  #dispatcher: Dispatcher | undefined;
  #sub: Subscription | undefined;
  readonly #revoked = new Set<string>();
  readonly #limit: RateLimit;
  /** Per message kind (register, renew): each node's own limit, within {@link #limit}. */
  readonly #controlLimits = new Map<string, { rate: Rate; limit: RateLimit }>();
  readonly #moduleBytes: RateLimit;
  readonly #moduleMaxWaitMs: number;
  readonly #complaints = new LogThrottle();
  /** The messages being handled: a stop lets them finish (see {@link close}). */
  readonly #handling = new Set<Promise<void>>();

  private constructor(o: FabricLinkOptions, signer: EnvelopeSigner) {
    this.#o = o;
    this.#signer = signer;
    this.#limit = new RateLimit(o.nodeMessageLimit ?? NODE_MESSAGE_LIMIT);
    for (const [kind, rate] of Object.entries({ ...NODE_CONTROL_LIMITS, ...o.nodeControlLimits })) {
      this.#controlLimits.set(kind, { rate, limit: new RateLimit(rate) });
    }
    this.#moduleBytes = new RateLimit(o.moduleBytesLimit ?? NODE_MODULE_BYTES);
    this.#moduleMaxWaitMs = o.moduleBytesLimit?.maxWaitMs ?? MODULE_SERVE_MAX_WAIT_MS;
    this.#peers = new PeerCertificateCache({ caPem: o.pki.caCertPem, trustDomain: o.pki.trustDomain });
    this.#verifier = new EnvelopeVerifier({
      identity: signer.identity,
      peers: this.#peers,
      replayGuard: new ReplayGuard(),
    });
    // Nodes known from before a restart can be verified at once.
    for (const node of o.store.nodes.values()) {
      try {
        if (node.ChainPem) this.#peers.add(node.ChainPem);
      } catch (err) {
        o.log.warn({ node: node.ID, err }, "stored node certificate no longer acceptable");
      }
    }
  }

  static async create(o: FabricLinkOptions): Promise<FabricLink> {
    const [certPem, keyPem] = await Promise.all([
      fs.readFile(o.identity.certFile, "utf8"),
      fs.readFile(o.identity.keyFile, "utf8"),
    ]);
    return new FabricLink(o, new EnvelopeSigner({ certPem, keyPem }));
  }

  /** The dispatcher that status/logs/result messages go to. */
  attach(dispatcher: Dispatcher): void {
    this.#dispatcher = dispatcher;
  }

  async start(): Promise<void> {
    this.#sub = await this.#o.fabric.subscribe(subjects.computeOutAny, {
      callback: (err, msg) => {
        if (err) {
          this.#o.log.error({ err }, "subscription failed");
          return;
        }
        const handling: Promise<void> = this.#handle(msg)
          .catch((e) => this.#o.log.error({ err: e, subject: msg.subject }, "message handling failed"))
          .then(() => {
            this.#handling.delete(handling);
          });
        this.#handling.add(handling);
      },
    });
  }

  /**
   * Takes no more messages, and lets those being handled finish for up to
   * {@link CLOSE_GRACE_MS}: a result being stored is answered, so its node
   * need not send it again to the next orchestrator.
   */
  async close(): Promise<void> {
    this.#sub?.unsubscribe();
    await within(Promise.all(this.#handling), CLOSE_GRACE_MS);
  }

  async bid(nodeId: string, body: MessageBody<"bid">): Promise<MessageBody<"bid-reply">> {
    return this.#request(nodeId, "bid", body, "bid-reply");
  }

  async run(nodeId: string, body: MessageBody<"run">): Promise<MessageBody<"run-reply">> {
    return this.#request(nodeId, "run", body, "run-reply");
  }

  async cancel(nodeId: string, body: MessageBody<"cancel">): Promise<void> {
    this.#o.fabric.publish(
      subjects.computeIn(nodeId),
      this.#signer.sign("cancel", this.#identityOf(nodeId), body),
    );
  }

  /**
   * Applies revocations from the PKI inventory: the certificates stop
   * verifying here at once, and every node is told (broadcast) so it stops
   * trusting them too. Returns how many were new.
   */
  revoke(revoked: readonly { serial: string; fingerprint: string }[]): number {
    const fresh = revoked.filter((r) => !this.#revoked.has(r.serial));
    if (fresh.length === 0) return 0;
    for (const r of fresh) this.#revoked.add(r.serial);
    const body = {
      serials: fresh.map((r) => r.serial),
      fingerprints: fresh.map((r) => r.fingerprint),
      identities: [],
    };
    this.#peers.revoke(body);
    this.#o.fabric.publish(
      subjects.broadcast("revocation"),
      this.#signer.sign("revocation", broadcastAudience(this.#o.pki.trustDomain), body),
    );
    return fresh.length;
  }

  /**
   * Signs with a renewed identity certificate from now on, and first tells
   * every node its chain (broadcast `certificate`), so they verify what it
   * signs next. Nodes that miss it learn the chain from their next register reply.
   */
  async useIdentity(identity: { certFile: string; keyFile: string }): Promise<void> {
    const [certPem, keyPem] = await Promise.all([
      fs.readFile(identity.certFile, "utf8"),
      fs.readFile(identity.keyFile, "utf8"),
    ]);
    this.#signer = new EnvelopeSigner({ certPem, keyPem });
    this.#announce();
  }

  /** Broadcasts this orchestrator's chain (`certificate`), signed with its key. */
  #announce(): void {
    const signer = this.#signer;
    this.#o.fabric.publish(
      subjects.broadcast("certificate"),
      signer.sign("certificate", broadcastAudience(this.#o.pki.trustDomain), { chainPem: signer.chainPem }),
    );
  }

  /** A renew request: a CSR for a new key, signed with the node's current (valid, unrevoked) certificate. */
  async #renew(nodeId: string, body: MessageBody<"renew">): Promise<MessageBody<"renew-reply">> {
    const node = this.#o.store.nodes.get(nodeId);
    if (node?.Approval === "REJECTED") return { reason: `node ${nodeId} is REJECTED` };
    if (!this.#o.renewCertificate) return { reason: "this orchestrator does not renew certificates" };
    try {
      const chainPem = await this.#o.renewCertificate(nodeId, body.csrPem);
      // Messages signed with the new key verify before the node registers again.
      this.#peers.add(chainPem);
      this.#o.log.info({ node: nodeId }, "node certificate renewed");
      return { chainPem };
    } catch (err) {
      const code = (err as { code?: string }).code;
      this.#warn(nodeId, { code, reason: (err as Error).message }, "certificate renewal refused");
      return { reason: `${code ? `${code}: ` : ""}${(err as Error).message}` };
    }
  }

  /**
   * Part of a stored module, for an execution placed on this node, still
   * active, of a job that names the module. Anything else is refused and
   * logged: a node reads only the modules of what it runs. Within the node's
   * module byte rate: past it the answer waits (up to a few seconds), then the
   * node is told to ask again.
   */
  async #module(nodeId: string, body: MessageBody<"module">): Promise<MessageBody<"module-reply">> {
    const refuse = (reason: string, unknown = false): MessageBody<"module-reply"> => {
      // Not known (yet) is asked again by the node: a real refusal is the one worth a warning.
      const fields = { execution: body.executionId, module: body.digest, reason };
      if (unknown) this.#o.log.debug({ node: nodeId, ...fields }, "module refused");
      else this.#warn(nodeId, fields, "module refused");
      return { reason, ...(unknown ? { unknown } : {}) };
    };
    // A record this orchestrator has not followed yet (its follower of the bucket may lag
    // after a server loss) is read from the bucket itself.
    const { store } = this.#o;
    const execution =
      store.executions.get(body.executionId) ??
      (await store.executions.stored(body.executionId).catch(() => undefined));
    if (!execution) return refuse(`execution ${body.executionId} is not known here`, true);
    if (execution.NodeID !== nodeId)
      return refuse(`execution ${body.executionId} is not placed on ${nodeId}`);
    if (TERMINAL_EXECUTION_STATES.has(execution.State)) {
      return refuse(`execution ${body.executionId} is ${execution.State}`);
    }
    const job =
      store.jobs.get(execution.JobID) ?? (await store.jobs.stored(execution.JobID).catch(() => undefined));
    if (!job) return refuse(`job ${execution.JobID} is not known here`, true);
    if (!storedModules(job.Spec as JobSpec).some((m) => m.digest === body.digest)) {
      return refuse(`job ${execution.JobID} does not run module ${body.digest}`);
    }
    const waitMs = this.#moduleBytes.reserve(nodeId, MODULE_CHUNK_BYTES, this.#moduleMaxWaitMs);
    if (waitMs === undefined) return refuse(`${nodeId} asks for more module bytes than it may now`, true);
    if (waitMs > 0) await sleep(waitMs);
    const part = await this.#o.modules.read(body.digest, body.offset, MODULE_CHUNK_BYTES);
    if (!part) return refuse(`module ${body.digest} is not stored`);
    return { size: part.size, data: part.data.toString("base64") };
  }

  /** A warning about what a node sent: at most one line of each per node every 10 s. */
  #warn(nodeId: string, fields: Record<string, unknown>, msg: string): void {
    this.#complaints.warn(this.#o.log, nodeId, { node: nodeId, ...fields }, msg);
  }

  #identityOf(nodeId: string): string {
    return `spiffe://${this.#o.pki.trustDomain}/compute/${nodeId}`;
  }

  async #request<K extends MessageKind, R extends MessageKind>(
    nodeId: string,
    kind: K,
    body: MessageBody<K>,
    replyKind: R,
  ): Promise<MessageBody<R>> {
    const aud = this.#identityOf(nodeId);
    const msg = await this.#o.fabric.request(
      subjects.computeIn(nodeId),
      this.#signer.sign(kind, aud, body),
      this.#o.requestTimeoutMs ?? 10_000,
    );
    const reply = this.#verifier.verify(msg.data, { subject: msg.subject, expectedIss: aud });
    if (reply.kind !== replyKind) throw new Error(`${nodeId} answered ${kind} with ${reply.kind}`);
    return reply.body as MessageBody<R>;
  }

  #reply<K extends MessageKind>(msg: Msg, to: string, kind: K, body: MessageBody<K>): void {
    if (msg.reply) msg.respond(this.#signer.sign(kind, to, body));
  }

  async #handle(msg: Msg): Promise<void> {
    const parsed = parseSubject(msg.subject);
    if (parsed?.type !== "compute-out" || !NODE_ID.test(parsed.nodeId)) return;
    // The broker lets a node publish only on its own subjects: the name is the sender's.
    if (!this.#limit.admit(parsed.nodeId)) {
      this.#overRate(parsed.nodeId, "message", this.#o.nodeMessageLimit ?? NODE_MESSAGE_LIMIT);
      return;
    }
    const control = this.#controlLimits.get(parsed.kind);
    if (control && !control.limit.admit(parsed.nodeId)) {
      this.#overRate(parsed.nodeId, parsed.kind, control.rate);
      return;
    }
    let env: VerifiedEnvelope;
    try {
      // Only a register needs the token as text (for the chain it carries); every
      // other message is verified from its bytes, without a UTF-8 decode.
      if (parsed.kind === "register") this.#learnChain(msg.string());
      env = this.#verifier.verify(msg.data, { subject: msg.subject });
    } catch (err) {
      const code = (err as { code?: string }).code;
      this.#o.metrics?.nodeMessageRefused(code ?? "unknown");
      this.#warn(
        parsed.nodeId,
        { kind: parsed.kind, code, reason: (err as Error).message },
        "fabric message refused",
      );
      return;
    }
    const nodeId = env.sender.id;
    const d = this.#dispatcher;
    switch (env.kind) {
      case "register": {
        const body = env.body as MessageBody<"register">;
        if (body.nodeId !== nodeId) {
          this.#warn(nodeId, { claimed: body.nodeId }, "register names another node; ignored");
          return;
        }
        const stored = await this.#o.storedNode?.(nodeId);
        const node = this.#o.nodes.register(nodeId, body, env.sender.chainPem, stored);
        this.#reply(msg, env.iss, "register-reply", {
          approval: node.Approval,
          heartbeatIntervalMs: this.#o.nodes.heartbeatIntervalMs,
          chainPem: this.#signer.chainPem,
          ...(node.Approval === "APPROVED" ? {} : { reason: `node is ${node.Approval}` }),
        });
        if (this.#o.announceOnRegister) this.#announce();
        d?.reconcile(nodeId, body.executions);
        return;
      }
      case "heartbeat":
        if (!this.#o.nodes.heartbeat(nodeId, env.body as MessageBody<"heartbeat">))
          this.#o.log.debug({ node: nodeId }, "heartbeat from an unregistered node");
        else d?.nodeSeen(nodeId);
        return;
      case "status":
        d?.handleStatus(nodeId, env.body as MessageBody<"status">);
        return;
      case "logs":
        d?.handleLogs(nodeId, env.body as MessageBody<"logs">);
        return;
      case "result-chunk":
        await d?.handleResultChunk(nodeId, env.body as MessageBody<"result-chunk">);
        return;
      case "renew":
        this.#reply(msg, env.iss, "renew-reply", await this.#renew(nodeId, env.body as MessageBody<"renew">));
        return;
      case "module":
        this.#reply(
          msg,
          env.iss,
          "module-reply",
          await this.#module(nodeId, env.body as MessageBody<"module">),
        );
        return;
      case "result": {
        if (!d) return;
        const reply = await d.handleResult(nodeId, env.body as MessageBody<"result">);
        if (reply) this.#reply(msg, env.iss, "result-reply", reply);
        return;
      }
      default:
        this.#warn(nodeId, { kind: env.kind }, "unexpected message kind; ignored");
    }
  }

  /** Logs (at most once per node and kind every 10 s) that a node's messages are dropped for its rate. */
  #overRate(nodeId: string, kind: string, { perSecond, burst }: Rate): void {
    this.#o.metrics?.nodeMessageDropped(kind);
    const held = this.#complaints.pass(`${nodeId}\nrate\n${kind}`);
    if (held === undefined) return;
    this.#o.log.warn(
      { node: nodeId, kind, dropped: held + 1, perSecond, burst },
      `node exceeds its ${kind} rate: messages dropped unverified`,
    );
  }

  /**
   * A `register` carries the sender's chain, needed to verify the envelope
   * itself: the chain is checked against the CA (path validation, role, trust
   * domain) before it is cached; the signature check that follows proves the
   * sender holds its key.
   */
  #learnChain(token: string): void {
    const payload = token.split(".")[1];
    if (!payload) return;
    const claims = JSON.parse(Buffer.from(payload, "base64url").toString("utf8")) as {
      body?: { chainPem?: unknown };
    };
    if (typeof claims.body?.chainPem === "string") this.#peers.add(claims.body.chainPem);
  }
}
