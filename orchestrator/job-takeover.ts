import { performance } from "node:perf_hooks";
import type { JetStreamClient } from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import type { Logger } from "../core/index.js";
import { TERMINAL_JOB_STATES } from "./records.js";
import type { StateStore } from "./state-store.js";

/** The KV bucket where each orchestrator of a cluster renews its lease. */
export const LEASES_BUCKET = "shoal-orchestrators";

/** One orchestrator's lease as stored under its name in {@link LEASES_BUCKET}. */
export interface LeaseRecord {
  Name: string;
  /** Its wall clock at the renewal, for operators; expiry is judged on the reader's own clock. */
  Renewed: number;
  LeaseMs: number;
  /** Set by an orchestrator that stopped gracefully: its jobs may be taken over at once. */
  Released?: boolean;
}

/** Opens (creating if needed) the lease bucket with `replicas` copies. */
export function openLeases(js: JetStreamClient, replicas: number): Promise<KV> {
  return new Kvm(js).create(LEASES_BUCKET, { history: 1, replicas });
}

export interface JobTakeoverOptions {
  store: StateStore;
  /** This orchestrator's name (`JobRecord.Orchestrator` of the jobs it owns). */
  owner: string;
  /** `Orchestrator.Cluster.Lease` in ms. */
  leaseMs: number;
  /** Takes up jobs just taken over, as after a restart (Dispatcher.adopt). */
  adopt: (jobIds: string[], why: string) => void;
  log: Logger;
  /** A monotonic clock in ms. @default performance.now */
  now?: () => number;
}

/**
 * Job takeover in a cluster. Each orchestrator renews a lease (its record in
 * {@link LEASES_BUCKET}, every quarter of the lease) and, each round, reads
 * the records of the orchestrators that own unfinished jobs (a direct read,
 * no consumer that could be lost with a server). An owner whose record kept
 * the same revision for a whole lease, measured on the reader's own
 * monotonic clock from when it first saw that revision (so a newcomer gives
 * everyone a full lease, and wall clocks need not agree), is presumed gone,
 * and the unfinished jobs it owns are claimed, each by compare-and-set on
 * the job record ({@link StateStore.claimJob}, so two claimants never both
 * win; read back by {@link StateStore.confirmClaims}, as nats-server 2.9 can let
 * two concurrent ones through in a cluster), and taken up through the same
 * recovery path a restart uses.
 *
 * Fencing: an orchestrator whose last renewal is a whole lease old may have
 * been presumed gone, so it stops acting on its jobs ({@link acting} fences
 * the store: none counts as its own) until a renewal succeeds; then it reads
 * each of its jobs back from KV, lets go of those taken over meanwhile and
 * takes up the rest again. Job records are written by compare-and-set, so a
 * write from an owner that missed a takeover anyway is refused by KV.
 *
 * An orchestrator that stops gracefully releases its lease ({@link close}):
 * the others take its unfinished jobs over at their next round instead of
 * after a whole lease.
 */
export class JobTakeover {
  readonly #o: JobTakeoverOptions;
  readonly #kv: KV;
  readonly #now: () => number;
  /** Each owner's lease record revision as last read here, and when (monotonic ms) it was first read. */
  readonly #seen = new Map<string, { revision: number; at: number; leaseMs: number }>();
  #renewedAt = Number.NEGATIVE_INFINITY;
  /** The lease lapsed since this orchestrator last checked which of its jobs it still owns. */
  #lapsed = false;
  #timer: NodeJS.Timeout | undefined;
  #ticking: Promise<void> | undefined;
  /** A takeover round under way: it reads the others' leases, which may wait out a JetStream timeout. */
  #judging: Promise<void> | undefined;
  #released = false;

  /** `kv`: the lease bucket ({@link openLeases}). */
  constructor(kv: KV, o: JobTakeoverOptions) {
    this.#kv = kv;
    this.#o = o;
    this.#now = o.now ?? (() => performance.now());
  }

  /** Whether this orchestrator may act on its jobs: its lease is current and never lapsed unnoticed. */
  get acting(): boolean {
    return !this.#released && !this.#lapsed && this.#now() - this.#renewedAt < this.#o.leaseMs;
  }

  /** Renews the lease once (so this orchestrator is live before it serves), then keeps renewing and judging. */
  async start(): Promise<void> {
    const before = this.#now();
    await this.#kv.put(this.#o.owner, JSON.stringify(this.#record()));
    this.#renewedAt = before;
    this.#timer = setInterval(() => void this.#tick(), Math.max(50, Math.floor(this.#o.leaseMs / 4)));
    this.#timer.unref();
  }

