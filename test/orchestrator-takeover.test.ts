import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t, { type Test } from "tap";
import type { JobView } from "../orchestrator/records.js";
import { apiCaller } from "./helpers/api-call.js";
import {
  killLeftoverNats,
  startComputeNode,
  startOrchestratorCluster,
  tempDir,
  waitUntil,
} from "./helpers/cluster.js";
import {
  buildWasm,
  getJob,
  sleepWat,
  submitJob,
  waitForJob,
  wasmEngine,
  writeSpec,
} from "./helpers/e2e-jobs.js";

/**
 * Three clustered orchestrators (JetStream keeps its quorum with one of them
 * gone; two could not) and one compute node. A job submitted at A is
 * running when A is killed with SIGKILL: once A's lease (3 s here) expires,
 * B or C claims the job (compare-and-set on its record: exactly one wins),
 * takes it up as a restart would, accepts the node's result, and the job
 * completes with its one execution, visible from both survivors.
 */
/** Three clustered orchestrators with `lease`. */
async function startCluster(t: Test, lease: string) {
  const root = await tempDir(t, "shoal-takeover-");
  const cluster = await startOrchestratorCluster(t, root, ["a", "b", "c"], () => [
    "-c",
    `Orchestrator.Cluster.Lease=${lease}`,
  ]);
  t.match(cluster.a.proc.stdout(), /cluster shoal-test, 3 copies/);
  return { root, ...cluster };
}

t.test("a job survives the loss of the orchestrator that accepted it", async (t) => {
  const { root, a, b, c } = await startCluster(t, "3s");

  // The node dials C's broker, which stays up.
  const node = await startComputeNode(t, c, path.join(root, "node-1"), "node-1");
  t.teardown(() => {
    if (!t.passing()) t.comment(`node-1:\n${node.stderr().split("\n").slice(-30).join("\n")}`);
  });
  // A result file stored by A (its owner): kept in the cluster's object store too, so it outlives A.
  const upper = await submitJob(
    a,
    await writeSpec(
      root,
      "upper",
      wasmEngine(path.resolve("dist/wasm/upper.wasm")),
      `InputSources: [{Alias: text, Target: /inputs/in.txt, Source: {Type: inline, Params: {Content: "kept by the cluster"}}}]
    ResultPaths: [{Name: outputs, Path: /outputs}]`,
    ),
  );
  await waitForJob(a, upper, "Completed", (j) => j.State === "Completed", 30_000);
  const module = await buildWasm(root, "sleep", sleepWat(9000));
  const id = await submitJob(a, await writeSpec(root, "survivor", wasmEngine(module)));
  const running = await waitForJob(a, id, "Running", (j) => j.Executions[0]?.State === "Running", 30_000);
  const owner = running.Orchestrator;
  t.ok(owner, "A owns the job");
  // Until A's write of Running is stored, the others know only the bid: killed earlier, A takes
  // that write with it and the new owner cancels the execution and places the job again (an
  // open gap: it could ask the node, whose heartbeats list what it runs). Here: a stored run.
  await waitForJob(b, id, "Running stored", (j) => j.Executions[0]?.State === "Running", 10_000);

  // A dies mid-job, with no chance to hand anything over; its nats-server goes with it (a lost machine).
  const killedAt = Date.now();
  a.proc.child.kill("SIGKILL");
  await a.proc.exited;
  await killLeftoverNats(a.dataDir);

  // B follows the jobs and executions buckets separately: wait until both show the end.
  const done = await waitForJob(
    b,
    id,
    "finished at B",
    (j) =>
      ["Completed", "Failed", "Stopped"].includes(j.State) &&
      j.Executions.every((e) => !["AskForBid", "BidAccepted", "Running"].includes(e.State)),
    60_000,
  ).catch(async (err: unknown) => {
    // What each one holds, for the diagnosis.
    const views = await Promise.all(
      [b, c].map((o) => o.client.get(`/api/v1/orchestrator/jobs/${id}`).catch((e: Error) => e.message)),
    );
    t.comment(`the job at B and C: ${JSON.stringify(views)}`);
    throw err;
  });
  t.equal(done.State, "Completed", JSON.stringify(done));
  const doneAtB = Date.now();
  t.comment(`completed ${doneAtB - killedAt} ms after A was killed`);
  t.not(done.Orchestrator, owner, "taken over from A");
  t.equal(done.Executions.length, 1, "the running execution was kept, not run again");
  t.equal(done.Executions[0]?.State, "Completed");
  t.match(done.Executions[0]?.Stdout ?? "", /slept/, "the node's result was accepted by the new owner");
  // Right after a server loss a follower's consumer can go silent (it lived on A's server), and
  // its replacement may be placed on A again; the follower then reads the bucket directly at
  // its next checks (2 s apart), so C's copy lags by seconds at most (it lagged by 10-60 s
  // while it waited for a new consumer).
  const atC = await waitForJob(c, id, "Completed at C", (j) => j.State === "Completed", 10_000);
  t.comment(`C showed it ${Date.now() - doneAtB} ms after B`);
  t.equal(atC.Orchestrator, done.Orchestrator, "B and C agree on the new owner");
  // The history is a bucket of its own, whose follower at B may lag the same way.
  const takeovers = await waitUntil(
    "B's copy of the history records the takeover",
    async () => {
      const { Items } = await b.client.get<{ Items: { Message: string }[] }>(
        `/api/v1/orchestrator/jobs/${id}/history`,
      );
      const found = Items.filter((e) => /taken over by .* from /.test(e.Message));
      return found.length > 0 ? found : undefined;
    },
    10_000,
  );
  t.equal(takeovers.length, 1, "taken over exactly once");

  // A's result file is served by B and C from the object store; neither has it on disk.
  const [stored] = (
    await b.client.get<{ Items: { ExecutionID: string; Files: { name: string; sha256: string }[] }[] }>(
      `/api/v1/orchestrator/jobs/${upper}/results`,
    )
  ).Items;
  const file = stored?.Files[0];
  t.ok(file, "B lists A's result file");
  for (const [n, o] of [
    ["B", b],
    ["C", c],
  ] as const) {
    const caller = apiCaller(`https://127.0.0.1:${o.apiPort}`, await fs.readFile(o.ca, "utf8"));
    const got = await caller.call(
      "GET",
      `/api/v1/orchestrator/jobs/${upper}/results/${stored?.ExecutionID}/${file?.name}`,
      { token: await b.adminToken() },
    );
    caller.close();
    t.equal(got.status, 200, `${n}: ${got.text}`);
    t.equal(got.text, "KEPT BY THE CLUSTER", `${n} serves the file A stored`);
    t.equal(got.headers["x-shoal-sha256"], file?.sha256);
    await t.rejects(
      fs.stat(path.join(o.dataDir, "results", upper)),
      { code: "ENOENT" },
      `not on ${n}'s disk`,
    );
  }

  // A new job at the survivors still runs (the state store kept its quorum), and B follows it.
  const after = await submitJob(
    c,
    await writeSpec(root, "after", wasmEngine(await buildWasm(root, "quick", sleepWat(10)))),
  );
  t.equal(
    (await waitForJob(c, after, "Completed", (j) => j.State === "Completed", 30_000)).State,
    "Completed",
  );
  const cName = (await fs.readFile(path.join(c.dataDir, "nats", "server-name"), "utf8")).trim();
  const seenAt = Date.now();
  const atB = await waitUntil(
    "B follows C's new job",
    async () =>
      (await b.client.get<{ Items: JobView[] }>("/api/v1/orchestrator/jobs")).Items.find(
        (j) => j.ID === after,
      ),
    30_000,
  );
  t.comment(`B saw it ${Date.now() - seenAt} ms after C completed it`);
  t.equal(atB.Orchestrator, cName, "owned by C, which accepted it; B reads it");
});

