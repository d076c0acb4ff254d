import type { JetStreamClient } from "@nats-io/jetstream";
import { type KV, type KvEntry, Kvm, KvWatchInclude } from "@nats-io/kv";
import { clientKey } from "../core/index.js";
import { checkCsr, publicKeyFingerprint } from "../pki/index.js";
import { ORCHESTRATOR_CODES, OrchestratorError } from "./errors.js";
import { KeyedSerializer } from "./keyed-serializer.js";

/** The KV bucket of enrollment requests that came without a join token. */
export const PENDING_ENROLLMENTS_BUCKET = "shoal-enrollments";
/** Requests waiting for an operator at once, at most; more are refused (429) until some are decided or expire. */
export const MAX_PENDING_ENROLLMENTS = 100;
/** Requests waiting at once from one client address, at most. */
export const MAX_PENDING_PER_ADDRESS = 10;
/** A request (pending, approved or rejected) is forgotten this long after its last change. @default 24 h */
export const PENDING_ENROLLMENT_TTL_MS = 24 * 60 * 60 * 1000;

/** `PENDING` until an operator decides; the decision is kept until the entry expires. */
export type PendingEnrollmentState = "PENDING" | "APPROVED" | "REJECTED";

/** One enrollment request without a token, as stored (key: the node id). */
export interface PendingEnrollment {
  NodeID: string;
  State: PendingEnrollmentState;
  /** `sha256:HEX` of the CSR's public key (SubjectPublicKeyInfo DER): what the node holds. */
  KeyFingerprint: string;
  /** The CSR (signed by the node's key); the certificate is made from it on approval. */
  CSR: string;
  /** The client address the first request came from. */
  Address: string;
  RequestedAt: string;
  DecidedAt?: string;
  /** Who approved or rejected it (the API principal). */
  DecidedBy?: string;
  /** On approval: the node's chain, handed to whoever proves it holds the key. */
  Certificate?: string;
  Serial?: string;
  NotAfter?: string;
  /** On approval: the labels the operator gave the node (`shoal node approve --label`). */
  Labels?: Record<string, string>;
}

export interface PendingEnrollmentsOptions {
  /** Copies of a new bucket (a cluster's JetStream). @default 1 */
  replicas?: number;
  /** @default MAX_PENDING_ENROLLMENTS */
  maxPending?: number;
  /** @default MAX_PENDING_PER_ADDRESS */
  maxPerAddress?: number;
  /** Max age of a new bucket's entries. @default PENDING_ENROLLMENT_TTL_MS */
  ttlMs?: number;
}

/** `sha256:HEX` of the public key of a CSR whose signature checks (the node holds that key). */
export function csrKeyFingerprint(csrPem: string): string {
  return publicKeyFingerprint(checkCsr(csrPem).publicKey);
}

function limitReached(why: string): OrchestratorError {
  return new OrchestratorError(ORCHESTRATOR_CODES.SHOAL_ORCH_ENROLL_LIMIT, why, 429, {
    fix: "an operator approves or rejects waiting nodes (`shoal node list`), or enroll with a join token (`shoal pki join-token create`)",
  });
}

/**
 * Enrollment requests that came without a join token, waiting in JetStream
 * KV for `shoal node approve` / `reject` (straight over KV, no memory copy, so
 * every orchestrator on the same JetStream sees one set). Bounded: at most
 * {@link MAX_PENDING_ENROLLMENTS} waiting, {@link MAX_PENDING_PER_ADDRESS}
 * from one address (decided requests do not count), and every entry expires
 * {@link PENDING_ENROLLMENT_TTL_MS} after its last change (the bucket's max age), so anonymous callers cannot
 * fill the store. An entry belongs to the key of its first CSR: a request for
 * the same id with another key is refused, never merged.
 */
export class PendingEnrollments {
  readonly #kv: KV;
  readonly #maxPending: number;
  readonly #maxPerAddress: number;
  readonly #ttlMs: number;
  /** New entries are counted and created one at a time, so the bounds hold under a burst. */
  readonly #creating = new KeyedSerializer();
  /**
   * Every entry as last seen (a watch of the bucket keeps it current), for
   * listing and counting without a KV round trip; decisions and polls read KV.
   */
  readonly #seen = new Map<string, { value: PendingEnrollment; revision: number; changed: number }>();
  #stopWatch: (() => void) | undefined;

  private constructor(kv: KV, o: PendingEnrollmentsOptions) {
    this.#kv = kv;
    this.#maxPending = o.maxPending ?? MAX_PENDING_ENROLLMENTS;
    this.#maxPerAddress = o.maxPerAddress ?? MAX_PENDING_PER_ADDRESS;
    this.#ttlMs = o.ttlMs ?? PENDING_ENROLLMENT_TTL_MS;
  }

  /** Stops following the bucket. */
  close(): void {
    this.#stopWatch?.();
  }

  /** Watches first, then loads: a change made meanwhile arrives either way, the newer revision wins. */
  async #follow(): Promise<void> {
    const watch = await this.#kv.watch({ include: KvWatchInclude.UpdatesOnly });
    this.#stopWatch = () => watch.stop();
    void (async () => {
      for await (const e of watch) this.#see(e);
    })().catch(() => {
      // Stopped with close(); listing then shows what was last seen.
    });
    const keys: string[] = [];
    for await (const k of await this.#kv.keys()) keys.push(k);
    for (const e of await Promise.all(keys.map((k) => this.#kv.get(k)))) if (e) this.#see(e);
  }

  #see(e: Pick<KvEntry, "key" | "revision" | "operation" | "length" | "created" | "json">): void {
    const known = this.#seen.get(e.key);
    if (known && known.revision >= e.revision) return;
    if (e.operation === "PUT" && e.length > 0) {
      this.#seen.set(e.key, {
        value: e.json<PendingEnrollment>(),
        revision: e.revision,
        changed: e.created.getTime(),
      });
    } else {
      this.#seen.delete(e.key);
    }
  }

