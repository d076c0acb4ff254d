import "reflect-metadata";
import { jetstream } from "@nats-io/jetstream";
import type { KV } from "@nats-io/kv";
import { connect } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { silentLogger } from "../core/index.js";
import { JobTakeover, openLeases } from "../orchestrator/job-takeover.js";
import { StateStore } from "../orchestrator/state-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";
import { eventually, jobRecord } from "./helpers/records.js";

/**
 * The lease of an orchestrator of a cluster (orch-a) against a real
 * JetStream, with its reads of orch-b's lease held back the way reads wait
 * while a stream leader is elected (up to the JetStream timeout, 15 s in a
 * cluster), and its own renewals made to fail.
 */
const LEASE_MS = 1_000;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function setup(t: Test) {
  const url = await startJetStream(t, await tempDir(t, "shoal-lease-"));
  const nc = await connect({ servers: url });
  t.teardown(() => nc.close());
  const js = jetstream(nc);
  const [a, b] = [
    await StateStore.open(js, silentLogger, { owner: "orch-a" }),
    await StateStore.open(js, silentLogger, { owner: "orch-b" }),
  ];
  t.teardown(() => {
    a.close();
    b.close();
  });
  // orch-b owns an unfinished job, so orch-a reads orch-b's lease at every round.
  b.putJob({ ...jobRecord("j-b", 1), State: "Running", Orchestrator: "orch-b" });
  await b.flush();
  await eventually("orch-a follows orch-b's job", () => a.jobs.has("j-b"));

  const leases = await openLeases(js, 1);
  const faults = {
    /** Reads of orch-b's lease wait for this, when set. */
    hold: undefined as Promise<void> | undefined,
    heldReads: 0,
    failRenewals: false,
  };
  const faulty = new Proxy(leases, {
    get(target, prop) {
      if (prop === "get") {
        return async (key: string) => {
          if (key === "orch-b" && faults.hold) {
            faults.heldReads++;
            await faults.hold;
          }
          return target.get(key);
        };
      }
      if (prop === "put" && faults.failRenewals) return () => Promise.reject(new Error("no quorum"));
      const value = Reflect.get(target, prop) as unknown;
      return typeof value === "function" ? value.bind(target) : value;
    },
  }) as KV;
  const takeover = new JobTakeover(faulty, {
    store: a,
    owner: "orch-a",
    leaseMs: LEASE_MS,
    adopt: () => {},
    log: silentLogger,
  });
  return { a, leases, faults, takeover };
}

t.test("a read of another orchestrator's lease that goes unanswered does not hold up renewals", async (t) => {
  const { a, leases, faults, takeover } = await setup(t);
  await leases.put("orch-b", JSON.stringify({ Name: "orch-b", Renewed: Date.now(), LeaseMs: LEASE_MS }));
  // Unanswered for 6 s, then a JetStream timeout.
  faults.hold = sleep(6_000).then(() => Promise.reject(new Error("timed out")));
  faults.hold.catch(() => {});
  await takeover.start();
  t.teardown(() => takeover.close());

  const revisions: number[] = [];
  let acting = true;
  for (let i = 0; i < 10; i++) {
    await sleep(LEASE_MS / 2);
    acting &&= takeover.acting;
    revisions.push((await leases.get("orch-a"))?.revision ?? 0);
  }
  t.ok(faults.heldReads >= 1, "orch-b's lease was read, and the read held back");
  t.ok(acting, "orch-a kept its lease for five lease periods");
  t.ok(
    revisions.every((r, i) => i === 0 || r > revisions[i - 1]!),
    `renewed all along (revisions ${revisions.join(" ")})`,
  );
  t.equal(a.jobs.get("j-b")?.Orchestrator, "orch-b", "nothing was taken over");
});

t.test("a takeover judged after this orchestrator's own lease lapsed claims nothing", async (t) => {
  const { a, leases, faults, takeover } = await setup(t);
  const renewB = () =>
    leases.put("orch-b", JSON.stringify({ Name: "orch-b", Renewed: Date.now(), LeaseMs: LEASE_MS }));
  await renewB();
  const b = setInterval(() => void renewB(), LEASE_MS / 4);
  await takeover.start();
  t.teardown(() => takeover.close());
  await sleep(LEASE_MS);
  // orch-b stops; orch-a reads its last revision once more, then its next read is held back.
  clearInterval(b);
  await sleep(LEASE_MS / 2);
  let release!: () => void;
  faults.hold = new Promise<void>((resolve) => {
    release = resolve;
  });
  await eventually("a read of orch-b's lease is held", () => faults.heldReads > 0);
  // Meanwhile orch-a cannot renew: its lease lapses while the read waits.
  faults.failRenewals = true;
  await eventually("orch-a's lease lapsed", () => !takeover.acting);
  await sleep(LEASE_MS);
  // The read answers: orch-b's lease has not changed for over a lease, so orch-b is judged gone.
  release();
  await sleep(LEASE_MS);
  t.equal(a.jobs.get("j-b")?.Orchestrator, "orch-b", "orch-a, fenced, took nothing over");
  t.equal((await a.jobs.stored("j-b"))?.Orchestrator, "orch-b", "nor in KV");
});
