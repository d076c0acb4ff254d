import type { Logger } from "../core/index.js";
import type { Approval, MessageBody } from "../fabric/protocol.js";
import { nodeNotFound, ORCHESTRATOR_CODES, OrchestratorError, storeUnavailable } from "./errors.js";
import type { PendingEnrollment } from "./pending-enrollments.js";
import type { NodeHealth, NodeRecord } from "./records.js";
import type { StateStore } from "./state-store.js";

export interface NodeServiceOptions {
  store: StateStore;
  log: Logger;
  /** `Orchestrator.NodeManager.ManualApproval`: new nodes wait for `shoal node approve`. */
  manualApproval: boolean;
  /** `Orchestrator.NodeManager.DisconnectTimeout` in ms: no heartbeat for this long → LOST. */
  disconnectTimeoutMs: number;
  /** How often nodes are told to send heartbeats (`register-reply`). */
  heartbeatIntervalMs: number;
  /** Called when a node goes LOST (its executions must move elsewhere). */
  onLost?: (node: NodeRecord) => void;
  /**
   * Takes the node's identity away (certificates revoked, broker user gone,
   * revocation broadcast); resolves to false when no such identity exists.
   */
  revokeIdentity?: (id: string) => Promise<boolean>;
  /** Enrollment requests without a join token, listed and decided with the nodes. */
  enrollments?: EnrollmentDesk;
}

/** Enrollment requests without a token that wait for an operator (EnrollmentService). */
export interface EnrollmentDesk {
  listPending(): Promise<PendingEnrollment[]>;
  getPending(id: string): Promise<PendingEnrollment | undefined>;
  approvePending(id: string, by: string, labels: Record<string, string>): Promise<PendingEnrollment>;
  rejectPending(id: string, by: string): Promise<PendingEnrollment>;
}

/**
 * A node as the API lists it: everything but its certificate chain. A node
 * that asked to enroll without a token and has not connected yet has Health
 * `NOT_CONNECTED` and its request under `Enrollment`.
 */
export type NodeView = Omit<NodeRecord, "ChainPem" | "Health"> & {
  Health: NodeHealth | "NOT_CONNECTED";
  Enrollment?: Omit<PendingEnrollment, "NodeID" | "CSR" | "Certificate">;
};

function view(node: NodeRecord): NodeView {
  const { ChainPem: _chain, ...rest } = node;
  return rest;
}

function enrollmentView(e: PendingEnrollment): NodeView {
  const { NodeID, CSR: _csr, Certificate: _cert, ...enrollment } = e;
  const requested = Date.parse(e.RequestedAt);
  return {
    ID: NodeID,
    Labels: e.Labels ?? {},
    Capacity: { cpu: 0, memory: 0 },
    Engines: [],
    Version: "",
    Approval: e.State,
    Health: "NOT_CONNECTED",
    LastSeen: requested,
    FirstSeen: requested,
    Enrollment: enrollment,
  };
}

/**
 * The node registry: registration, heartbeats, approval and health. A node
 * with no heartbeat for half the disconnect timeout is UNHEALTHY (no new work),
 * for the whole timeout LOST (its executions are rescheduled). Each node has one
 * timer re-armed by its heartbeats, so nothing polls.
 */
export class NodeService {
  readonly #o: NodeServiceOptions;
  readonly #timers = new Map<string, { unhealthy: NodeJS.Timeout; lost: NodeJS.Timeout }>();
  /** When each node's disk condition last changed its record: at most once per heartbeat interval. */
  readonly #lowDiskChanged = new Map<string, number>();

  constructor(options: NodeServiceOptions) {
    this.#o = options;
  }

  /** How often nodes are told to send heartbeats. */
  get heartbeatIntervalMs(): number {
    return this.#o.heartbeatIntervalMs;
  }

  /** Arms the health timers of nodes loaded from KV (after a restart they must check in again). */
  start(): void {
    for (const node of this.#o.store.nodes.values()) {
      if (node.Health !== "LOST") this.#arm(node.ID);
    }
  }

  close(): void {
    for (const t of this.#timers.values()) {
      clearTimeout(t.unhealthy);
      clearTimeout(t.lost);
    }
    this.#timers.clear();
  }

