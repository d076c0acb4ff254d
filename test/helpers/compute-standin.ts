import { promises as fs } from "node:fs";
import path from "node:path";
import type { Msg, Subscription } from "@nats-io/transport-node";
import { loadConfig, readFileChecked, type ShoalConfig } from "../../core/index.js";
import {
  type Approval,
  connectFabric,
  EnvelopeSigner,
  EnvelopeVerifier,
  type FabricConnection,
  type MessageBody,
  type MessageKind,
  PeerCertificateCache,
  parseSubject,
  ReplayGuard,
  subjects,
  type VerifiedEnvelope,
} from "../../fabric/index.js";
import type { TestFabric, TestIdentity } from "./nats.js";

/** What tap's `t` offers that the stand-in needs. */
interface Teardown {
  teardown(fn: () => unknown): void;
}

/**
 * The orchestrator's half of the job protocol, played by a test: a real
 * orchestrator identity on the real broker, with real signed envelopes
 * (EnvelopeSigner/EnvelopeVerifier from the fabric). It records every verified
 * message nodes send, answers `register` and `result` as the test decides, and
 * sends bid/run/cancel. Not a mock: nothing here bypasses TLS, the broker's
 * permissions or envelope verification.
 */
export class OrchestratorStandIn {
  /** Answer to `register`. */
  approval: Approval = "APPROVED";
  heartbeatIntervalMs = 200;
  /** Answer to `result`: a reply body, or `undefined` to stay silent (the node times out). */
  resultReply: (body: MessageBody<"result">) => MessageBody<"result-reply"> | undefined = () => ({
    stored: true,
  });
  /** Every verified message from nodes, in arrival order. */
  readonly received: VerifiedEnvelope[] = [];
  /** Messages refused by verification, with the reason code. */
  readonly refused: { subject: string; code: string }[] = [];
  readonly #consumed = new Set<VerifiedEnvelope>();
  readonly #waiters = new Set<() => void>();
  #sub: Subscription | undefined;

  private constructor(
    readonly fabric: FabricConnection,
    readonly signer: EnvelopeSigner,
    readonly verifier: EnvelopeVerifier,
    readonly peers: PeerCertificateCache,
    readonly trustDomain: string,
  ) {}

