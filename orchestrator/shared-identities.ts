import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import { type KV, Kvm, KvWatchInclude } from "@nats-io/kv";
import type { Logger } from "../core/index.js";
import type { BrokerIdentity } from "../fabric/index.js";
import {
  expiredLongAgo,
  type InventoryEntry,
  type RevocationReason,
  type RevokedIdentity,
} from "../pki/index.js";

/** The KV bucket where every orchestrator of a cluster publishes the fabric identities its PKI issued. */
export const IDENTITIES_BUCKET = "shoal-identities";

/** One issued orchestrator or compute certificate, keyed by serial in {@link IDENTITIES_BUCKET}. */
export interface SharedIdentityRecord {
  serial: string;
  spiffeId: string;
  /** SHA-256 fingerprint of the certificate (what envelope verifiers revoke by). */
  fingerprint: string;
  /** ISO 8601. */
  notBefore: string;
  notAfter: string;
  revoked: boolean;
}

/** An identity barred from enrolling again (`shoal node delete`), keyed `bar.<base64url(spiffeId)>`. */
export interface SharedBarRecord {
  spiffeId: string;
  reason: RevocationReason;
  /** ISO 8601. */
  revokedAt: string;
}

const BAR_PREFIX = "bar.";
const barKey = (spiffeId: string) => `${BAR_PREFIX}${Buffer.from(spiffeId).toString("base64url")}`;

/** What the inventory says about an identity certificate, as a shared record (undefined for other roles). */
export function sharedRecord(e: InventoryEntry): SharedIdentityRecord | undefined {
  if (!e.spiffeId || (e.role !== "compute" && e.role !== "orchestrator")) return undefined;
  return {
    serial: e.serial,
    spiffeId: e.spiffeId,
    fingerprint: e.fingerprint,
    notBefore: e.notBefore.toISOString(),
    notAfter: e.notAfter.toISOString(),
    revoked: e.status === "revoked",
  };
}

/**
 * The fabric identities of every orchestrator of a cluster, shared over
 * JetStream KV: each orchestrator publishes what its own PKI inventory
 * issued (enrollments, renewals, `shoal pki issue`) and revoked, and every
 * broker of the cluster admits the union. So a node enrolled at one
 * orchestrator may connect to any server of the cluster, and a revocation
 * at one closes the node's connection on all of them.
 *
 * A revocation is never undone: a record stored as revoked stays revoked,
 * whatever an orchestrator with an older copy of the inventory publishes.
 * Identities barred from enrolling again are shared too, so a node deleted at
 * one orchestrator cannot enroll again at another. A certificate that expired
 * longer ago than the inventory keeps it (EXPIRED_RETENTION_MS) is purged
 * from the bucket, as from each inventory, so the bucket does not grow with
 * every renewal ever made.
 */
export class SharedIdentities {
  readonly #kv: KV;
  readonly #jsm: JetStreamManager;
  readonly #log: Logger;
  readonly #records = new Map<string, SharedIdentityRecord>();
  /** By SPIFFE id. */
  readonly #bars = new Map<string, SharedBarRecord>();
  #stop: (() => void) | undefined;

  private constructor(kv: KV, jsm: JetStreamManager, log: Logger) {
    this.#kv = kv;
    this.#jsm = jsm;
    this.#log = log;
  }

  /** Opens (creating with `replicas` copies if needed) the bucket and loads it. */
  static async open(js: JetStreamClient, log: Logger, replicas = 1): Promise<SharedIdentities> {
    const kv = await new Kvm(js).create(IDENTITIES_BUCKET, { history: 1, replicas });
    const shared = new SharedIdentities(kv, await js.jetstreamManager(), log);
    for await (const key of await kv.keys()) {
      const e = await kv.get(key);
      if (e?.operation === "PUT" && e.length > 0) shared.#remember(key, e.json());
    }
    return shared;
  }