  #remember(value: PendingEnrollment, revision: number): void {
    this.#see({
      key: value.NodeID,
      revision,
      operation: "PUT",
      length: 1,
      created: new Date(),
      json: <T>() => value as T,
    });
  }

  /** Opens (creating if needed) the bucket; a new bucket gets `replicas` copies and `ttlMs` max age. */
  static async open(
    js: JetStreamClient,
    options: PendingEnrollmentsOptions = {},
  ): Promise<PendingEnrollments> {
    const kv = await new Kvm(js).create(PENDING_ENROLLMENTS_BUCKET, {
      history: 1,
      replicas: options.replicas ?? 1,
      ttl: options.ttlMs ?? PENDING_ENROLLMENT_TTL_MS,
    });
    const store = new PendingEnrollments(kv, options);
    await store.#follow();
    return store;
  }

  async get(nodeId: string): Promise<PendingEnrollment | undefined> {
    return (await this.#entry(nodeId))?.value;
  }

  /**
   * Every request, oldest first, as this orchestrator last saw them (another
   * orchestrator's change arrives within a moment); expired ones are left out
   * (JetStream drops them without telling watchers).
   */
  async list(): Promise<PendingEnrollment[]> {
    const cutoff = Date.now() - this.#ttlMs;
    return [...this.#seen.values()]
      .filter((e) => e.changed > cutoff)
      .map((e) => e.value)
      .sort((a, b) => a.RequestedAt.localeCompare(b.RequestedAt));
  }

  /**
   * A request for `nodeId` with a CSR (already checked, `keyFingerprint` its
   * key): the stored entry when it is for the same key, else a new PENDING
   * one within the bounds.
   *
   * @throws OrchestratorError SHOAL_ORCH_NODE_ID_TAKEN (409) when another key
   *   asked for this id first; SHOAL_ORCH_ENROLL_LIMIT (429) over a bound.
   */
  async request(req: {
    nodeId: string;
    csrPem: string;
    keyFingerprint: string;
    address: string;
    now?: Date;
  }): Promise<PendingEnrollment> {
    return this.#creating.run("create", async () => {
      const existing = await this.get(req.nodeId);
      if (existing) {
        if (existing.KeyFingerprint !== req.keyFingerprint) {
          throw new OrchestratorError(
            ORCHESTRATOR_CODES.SHOAL_ORCH_NODE_ID_TAKEN,
            `node id ${req.nodeId} already has an enrollment request from another key (${existing.KeyFingerprint})`,
            409,
            {
              fix: `enroll with another --id, or have an operator reject the other request (\`shoal node reject ${req.nodeId}\`) and wait for it to expire`,
              field: "NodeID",
            },
          );
        }
        return existing;
      }
      const waiting = (await this.list()).filter((e) => e.State === "PENDING");
      if (waiting.length >= this.#maxPending) {
        throw limitReached(`${waiting.length} enrollment requests already wait for approval`);
      }
      const client = clientKey(req.address);
      if (waiting.filter((e) => clientKey(e.Address) === client).length >= this.#maxPerAddress) {
        throw limitReached(
          `${this.#maxPerAddress} enrollment requests from ${req.address} already wait for approval`,
        );
      }
      const entry: PendingEnrollment = {
        NodeID: req.nodeId,
        State: "PENDING",
        KeyFingerprint: req.keyFingerprint,
        CSR: req.csrPem,
        Address: req.address,
        RequestedAt: (req.now ?? new Date()).toISOString(),
      };
      this.#remember(entry, await this.#kv.create(req.nodeId, JSON.stringify(entry)));
      return entry;
    });
  }

  /**
   * Records an operator's decision on a PENDING request, unless someone else
   * decided it first (compare-and-set on the entry's revision). `decide`
   * makes the decided entry from the stored one (e.g. signs its CSR).
   *
   * @throws OrchestratorError SHOAL_ORCH_NODE_NOT_FOUND when there is no PENDING request for the id.
   */
  async decide(
    nodeId: string,
    decide: (pending: PendingEnrollment) => Promise<PendingEnrollment>,
  ): Promise<PendingEnrollment> {
    const notPending = (cause?: unknown) =>
      new OrchestratorError(
        ORCHESTRATOR_CODES.SHOAL_ORCH_NODE_NOT_FOUND,
        `no node ${nodeId} and no enrollment request of it waiting for a decision`,
        404,
        { cause, fix: "list nodes and waiting enrollments with `shoal node list`" },
      );
    const entry = await this.#entry(nodeId);
    if (entry?.value.State !== "PENDING") throw notPending();
    const decided = await decide(entry.value);
    try {
      this.#remember(decided, await this.#kv.update(nodeId, JSON.stringify(decided), entry.revision));
    } catch (cause) {
      // Another operator (or orchestrator) decided first.
      throw notPending(cause);
    }
    return decided;
  }

  async #entry(nodeId: string): Promise<{ value: PendingEnrollment; revision: number } | undefined> {
    const e = await this.#kv.get(nodeId);
    if (e?.operation !== "PUT" || e.length === 0) return undefined;
    return { value: e.json<PendingEnrollment>(), revision: e.revision };
  }
}
