import "reflect-metadata";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { connect } from "@nats-io/transport-node";
import t from "tap";
import { silentLogger } from "../core/index.js";
import { IDENTITIES_BUCKET, SharedIdentities, sharedRecord } from "../orchestrator/shared-identities.js";
import { EXPIRED_RETENTION_MS, type InventoryEntry } from "../pki/index.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";

/**
 * A cluster's shared identities do not grow with every renewal ever made: a
 * certificate that expired longer ago than the inventories keep one is not
 * published, and a stored record of one (published while it was live) is
 * purged from the bucket's stream, leaving no delete marker.
 */

const DAY = 86_400_000;

function entry(serial: string, notAfter: Date): InventoryEntry {
  return {
    serial,
    role: "compute",
    id: `n-${serial}`,
    spiffeId: `spiffe://shoal.local/compute/n-${serial}`,
    sans: [],
    notBefore: new Date(notAfter.getTime() - 2 * DAY),
    notAfter,
    fingerprint: `sha256:${serial.padStart(64, "0")}`,
    status: "valid",
  };
}

t.test("long-expired certificates are neither published nor kept in the bucket", async (t) => {
  const url = await startJetStream(t, await tempDir(t, "shoal-identities-"));
  const nc = await connect({ servers: url });
  t.teardown(() => nc.close());
  const js = jetstream(nc);
  const jsm = await js.jetstreamManager();
  const stored = async (serial: string) =>
    (await jsm.streams.getMessage(`KV_${IDENTITIES_BUCKET}`, {
      last_by_subj: `$KV.${IDENTITIES_BUCKET}.${serial}`,
    })) !== null;

  // Published while live by an orchestrator (this one, or another, before a restart).
  const now = new Date();
  const lapsed = entry("a1", new Date(now.getTime() - EXPIRED_RETENTION_MS - DAY));
  const kv = await new Kvm(js).create(IDENTITIES_BUCKET, { history: 1 });
  await kv.put(lapsed.serial, JSON.stringify(sharedRecord(lapsed)));

  const shared = await SharedIdentities.open(js, silentLogger);
  t.teardown(() => shared.close());
  t.ok(shared.knows(lapsed.spiffeId!), "loaded as stored");

  const live = entry("b2", new Date(now.getTime() + DAY));
  const recent = entry("c3", new Date(now.getTime() - DAY));
  const born = entry("d4", new Date(now.getTime() - EXPIRED_RETENTION_MS - 2 * DAY));
  await shared.publish([live, recent, born], now);

  t.notOk(await stored(lapsed.serial), "the lapsed record is purged, no delete marker left");
  t.notOk(shared.knows(lapsed.spiffeId!), "and forgotten");
  t.notOk(await stored(born.serial), "one already long expired is not published");
  t.ok(await stored(live.serial), "a live certificate is published");
  t.ok(await stored(recent.serial), "and one expired within the retention");
  t.same(
    shared
      .identities(new Set())
      .map((i) => i.spiffeId)
      .sort(),
    [live.spiffeId, recent.spiffeId],
  );
});