  /**
   * Calls `onChange` after another orchestrator (or this one) publishes a
   * change, until {@link close}. Resolves once the watcher is subscribed.
   */
  async watch(onChange: () => void): Promise<void> {
    const w = await this.#kv.watch({ include: KvWatchInclude.UpdatesOnly });
    this.#stop = () => w.stop();
    void (async () => {
      for await (const e of w) {
        if (e.operation !== "PUT" || e.length === 0) continue;
        if (e.key.startsWith(BAR_PREFIX)) {
          if (this.#remember(e.key, e.json())) onChange();
          continue;
        }
        const record = e.json<SharedIdentityRecord>();
        const before = this.#records.get(e.key);
        if (before?.revoked && !record.revoked) continue;
        this.#records.set(e.key, record);
        if (JSON.stringify(before) !== JSON.stringify(record)) onChange();
      }
    })().catch((err) => this.#log.error({ err }, "shared identities watcher stopped"));
  }

  /** Stores a loaded or watched bar (true when new); certificate records go to the certificate map. */
  #remember(key: string, value: SharedBarRecord | SharedIdentityRecord): boolean {
    if (!key.startsWith(BAR_PREFIX)) {
      this.#records.set(key, value as SharedIdentityRecord);
      return false;
    }
    const bar = value as SharedBarRecord;
    if (this.#bars.has(bar.spiffeId)) return false;
    this.#bars.set(bar.spiffeId, bar);
    return true;
  }

  /** Publishes the local inventory's bars that the cluster does not know yet. */
  async publishBars(bars: readonly RevokedIdentity[]): Promise<void> {
    for (const b of bars) {
      if (this.#bars.has(b.spiffeId)) continue;
      const bar: SharedBarRecord = {
        spiffeId: b.spiffeId,
        reason: b.reason,
        revokedAt: b.revokedAt.toISOString(),
      };
      this.#bars.set(b.spiffeId, bar);
      await this.#kv.put(barKey(b.spiffeId), JSON.stringify(bar));
    }
  }

  /** Every identity some orchestrator of the cluster barred from enrolling again. */
  bars(): SharedBarRecord[] {
    return [...this.#bars.values()];
  }

  /**
   * Publishes the local inventory's identity certificates that are new, or
   * newly revoked, and purges the records of certificates that expired
   * longer ago than the inventories keep them.
   */
  async publish(entries: readonly InventoryEntry[], now = new Date()): Promise<void> {
    await this.#purgeExpired(now);
    for (const e of entries) {
      const record = sharedRecord(e);
      if (!record || expiredLongAgo(new Date(record.notAfter), now)) continue;
      const stored = this.#records.get(record.serial);
      if (stored && (stored.revoked || !record.revoked)) continue;
      this.#records.set(record.serial, record);
      await this.#kv.put(record.serial, JSON.stringify(record));
    }
  }

  /**
   * Removes the records of long-expired certificates, here and from the
   * bucket's stream by subject (a KV delete would leave a marker for good).
   * Other orchestrators are not told: each drops them by the same rule.
   */
  async #purgeExpired(now: Date): Promise<void> {
    for (const [key, record] of this.#records) {
      if (!expiredLongAgo(new Date(record.notAfter), now)) continue;
      await this.#jsm.streams.purge(`KV_${IDENTITIES_BUCKET}`, { filter: `$KV.${IDENTITIES_BUCKET}.${key}` });
      this.#records.delete(key);
    }
  }

  /**
   * Marks every shared certificate of `spiffeId` revoked (e.g. a node enrolled
   * at another orchestrator and deleted here); returns the serials it revoked.
   */
  async revokeIdentity(spiffeId: string): Promise<string[]> {
    const serials: string[] = [];
    for (const record of this.#records.values()) {
      if (record.spiffeId !== spiffeId || record.revoked) continue;
      const revoked = { ...record, revoked: true };
      this.#records.set(record.serial, revoked);
      await this.#kv.put(record.serial, JSON.stringify(revoked));
      serials.push(record.serial);
    }
    return serials;
  }

  /** Whether any orchestrator of the cluster issued a certificate for `spiffeId`. */
  knows(spiffeId: string): boolean {
    return [...this.#records.values()].some((r) => r.spiffeId === spiffeId);
  }

  /** The shared identity certificates whose serial is not in `local`, for the broker's users. */
  identities(local: ReadonlySet<string>): BrokerIdentity[] {
    return [...this.#records.values()]
      .filter((r) => !local.has(r.serial))
      .map((r) => ({
        spiffeId: r.spiffeId,
        notBefore: new Date(r.notBefore),
        notAfter: new Date(r.notAfter),
        revoked: r.revoked,
      }));
  }

  /** The revoked certificates, for envelope verifiers. */
  revoked(): { serial: string; fingerprint: string }[] {
    return [...this.#records.values()].filter((r) => r.revoked);
  }

  close(): void {
    this.#stop?.();
  }
}
