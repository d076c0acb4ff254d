import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import { calculateJwkThumbprint, exportJWK, generateKeyPair, SignJWT } from "jose";
import t from "tap";
import { revokedIdentities } from "../pki/index.js";
import { apiCaller } from "./helpers/api-call.js";
import { startComputeNode, startOrchestratorCluster, tempDir, waitUntil } from "./helpers/cluster.js";
import {
  buildWasm,
  SMALL_NODE,
  sleepWat,
  submitJob,
  waitForJob,
  wasmEngine,
  writeSmallSpec,
  writeSpec,
} from "./helpers/e2e-jobs.js";

/**
 * Two orchestrators whose supervised nats-servers form one cluster (routes
 * with mutual TLS, JetStream clustered: with two servers its quorum is both,
 * so they start together). They share one PKI, copied into both data dirs
 * before the first start, as docs/orchestrator.md tells operators. A compute
 * node enrolled at and connected to B runs a job submitted to A's API, which
 * B lists, describes and stops too (with the same policy checks), a token
 * from a login at A works at B, and deleting the node at A bars it from B's
 * broker too.
 */
t.test(
  "two clustered orchestrators: a node at B runs A's job, B reads and stops it, A's token works at B",
  async (t) => {
    const root = await tempDir(t, "shoal-cluster-");
    const { a, b } = await startOrchestratorCluster(t, root, ["a", "b"]);
    t.ok(
      await a.proc.waitFor(/Routes \(mTLS\):\s+nats-route:\/\/\S+ \(cluster shoal-test, 2 copies/, 10_000),
    );
    // The operator is told two give no fault tolerance.
    await a.proc.waitFor(/two orchestrators tolerate no loss/, 10_000);
    t.equal(a.pki.rootFingerprint, b.pki.rootFingerprint, "one CA for the cluster");

    // The node's identity is issued by B's copy of the PKI and it dials B's broker only.
    const node = await startComputeNode(t, b, path.join(root, "node-1"), "node-1");
    t.equal(node.child.exitCode, null);
    await waitUntil(
      "A sees node-1 (its messages cross the route)",
      async () => {
        const { Items } = await a.client.get<{ Items: { ID: string; Health: string }[] }>(
          "/api/v1/orchestrator/nodes",
        );
        return Items.some((n) => n.ID === "node-1" && n.Health === "HEALTHY") ? true : undefined;
      },
      30_000,
    );

    const module = await buildWasm(root, "sleep", sleepWat(10));
    const id = await submitJob(a, await writeSpec(root, "across", wasmEngine(module)));
    const job = await waitForJob(
      a,
      id,
      "Completed",
      (j) => ["Completed", "Failed"].includes(j.State),
      45_000,
    );
    t.equal(job.State, "Completed", JSON.stringify(job.Executions));
    t.equal(job.Executions[0]?.NodeID, "node-1");
    t.match(job.Executions[0]?.Stdout ?? "", /slept/);

    // A token from a login at A is accepted at B (A's key is in the shared KV auth store).
    const caPem = await fs.readFile(b.ca, "utf8");
    const atB = apiCaller(`https://127.0.0.1:${b.apiPort}`, caPem);
    const nodes = await atB.call("GET", "/api/v1/orchestrator/nodes", { token: await a.adminToken() });
    t.equal(nodes.status, 200, nodes.text);
    t.ok(
      nodes.json.Items.some((n: { ID: string }) => n.ID === "node-1"),
      "B lists the node with A's token",
    );
    // The job is A's, but B reads it from the shared KV: describe, list, history and the logs B heard itself.
    t.ok(job.Orchestrator, "stamped with the orchestrator that accepted it");
    const adminAtB = { token: await a.adminToken() };
    const elsewhere = await atB.call("GET", `/api/v1/orchestrator/jobs/${id}`, adminAtB);
    t.equal(elsewhere.status, 200, elsewhere.text);
    t.equal(elsewhere.json.Job.State, "Completed");
    t.equal(elsewhere.json.Job.Orchestrator, job.Orchestrator, "owned by A");
    t.match(elsewhere.json.Job.Executions[0]?.Stdout ?? "", /slept/);
    const listedAtB = await atB.call("GET", "/api/v1/orchestrator/jobs", adminAtB);
    t.ok(
      listedAtB.json.Items.some((j: { ID: string }) => j.ID === id),
      "B lists A's job",
    );
    const historyAtB = await atB.call("GET", `/api/v1/orchestrator/jobs/${id}/history`, adminAtB);
    t.ok(
      historyAtB.json.Items.some((e: { State: string }) => e.State === "Completed"),
      "B shows its history",
    );
    const logsAtB = await atB.call("GET", `/api/v1/orchestrator/jobs/${id}/logs`, adminAtB);
    t.match(logsAtB.text, /slept/, "B stored the log lines it heard from the node");

    // The policy applies at B exactly as at A: another submitter neither sees, describes nor stops it.
    await a.client.post("/api/v1/auth/users", {
      Name: "eve",
      Roles: ["submitter"],
      Namespace: "default",
      Password: "eve-password-1234",
    });
    const eveLogin = await atB.call("POST", "/api/v1/auth/password", {
      body: { username: "eve", password: "eve-password-1234" },
    });
    t.equal(eveLogin.status, 201, eveLogin.text);
    const eve = { token: eveLogin.json.Token as string };
    const eveGets = await atB.call("GET", `/api/v1/orchestrator/jobs/${id}`, eve);
    t.equal(eveGets.status, 403);
    t.equal(eveGets.json.error?.code, "SHOAL_AUTH_DENIED");
    const eveLists = await atB.call("GET", "/api/v1/orchestrator/jobs", eve);
    t.notOk(
      eveLists.json.Items.some((j: { ID: string }) => j.ID === id),
      "not in eve's listing",
    );
    const eveStops = await atB.call("DELETE", `/api/v1/orchestrator/jobs/${id}`, eve);
    t.equal(eveStops.json.error?.code, "SHOAL_AUTH_DENIED");
    // Deleted at A, eve's token from B is void at B too, as soon as B's watcher hears of it.
    await a.client.delete("/api/v1/auth/users/eve");
    const eveGone = await waitUntil(
      "B refuses the deleted user's token",
      async () => {
        const r = await atB.call("GET", "/api/v1/orchestrator/jobs", eve);
        return r.status === 401 ? r : undefined;
      },
      10_000,
    );
    t.equal(eveGone.json.error?.code, "SHOAL_AUTH_TOKEN_REVOKED");
    const missing = await atB.call(
      "GET",
      "/api/v1/orchestrator/jobs/j-00000000-0000-0000-0000-000000000000",
      adminAtB,
    );
    t.equal(missing.json.error?.code, "SHOAL_ORCH_JOB_NOT_FOUND");

    // A stop at B of a job A runs: B takes the job over (compare-and-set) and stops it; A lets it go.
    const long = await submitJob(
      a,
      await writeSpec(root, "long", wasmEngine(await buildWasm(root, "long", sleepWat(60_000)))),
    );
    await waitForJob(a, long, "Running", (j) => j.Executions[0]?.State === "Running", 30_000);
    const stopped = await atB.call("DELETE", `/api/v1/orchestrator/jobs/${long}`, adminAtB);
    t.equal(stopped.status, 200, stopped.text);
    t.equal(stopped.json.State, "Stopped");
    t.ok(stopped.json.Job.Orchestrator, "owned");
    t.not(stopped.json.Job.Orchestrator, job.Orchestrator, "now B's");
    const seenAtA = await waitForJob(a, long, "Stopped at A too", (j) => j.State === "Stopped", 10_000);
    t.equal(seenAtA.Executions[0]?.State, "Cancelled");
    const again = await atB.call("DELETE", `/api/v1/orchestrator/jobs/${long}`, adminAtB);
    t.equal(again.json.error?.code, "SHOAL_ORCH_JOB_FINISHED");

    // Capacity is counted across the cluster: node-2 (one CPU) runs A's one-CPU job, so B
    // queues its own such job instead of bidding where the node would refuse (a node that
    // refused a job's bid is not asked for that job again), and places it once A's job ends.
    await startComputeNode(t, b, path.join(root, "node-2"), "node-2", SMALL_NODE);
    const holding = await submitJob(a, await writeSmallSpec(root, "holding", 60_000));
    await waitForJob(a, holding, "Running", (j) => j.Executions[0]?.State === "Running", 30_000);
    await waitForJob(b, holding, "Running at B", (j) => j.Executions[0]?.State === "Running", 10_000);
    const waiting = await submitJob(b, await writeSmallSpec(root, "waiting", 10));
    const queued = await waitForJob(b, waiting, "Queued", (j) => j.State === "Queued", 10_000);
    t.equal(queued.Executions.length, 0, "B asked no node for a bid");
    t.match(queued.StateMessage, /CPU/, "it waits for capacity");
    await a.client.delete(`/api/v1/orchestrator/jobs/${holding}`);
    const placed = await waitForJob(b, waiting, "Completed", (j) => j.State === "Completed", 30_000);
    t.equal(placed.Executions.length, 1);
    t.equal(placed.Executions[0]?.NodeID, "node-2");

    // A token signed by a key no orchestrator published is refused at B with its code.
    const { privateKey, publicKey } = await generateKeyPair("ES256");
    const kid = await calculateJwkThumbprint(await exportJWK(publicKey));
    const now = Math.floor(Date.now() / 1000);
    const forged = await new SignJWT({ roles: ["admin"], ns: "default", method: "password" })
      .setProtectedHeader({ alg: "ES256", typ: "at+jwt", kid })
      .setIssuer("spiffe://shoal.local/orchestrator/orchestrator")
      .setAudience("shoal-api://shoal.local")
      .setSubject("admin")
      .setIssuedAt(now)
      .setExpirationTime(now + 600)
      .setJti("forged")
      .sign(privateKey);
    const refused = await atB.call("GET", "/api/v1/orchestrator/nodes", { token: forged });
    t.equal(refused.status, 401);
    t.equal(refused.json.error?.code, "SHOAL_AUTH_TOKEN_UNKNOWN_KEY");
    atB.close();

    // Deleting the node at A (it enrolled at B) revokes it cluster-wide: B's broker drops it within seconds.
    await a.client.delete("/api/v1/orchestrator/nodes/node-1");
    const userLine = "spiffe://shoal.local/compute/node-1";
    await waitUntil(
      "B's broker no longer admits node-1",
      async () =>
        (await fs.readFile(path.join(b.dataDir, "nats", "nats.conf"), "utf8")).includes(userLine)
          ? undefined
          : true,
      15_000,
    );
    t.notMatch(await fs.readFile(path.join(a.dataDir, "nats", "nats.conf"), "utf8"), userLine, "nor A's");
    await waitUntil(
      "B's PKI bars node-1 from enrolling again",
      async () =>
        (await revokedIdentities(b.pkiDir)).some((r) => r.spiffeId === userLine) ? true : undefined,
      15_000,
    );
  },
);