  /** Every node, and every enrollment request still waiting for a decision (as PENDING). */
  async list(): Promise<NodeView[]> {
    const nodes = [...this.#o.store.nodes.values()].map(view);
    const waiting = (await this.#o.enrollments?.listPending()) ?? [];
    for (const e of waiting) {
      if (e.State === "PENDING" && !this.#o.store.nodes.has(e.NodeID)) nodes.push(enrollmentView(e));
    }
    return nodes.sort((a, b) => a.ID.localeCompare(b.ID));
  }

  async get(id: string): Promise<NodeView> {
    const node = this.#o.store.nodes.get(id);
    if (node) return view(node);
    const enrollment = await this.#o.enrollments?.getPending(id);
    if (enrollment) return enrollmentView(enrollment);
    throw nodeNotFound(id);
  }

  /** The full record, for the dispatcher (capacity, labels, chain). */
  record(id: string): NodeRecord | undefined {
    return this.#o.store.nodes.get(id);
  }

  /**
   * Lets a PENDING node take jobs; for a waiting enrollment request, issues
   * its certificate, with `labels` for the node (as a join token gives them).
   * A registered node's labels are its own (join token or Compute.Labels):
   * labels for it are refused (SHOAL_ORCH_REQUEST_INVALID, field Labels).
   */
  async approve(id: string, by = "unknown", labels?: Record<string, string>): Promise<NodeView> {
    if (!this.#o.store.nodes.has(id) && this.#o.enrollments) {
      return enrollmentView(await this.#o.enrollments.approvePending(id, by, labels ?? {}));
    }
    if (labels && Object.keys(labels).length > 0) {
      throw new OrchestratorError(
        ORCHESTRATOR_CODES.SHOAL_ORCH_REQUEST_INVALID,
        `${id} is a registered node: its labels come from its join token or Compute.Labels, not from approval`,
        400,
        {
          fix: "approve without --label; set the node's Compute.Labels, or enroll it with a join token carrying the labels",
          field: "Labels",
        },
      );
    }
    return this.#setApproval(id, "APPROVED");
  }

  /** Refuses a node work; for a waiting enrollment request, refuses it (nothing is issued). */
  async reject(id: string, by = "unknown"): Promise<NodeView> {
    if (!this.#o.store.nodes.has(id) && this.#o.enrollments) {
      return enrollmentView(await this.#o.enrollments.rejectPending(id, by));
    }
    return this.#setApproval(id, "REJECTED");
  }

  /**
   * Deletes a node: its identity is revoked first (its connection is closed
   * and its messages refused by the time this resolves; it may not enroll
   * again), then the record is forgotten and its executions move elsewhere.
   * A node that never registered but holds a certificate is revoked too.
   */
  async delete(id: string): Promise<void> {
    const known = (await this.#o.revokeIdentity?.(id)) ?? false;
    const node = this.#o.store.nodes.get(id);
    if (!node) {
      if (known) return;
      throw nodeNotFound(id);
    }
    this.#disarm(id);
    this.#o.store.deleteNode(id);
    await this.#stored(id);
    this.#o.onLost?.({ ...node, Health: "LOST" });
  }

  /**
   * Records a `register` from the node proven to be `nodeId`; returns its
   * approval. `stored` is the record in the shared KV (a cluster): its
   * approval, which another orchestrator may have decided, wins.
   */
  register(nodeId: string, body: MessageBody<"register">, chainPem: string, stored?: NodeRecord): NodeRecord {
    const now = Date.now();
    const prev = this.#o.store.nodes.get(nodeId);
    const approval: Approval =
      stored?.Approval ?? prev?.Approval ?? (this.#o.manualApproval ? "PENDING" : "APPROVED");
    const node: NodeRecord = {
      ID: nodeId,
      Labels: body.labels,
      Capacity: body.capacity,
      Engines: body.engines,
      Version: body.version,
      Approval: approval,
      Health: "HEALTHY",
      LastSeen: now,
      FirstSeen: prev?.FirstSeen ?? now,
      ChainPem: chainPem,
      ...(body.lowDisk === undefined ? {} : { LowDisk: body.lowDisk }),
    };
    this.#o.store.putNode(node);
    this.#arm(nodeId);
    if (!prev) this.#o.log.info({ node: nodeId, approval }, "node registered");
    return node;
  }

  /**
   * Records a heartbeat; false when the node is unknown (it must register
   * first). The record is written only when something the scheduler reads
   * changed: its health, or whether its disk is short of room. The latter at
   * most once per heartbeat interval, so that a node flipping it in every
   * message (up to its message rate) cannot turn each into a state write and
   * a log line; a node repeats it in every heartbeat, so a change held back
   * is taken from a later one.
   */
  heartbeat(nodeId: string, body?: Pick<MessageBody<"heartbeat">, "lowDisk">): boolean {
    const node = this.#o.store.nodes.get(nodeId);
    if (!node) return false;
    const now = Date.now();
    const recent = now - (this.#lowDiskChanged.get(nodeId) ?? 0) < this.#o.heartbeatIntervalMs;
    const lowDisk = recent ? node.LowDisk : body?.lowDisk;
    if (lowDisk !== node.LowDisk) this.#lowDiskChanged.set(nodeId, now);
    if (node.Health !== "HEALTHY" || lowDisk !== node.LowDisk) {
      const { LowDisk: _was, ...rest } = node;
      this.#o.store.putNode({
        ...rest,
        Health: "HEALTHY",
        LastSeen: now,
        ...(lowDisk === undefined ? {} : { LowDisk: lowDisk }),
      });
      if (node.Health !== "HEALTHY") this.#o.log.info({ node: nodeId }, "node healthy again");
      if (lowDisk !== node.LowDisk) {
        if (lowDisk === undefined) this.#o.log.info({ node: nodeId }, "node has room on its disk again");
        else
          this.#o.log.warn({ node: nodeId, lowDisk }, "node is short of room on its disk: no jobs go there");
      }
    } else {
      // LastSeen is kept in memory on every beat but written to KV only on health changes.
      node.LastSeen = now;
    }
    this.#arm(nodeId);
    return true;
  }

  async #setApproval(id: string, approval: Approval): Promise<NodeView> {
    const node = this.#require(id);
    const next = { ...node, Approval: approval };
    this.#o.store.putNode(next);
    await this.#stored(id);
    this.#o.log.info({ node: id, approval }, "node approval changed");
    if (approval === "REJECTED") this.#o.onLost?.(next);
    return view(next);
  }

  /** Resolves when the node's record, as changed so far, is stored (another record's failed write does not fail it). */
  async #stored(id: string): Promise<void> {
    try {
      await this.#o.store.nodes.flush([id]);
    } catch (cause) {
      throw storeUnavailable(`the change to node ${id} could not be stored`, cause);
    }
  }

  #require(id: string): NodeRecord {
    const node = this.#o.store.nodes.get(id);
    if (!node) throw nodeNotFound(id);
    return node;
  }

  #arm(id: string): void {
    const t = this.#timers.get(id);
    if (t) {
      t.unhealthy.refresh();
      t.lost.refresh();
      return;
    }
    const timeout = this.#o.disconnectTimeoutMs;
    const unhealthy = setTimeout(() => this.#mark(id, "UNHEALTHY"), Math.max(1, Math.floor(timeout / 2)));
    const lost = setTimeout(() => {
      this.#disarm(id);
      this.#mark(id, "LOST");
    }, timeout);
    unhealthy.unref();
    lost.unref();
    this.#timers.set(id, { unhealthy, lost });
  }

  #disarm(id: string): void {
    const t = this.#timers.get(id);
    if (!t) return;
    clearTimeout(t.unhealthy);
    clearTimeout(t.lost);
    this.#timers.delete(id);
    this.#lowDiskChanged.delete(id);
  }

  #mark(id: string, health: "UNHEALTHY" | "LOST"): void {
    const node = this.#o.store.nodes.get(id);
    if (!node || node.Health === health || node.Health === "LOST") return;
    const next = { ...node, Health: health };
    this.#o.store.putNode(next);
    this.#o.log.warn(
      { node: id, health, lastSeen: new Date(node.LastSeen).toISOString() },
      "node health changed",
    );
    if (health === "LOST") this.#o.onLost?.(next);
  }
}