/**
 * The same cluster with a lease of 30 s, and A stopped gracefully (SIGTERM)
 * mid-job: it releases its lease on the way out, so B or C takes the job over
 * at its next round (every 7.5 s here) instead of after the whole 30 s.
 */
t.test("an orchestrator stopped gracefully hands its jobs over at once", async (t) => {
  const { root, a, b, c } = await startCluster(t, "30s");
  await startComputeNode(t, c, path.join(root, "node-1"), "node-1");
  const module = await buildWasm(root, "sleep", sleepWat(15_000));
  const id = await submitJob(a, await writeSpec(root, "handed-over", wasmEngine(module)));
  const running = await waitForJob(a, id, "Running", (j) => j.Executions[0]?.State === "Running", 30_000);
  const stoppedAt = Date.now();
  a.proc.child.kill("SIGTERM");
  t.equal((await a.proc.exited).code, 0, "A stops cleanly");
  // Asked at both survivors until they agree: the one that claims the job knows at once, the
  // other's copy moments later. (Started together, B and C run their rounds in step, and
  // nats-server 2.9 can let both of their claims through: the one overwritten reads it back
  // and lets the job go, StateStore.confirmClaims.)
  const taken = await waitUntil(
    "B or C took the job over, as both see",
    async () => {
      const [atB, atC] = await Promise.all([b, c].map((o) => getJob(o, id).catch(() => undefined)));
      const owner = atB?.Orchestrator;
      if (owner === undefined || owner === running.Orchestrator || atC?.Orchestrator !== owner)
        return undefined;
      return { o: b, job: atB! };
    },
    25_000,
  );
  const after = Date.now() - stoppedAt;
  t.comment(`taken over ${after} ms after A was told to stop`);
  t.ok(after < 20_000, `well within the 30 s lease (${after} ms)`);
  const done = await waitForJob(taken.o, id, "Completed", (j) => j.State === "Completed", 60_000);
  t.equal(done.Orchestrator, taken.job.Orchestrator);
  t.equal(done.Executions.length, 1, "the running execution was kept, not run again");
});
