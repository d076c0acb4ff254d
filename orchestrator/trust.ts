import path from "node:path";
import { type Logger, writeFileAtomic } from "../core/index.js";
import type { BrokerIdentity } from "../fabric/index.js";
import { isValidId, type Pki, revokedIdentities, revokeIdentity } from "../pki/index.js";
import type { FabricLink } from "./fabric-link.js";
import { brokerIdentities } from "./inventory-watch.js";
import type { SharedIdentities } from "./shared-identities.js";

export interface TrustOptions {
  pki: Pki;
  link: FabricLink;
  /** The supervised nats-server, or the users block of operator-run servers. */
  broker: { setIdentities(identities: readonly BrokerIdentity[]): Promise<void> };
  /** `Orchestrator.NodeManager.Identities`: broker users whose certificates live elsewhere. */
  extraIdentities: readonly string[];
  /** In a cluster: the identities every orchestrator's PKI issued or revoked. */
  shared?: SharedIdentities;
  log: Logger;
}

/** The CRL the orchestrator keeps current in its PKI directory. */
export const CRL_FILE = "crl.pem";

/**
 * Applies the PKI inventory to the running fabric, one change at a time:
 * revoked certificates stop verifying here and are broadcast to every node
 * (`shoal.broadcast.revocation`), the broker's users become the live
 * identities (a removed user's connection closes at the reload), and
 * `PKI-DIR/crl.pem` is rewritten when the revoked set grew. In a cluster the
 * inventory is also published to, and merged with, the other orchestrators'
 * ({@link SharedIdentities}).
 */
export class TrustKeeper {
  readonly #o: TrustOptions;
  #chain: Promise<unknown> = Promise.resolve();
  #queued: Promise<void> | undefined;
  #crl: { serials: string; pem: string } | undefined;

  constructor(o: TrustOptions) {
    this.#o = o;
  }

  /** The current CRL (PEM) while any certificate is revoked, e.g. for API logins by user certificate. */
  get crlPem(): string | undefined {
    return this.#crl?.pem;
  }

  /**
   * Re-reads the inventory and applies it; resolves once the broker has
   * reloaded. Callers while a run waits to start share it: it reads the
   * inventory after their change, and a burst of enrollments costs one reload.
   */
  apply(): Promise<void> {
    if (this.#queued) return this.#queued;
    const run = this.#chain.then(() => {
      this.#queued = undefined;
      return this.#apply();
    });
    this.#queued = run;
    this.#chain = run.catch(() => {});
    return run;
  }

  /**
   * `shoal node delete`: revokes every certificate of compute `id`, bars it
   * from enrolling again, revokes its join tokens and applies the change
   * (broadcast, broker reload). Resolves once its connection is closed.
   * Returns false when the PKI never knew the identity.
   */
  async revokeNode(id: string): Promise<boolean> {
    if (!isValidId(id)) return false;
    const spiffeId = `spiffe://${this.#o.pki.trustDomain}/compute/${id}`;
    const { revoked, known: issued } = await revokeIdentity(this.#o.pki.dir, spiffeId, "privilegeWithdrawn");
    // In a cluster the node may have enrolled at another orchestrator: revoke its certificates there too.
    const elsewhere = this.#o.shared?.knows(spiffeId) ? await this.#o.shared.revokeIdentity(spiffeId) : [];
    const known = issued || elsewhere.length > 0 || this.#o.extraIdentities.includes(spiffeId);
    if (known) {
      this.#o.log.warn(
        { node: id, serials: [...revoked.map((r) => r.serial), ...elsewhere] },
        "node identity revoked",
      );
      await this.apply();
    }
    return known;
  }

  /**
   * Bars (identities that may not enroll again) made at another orchestrator
   * are applied to this PKI as `shoal node delete` would (its certificates and
   * join tokens of that identity revoked too), and this PKI's bars published.
   */
  async #shareBars(shared: SharedIdentities): Promise<void> {
    const dir = this.#o.pki.dir;
    const local = new Set((await revokedIdentities(dir)).map((b) => b.spiffeId));
    for (const bar of shared.bars()) {
      if (local.has(bar.spiffeId)) continue;
      this.#o.log.warn({ identity: bar.spiffeId }, "identity barred by another orchestrator of the cluster");
      await revokeIdentity(dir, bar.spiffeId, bar.reason, new Date(bar.revokedAt));
    }
    await shared.publishBars(await revokedIdentities(dir));
  }

  async #apply(): Promise<void> {
    const { pki, link, broker, shared } = this.#o;
    if (shared) await this.#shareBars(shared);
    const entries = await pki.list();
    const revoked = entries.filter((e) => e.status === "revoked");
    await shared?.publish(entries);
    const revokedElsewhere = shared?.revoked() ?? [];
    link.revoke([...revoked, ...revokedElsewhere]);
    const identities = await brokerIdentities(
      pki,
      this.#o.extraIdentities,
      new Set(revokedElsewhere.map((r) => r.serial)),
    );
    const local = new Set(entries.map((e) => e.serial));
    await broker.setIdentities([...identities, ...(shared?.identities(local) ?? [])]);
    const serials = revoked.map((e) => e.serial).join(",");
    if (serials && serials !== this.#crl?.serials) {
      // crl() bumps the CRL number in the inventory: the watcher sees it and
      // calls apply() again, which finds the same revoked set and stops there.
      this.#crl = { serials, pem: await pki.crl() };
      await writeFileAtomic(path.join(pki.dir, CRL_FILE), this.#crl.pem, 0o644);
    }
  }
}