  static async start(
    t: Teardown,
    testFabric: TestFabric,
    identity: TestIdentity,
  ): Promise<OrchestratorStandIn> {
    const fabric = await connectFabric({
      servers: testFabric.url,
      caFile: testFabric.caFile,
      certFile: identity.certFile,
      keyFile: identity.keyFile,
      identity: identity.spiffeId,
      reconnectTimeWaitMs: 100,
      reconnectJitterMs: 100,
    });
    t.teardown(() => fabric.close());
    const [certPem, keyPem] = await Promise.all([
      readFileChecked(identity.certFile),
      readFileChecked(identity.keyFile),
    ]);
    const signer = new EnvelopeSigner({ certPem: certPem.toString(), keyPem: keyPem.toString() });
    const peers = new PeerCertificateCache({ caPem: testFabric.caPem, trustDomain: testFabric.trustDomain });
    const verifier = new EnvelopeVerifier({
      identity: identity.spiffeId,
      peers,
      replayGuard: new ReplayGuard(),
    });
    const standIn = new OrchestratorStandIn(fabric, signer, verifier, peers, testFabric.trustDomain);
    standIn.#sub = await fabric.subscribe(subjects.computeOutAny, {
      callback: (err, msg) => {
        if (!err) standIn.#handle(msg);
      },
    });
    return standIn;
  }

  #handle(msg: Msg): void {
    const token = msg.string();
    let env: VerifiedEnvelope;
    try {
      if (parseSubject(msg.subject)?.type === "compute-out" && msg.subject.endsWith(".register")) {
        const claims = JSON.parse(Buffer.from(token.split(".")[1] ?? "", "base64url").toString()) as {
          body?: { chainPem?: string };
        };
        if (claims.body?.chainPem) this.peers.add(claims.body.chainPem);
      }
      env = this.verifier.verify(token, { subject: msg.subject });
    } catch (err) {
      this.refused.push({ subject: msg.subject, code: (err as { code?: string }).code ?? "unknown" });
      return;
    }
    this.received.push(env);
    if (env.kind === "register") {
      msg.respond(
        this.signer.sign("register-reply", env.iss, {
          approval: this.approval,
          heartbeatIntervalMs: this.heartbeatIntervalMs,
          chainPem: this.signer.chainPem,
        }),
      );
    } else if (env.kind === "result") {
      const reply = this.resultReply(env.body as MessageBody<"result">);
      if (reply) msg.respond(this.signer.sign("result-reply", env.iss, reply));
    }
    for (const wake of [...this.#waiters]) wake();
  }

  /**
   * The next message of `kind` (matching `match`) not returned before, waiting
   * for it if needed. Rejects after `limitMs` so a broken node fails the test
   * with a message instead of hanging it.
   */
  async next<K extends MessageKind>(
    kind: K,
    match: (body: MessageBody<K>) => boolean = () => true,
    limitMs = 30_000,
  ): Promise<VerifiedEnvelope<K>> {
    const deadline = Date.now() + limitMs;
    for (;;) {
      const found = this.received.find(
        (e) => !this.#consumed.has(e) && e.kind === kind && match(e.body as MessageBody<K>),
      );
      if (found) {
        this.#consumed.add(found);
        return found as VerifiedEnvelope<K>;
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no ${kind} message arrived within ${limitMs} ms`);
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          this.#waiters.delete(done);
          resolve();
        };
        const timer = setTimeout(done, left);
        this.#waiters.add(done);
      });
    }
  }

  nodeIdentity(nodeId: string): string {
    return `spiffe://${this.trustDomain}/compute/${nodeId}`;
  }

  /** A signed request to a node; returns the verified reply (which must come from that node). */
  async request<K extends MessageKind>(
    nodeId: string,
    kind: K,
    body: MessageBody<K>,
  ): Promise<VerifiedEnvelope> {
    const aud = this.nodeIdentity(nodeId);
    const msg = await this.fabric.request(
      subjects.computeIn(nodeId),
      this.signer.sign(kind, aud, body),
      10_000,
    );
    return this.verifier.verify(msg.string(), { subject: msg.subject, expectedIss: aud });
  }

  publish<K extends MessageKind>(nodeId: string, kind: K, body: MessageBody<K>): void {
    this.fabric.publish(subjects.computeIn(nodeId), this.signer.sign(kind, this.nodeIdentity(nodeId), body));
  }

  async close(): Promise<void> {
    this.#sub?.unsubscribe();
    await this.fabric.close();
  }
}

/** A compute node's config for a test fabric: its own data dir and certificate files. */
export function computeConfig(
  testFabric: TestFabric,
  identity: TestIdentity,
  dataDir: string,
  overrides: string[] = [],
): Promise<ShoalConfig> {
  return loadConfig({
    env: {},
    overrides,
    flags: {
      DataDir: dataDir,
      "Compute.Orchestrators": [testFabric.url],
      "Compute.TLS.CACert": testFabric.caFile,
      "Compute.TLS.ClientCert": identity.certFile,
      "Compute.TLS.ClientKey": identity.keyFile,
      "Compute.Heartbeat.Interval": "200ms",
    },
  });
}

/**
 * The work directories under `root` (a node's `executions/`) that hold more
 * than an empty `inputs/` and `outputs/` (and an empty marker): in use or left
 * behind. The others are ready for the next executions (made ahead, or given
 * back by an earlier one).
 */
export async function workDirsInUse(root: string): Promise<string[]> {
  const inUse: string[] = [];
  for (const name of await fs.readdir(root).catch(() => [] as string[])) {
    const entries = await fs.readdir(path.join(root, name)).catch(() => [] as string[]);
    const empty = async (sub: string) => (await fs.readdir(path.join(root, name, sub))).length === 0;
    // Given back by an earlier execution: with its marker, emptied.
    const marker = entries.includes("execution.json")
      ? (await fs.readFile(path.join(root, name, "execution.json"), "utf8").catch(() => "x")) === ""
      : true;
    const ready =
      marker &&
      entries.length === (entries.includes("execution.json") ? 3 : 2) &&
      entries.includes("inputs") &&
      entries.includes("outputs") &&
      (await empty("inputs").catch(() => false)) &&
      (await empty("outputs").catch(() => false));
    if (!ready) inUse.push(name);
  }
  return inUse;
}
