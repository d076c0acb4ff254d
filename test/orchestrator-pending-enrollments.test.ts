import { jetstream } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { PendingEnrollments, type PendingEnrollmentsOptions } from "../orchestrator/pending-enrollments.js";
import { startJetStream, tempDir, waitUntil } from "./helpers/cluster.js";

/**
 * The store of enrollment requests without a token, on a real JetStream
 * shared by two orchestrators: one set seen by both, a request bound to its
 * first key, the bounds (total, per address; decided requests do not count),
 * exactly one decision when two operators race, and expiry by the bucket's
 * max age.
 */
async function open(t: Test, url: string, options: PendingEnrollmentsOptions): Promise<PendingEnrollments> {
  const nc = await connect({ servers: url });
  t.teardown(() => nc.close());
  const store = await PendingEnrollments.open(jetstream(nc), options);
  t.teardown(() => store.close());
  return store;
}

/** Waits until `store` lists what `want` accepts (another orchestrator's writes arrive by its watch). */
const sees = (store: PendingEnrollments, what: string, want: (ids: string[]) => boolean) =>
  waitUntil(what, async () => {
    const ids = (await store.list()).map((e) => `${e.NodeID}:${e.State}`);
    return want(ids) ? ids : undefined;
  });

const ask = (nodeId: string, address: string, key = `sha256:${nodeId}`) => ({
  nodeId,
  csrPem: `CSR of ${nodeId}`,
  keyFingerprint: key,
  address,
});

t.test("requests are shared, bound to their key, bounded and decided once", async (t) => {
  const url = await startJetStream(t, await tempDir(t, "shoal-pending-"));
  const bounds = { maxPending: 3, maxPerAddress: 2 };
  const [a, b] = [await open(t, url, bounds), await open(t, url, bounds)];

  const first = await a.request(ask("n1", "10.0.0.1"));
  t.match(first, { NodeID: "n1", State: "PENDING", KeyFingerprint: "sha256:n1", Address: "10.0.0.1" });
  t.same(await b.get("n1"), first, "the other orchestrator sees the request");
  t.same(await b.request(ask("n1", "10.0.0.9")), first, "the same key asking again is the same request");
  await t.rejects(b.request(ask("n1", "10.0.0.1", "sha256:intruder")), {
    code: "SHOAL_ORCH_NODE_ID_TAKEN",
    status: 409,
  });

  await a.request(ask("n2", "10.0.0.1"));
  await t.rejects(a.request(ask("n3", "10.0.0.1")), {
    code: "SHOAL_ORCH_ENROLL_LIMIT",
    status: 429,
    message: /2 enrollment requests from 10\.0\.0\.1/,
  });
  await b.request(ask("n3", "10.0.0.2"));
  await sees(b, "b sees a's requests", (ids) => ids.length === 3);
  await t.rejects(b.request(ask("n4", "10.0.0.3")), {
    code: "SHOAL_ORCH_ENROLL_LIMIT",
    message: /3 enrollment requests already wait/,
  });
  t.same(await sees(a, "a sees b's request", (ids) => ids.length === 3), [
    "n1:PENDING",
    "n2:PENDING",
    "n3:PENDING",
  ]);

  // Two operators decide n1 at once on two orchestrators: exactly one decision lands.
  const decisions = await Promise.allSettled([
    a.decide("n1", async (e) => ({ ...e, State: "APPROVED", Certificate: "CERT" })),
    b.decide("n1", async (e) => ({ ...e, State: "REJECTED" })),
  ]);
  t.equal(decisions.filter((d) => d.status === "fulfilled").length, 1, "one decision wins");
  const lost = decisions.find((d) => d.status === "rejected") as PromiseRejectedResult;
  t.match(lost.reason, { code: "SHOAL_ORCH_NODE_NOT_FOUND" });
  await t.rejects(
    a.decide("n1", async (e) => e),
    { code: "SHOAL_ORCH_NODE_NOT_FOUND" },
    "a decided request is decided",
  );
  await t.rejects(
    a.decide("nobody", async (e) => e),
    { code: "SHOAL_ORCH_NODE_NOT_FOUND" },
  );
  // Decided requests no longer count: room for one more.
  await sees(b, "b sees the decision", (ids) => !ids.includes("n1:PENDING"));
  t.match(await b.request(ask("n4", "10.0.0.3")), { State: "PENDING" });
});

t.test("requests expire with the bucket's max age", async (t) => {
  const url = await startJetStream(t, await tempDir(t, "shoal-pending-ttl-"));
  const ttlMs = 1000;
  const store = await open(t, url, { ttlMs });
  const asked = Date.now();
  await store.request(ask("short-lived", "10.0.0.1"));
  // Present while younger than its max age: a loaded machine may take longer than that to look.
  const present = await store.get("short-lived");
  if (Date.now() - asked < ttlMs) t.ok(present, "kept while younger than its max age");
  const gone = await waitUntil(
    "the request expires",
    async () => ((await store.get("short-lived")) === undefined ? Date.now() : undefined),
    30_000,
    50,
  );
  t.ok(gone - asked >= ttlMs - 100, `not forgotten before its max age (after ${gone - asked} ms)`);
  t.same(await store.list(), [], "nor listed once expired");
});