  /**
   * Stops renewing. With `release` (a graceful stop, once the dispatcher no
   * longer acts), this orchestrator stops acting on its jobs, waits until its
   * last writes are stored, and marks its lease released, so the others take
   * its unfinished jobs over at their next round (a quarter of the lease)
   * rather than after a whole lease. A release that cannot be written leaves
   * the lease to expire as after a crash.
   */
  async close({ release = false }: { release?: boolean } = {}): Promise<void> {
    clearInterval(this.#timer);
    if (!release) return;
    this.#released = true;
    await this.#ticking;
    await this.#judging;
    try {
      await this.#o.store.flush();
      await this.#kv.put(this.#o.owner, JSON.stringify({ ...this.#record(), Released: true }));
      this.#o.log.info("lease released: the other orchestrators take this one's unfinished jobs over");
    } catch (err) {
      this.#o.log.warn({ err }, "lease not released; the others take over once it expires");
    }
  }

  /**
   * One round: renew, then (holding the lease) take over the jobs of
   * orchestrators whose lease expired. The takeover goes on beside the next
   * rounds: its reads of the others' leases can wait out the JetStream
   * timeout (15 s in a cluster) while a stream leader is elected, and
   * renewals held up behind them let this orchestrator's own lease lapse.
   */
  #tick(): Promise<void> {
    this.#ticking ??= this.#round().finally(() => {
      this.#ticking = undefined;
    });
    return this.#ticking;
  }

  async #round(): Promise<void> {
    try {
      if (this.#released || !(await this.#renew())) return;
      if (this.#lapsed) await this.#regained();
    } catch (err) {
      this.#o.log.warn({ err }, "lease round failed");
      return;
    }
    this.#judging ??= this.#takeOver()
      .catch((err: unknown) => this.#o.log.warn({ err }, "takeover round failed"))
      .finally(() => {
        this.#judging = undefined;
      });
  }

  #record(): LeaseRecord {
    return { Name: this.#o.owner, Renewed: Date.now(), LeaseMs: this.#o.leaseMs };
  }

  /** Whether `owner` released its lease, or its record kept one revision (or stayed absent) for a whole lease. */
  async #expired(owner: string): Promise<boolean> {
    const e = await this.#kv.get(owner);
    const revision = e?.operation === "PUT" ? e.revision : 0;
    const record = revision > 0 ? e!.json<LeaseRecord>() : undefined;
    if (record?.Released === true) return true;
    const now = this.#now();
    const seen = this.#seen.get(owner);
    if (seen?.revision !== revision) {
      this.#seen.set(owner, { revision, at: now, leaseMs: record?.LeaseMs ?? 0 });
      return false;
    }
    return now - seen.at > Math.max(this.#o.leaseMs, seen.leaseMs);
  }

  /** Resolves to whether the lease was renewed; notes a lapse (the previous renewal expired before this one). */
  async #renew(): Promise<boolean> {
    const before = this.#now();
    try {
      await this.#kv.put(this.#o.owner, JSON.stringify(this.#record()));
    } catch (err) {
      this.#o.log.warn({ err }, "lease not renewed");
      return false;
    }
    if (this.#now() - this.#renewedAt >= this.#o.leaseMs) this.#lapsed = true;
    // Counted from before the write: the others saw it no earlier than that.
    this.#renewedAt = before;
    return true;
  }

  /** The lease is held again after a lapse: keep only the jobs nobody took over meanwhile. */
  async #regained(): Promise<void> {
    const store = this.#o.store;
    const mine = [...store.jobs.values()].filter(
      (j) => j.Orchestrator === this.#o.owner && !TERMINAL_JOB_STATES.has(j.State),
    );
    const kept = (await Promise.all(mine.map((j) => store.refreshJob(j.ID)))).filter(
      (j) => j?.Orchestrator === this.#o.owner,
    );
    // Peers could not renew while this one could not either: give everyone a full lease from now.
    this.#seen.clear();
    this.#lapsed = false;
    this.#o.log.warn(
      { kept: kept.length, lost: mine.length - kept.length },
      "lease held again after a lapse",
    );
    this.#o.adopt(
      kept.map((j) => j!.ID),
      "a lapse of this orchestrator's lease",
    );
  }

  async #takeOver(): Promise<void> {
    const store = this.#o.store;
    const candidates = store.ownersOfUnfinishedJobs().filter((owner) => owner !== this.#o.owner);
    const judged = await Promise.all(candidates.map((owner) => this.#expired(owner)));
    const expired = candidates
      .filter((_, i) => judged[i])
      .flatMap((owner) => store.unfinishedJobsOf(owner).map((job) => [job.ID, owner] as const));
    const taken: string[] = [];
    for (const [id, owner] of expired) {
      // The reads may have taken long: no claim once this orchestrator's own lease lapsed meanwhile.
      if (!this.acting) break;
      // Only from the owner judged gone: not from one that took the job over meanwhile.
      const job = await this.#o.store.claimJob(
        id,
        (stored) => stored.Orchestrator === owner && !TERMINAL_JOB_STATES.has(stored.State),
        `the lease of ${owner} expired`,
      );
      if (job) taken.push(id);
    }
    const kept = await store.confirmClaims(taken);
    if (kept.length < taken.length) {
      const lost = taken.filter((id) => !kept.includes(id));
      this.#o.log.warn({ jobs: lost }, "claims overwritten by another orchestrator's: its jobs now");
    }
    if (kept.length === 0) return;
    this.#o.log.warn({ jobs: kept }, "took over the jobs of an orchestrator whose lease expired");
    this.#o.adopt(kept, "a takeover");
  }
}
