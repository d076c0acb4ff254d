import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import { isRunning } from "../core/index.js";
import type { JobEvent, JobRecord } from "../orchestrator/index.js";
import {
  runShoal,
  sleepRunning,
  startComputeNode,
  startOrchestrator,
  tempDir,
  waitUntil,
} from "./helpers/cluster.js";
import {
  buildWasm,
  sleepWat,
  submitJob,
  waitForJob,
  waitForRunning,
  wasmEngine,
  writeSpec,
} from "./helpers/e2e-jobs.js";

/**
 * Crashes end to end with real processes: a compute node SIGKILLed while it
 * runs an execution (rescheduled on the other node, the job completes), and
 * the orchestrator SIGKILLed and restarted on the same data directory while
 * a job runs (the job completes, nothing stored is lost), and a node
 * SIGKILLed while it runs an exec program (none of it outlives the node's
 * restart). The jobs sleep
 * (WASI poll_oneoff) so they are predictably still running when the kill
 * lands, whatever the machine's load.
 */
const DISCONNECT = ["-c", "Orchestrator.NodeManager.DisconnectTimeout=2s"];

t.test("a SIGKILLed compute node or orchestrator loses no job", async (t) => {
  const dir = await tempDir(t);
  const orchDir = path.join(dir, "orch");
  let orch = await startOrchestrator(t, orchDir, DISCONNECT);
  const [n1, n2] = await Promise.all([
    startComputeNode(t, orch, path.join(dir, "n1"), "n1"),
    startComputeNode(t, orch, path.join(dir, "n2"), "n2"),
  ]);
  const nodes = { n1, n2 };
  const sleeper = await buildWasm(dir, "sleep", sleepWat(3000));
  const submit = async (name: string) => submitJob(orch, await writeSpec(dir, name, wasmEngine(sleeper)));

  t.test("a compute node killed mid-job: its execution is rescheduled and the job completes", async (t) => {
    const id = await submit("sleep-node-kill");
    const first = await waitForRunning(orch, id);
    const victim = nodes[first.NodeID as keyof typeof nodes];
    victim.child.kill("SIGKILL");
    await victim.exited;
    const job = await waitForJob(orch, id, "ends", (j) =>
      ["Completed", "Failed", "Stopped"].includes(j.State),
    );
    t.equal(job.State, "Completed", job.StateMessage);
    t.equal(job.Retries, 1, "one reschedule spent");
    const lost = job.Executions.find((e) => e.ID === first.ID)!;
    t.equal(lost.State, "Lost");
    t.match(lost.StateMessage, new RegExp(`node ${first.NodeID} is LOST`));
    const done = job.Executions.filter((e) => e.State === "Completed");
    t.equal(done.length, 1);
    t.not(done[0]!.NodeID, first.NodeID, "completed on the other node");
    t.equal(done[0]!.Stdout, "slept\n");
  });

  t.test("the orchestrator killed mid-job and restarted: the job completes, no state is lost", async (t) => {
    const id = await submit("sleep-orch-kill");
    const running = await waitForRunning(orch, id);
    const jobsBefore = (await orch.client.get<{ Items: JobRecord[] }>("/api/v1/orchestrator/jobs")).Items;
    const historyBefore = (
      await orch.client.get<{ Items: JobEvent[] }>(`/api/v1/orchestrator/jobs/${id}/history`)
    ).Items;
    const natsPid = Number(await fs.readFile(path.join(orchDir, "nats", "nats-server.pid"), "utf8"));
    orch.proc.child.kill("SIGKILL");
    await orch.proc.exited;
    // The same NATS port the kernel gave the first run: the surviving node dials it to reconnect.
    // A restarted orchestrator gives known nodes one DisconnectTimeout to check in: long enough here.
    const port = `Orchestrator.Port=${orch.natsPort}`;
    orch = await startOrchestrator(t, orchDir, [
      "-c",
      "Orchestrator.NodeManager.DisconnectTimeout=20s",
      "-c",
      port,
    ]);
    t.notOk(await isRunning(natsPid), "the nats-server left by the killed orchestrator was stopped");
    const job = await waitForJob(orch, id, "ends", (j) =>
      ["Completed", "Failed", "Stopped"].includes(j.State),
    );
    t.equal(job.State, "Completed", job.StateMessage);
    t.match(job.Executions, [
      { ID: running.ID, NodeID: running.NodeID, State: "Completed", Stdout: "slept\n" },
    ]);
    t.equal(job.Executions.length, 1, "the running execution carried on: nothing was placed again");

    const jobsAfter = (await orch.client.get<{ Items: JobRecord[] }>("/api/v1/orchestrator/jobs")).Items;
    for (const before of jobsBefore) {
      const after = jobsAfter.find((j) => j.ID === before.ID);
      t.ok(after, `job ${before.Name} is still listed`);
      if (before.State === "Completed")
        t.equal(after?.State, "Completed", `${before.Name} is still Completed`);
    }
    const history = await runShoal(t, ["job", "history", id, "--output", "json", ...orch.api]);
    t.equal(history.code, 0, history.stderr);
    const events = JSON.parse(history.stdout) as JobEvent[];
    t.same(events.slice(0, historyBefore.length), historyBefore, "the history before the kill is intact");
    t.match(events.at(-1), { Type: "JobStateUpdate", State: "Completed" });
  });
});

t.test(
  "a compute node killed mid-job takes its exec program with it, and kills what that left running when it starts again",
  async (t) => {
    const dir = await tempDir(t);
    // Long enough for the node to be back before its execution is taken for lost.
    const orch = await startOrchestrator(t, path.join(dir, "orch"), [
      "-c",
      "Orchestrator.NodeManager.DisconnectTimeout=60s",
    ]);
    const exec = ["-c", "Compute.Engines.Exec.Allow=/bin/sh", "-c", "Compute.Labels=exec=yes"];
    const n3Dir = path.join(dir, "n3");
    const n3 = await startComputeNode(t, orch, n3Dir, "n3", exec);
    // The shell leaves one sleep behind and becomes the other (exec keeps its parent-death signal).
    const engine = `{Type: exec, Params: {Command: /bin/sh, Arguments: ["-c", "sleep 300.251 & exec sleep 300.501"]}}`;
    const spec = await writeSpec(
      dir,
      "exec-node-kill",
      engine,
      "",
      "Constraints: [{Key: exec, Operator: exists}]",
    );
    const id = await submitJob(orch, spec);
    await waitForRunning(orch, id);
    await waitUntil(
      "both sleeps run",
      async () => ((await sleepRunning("300.251")) && (await sleepRunning("300.501"))) || undefined,
    );
    n3.child.kill("SIGKILL");
    await n3.exited;
    await waitUntil(
      "the program dies with its node",
      async () => !(await sleepRunning("300.501")) || undefined,
      5000,
    );
    t.ok(await sleepRunning("300.251"), "what it started runs on while the node is down");
    await startComputeNode(t, orch, n3Dir, "n3", exec);
    await waitUntil(
      "the node kills it when it starts again",
      async () => !(await sleepRunning("300.251")) || undefined,
      5000,
    );
    const job = await waitForJob(orch, id, "ends", (j) =>
      ["Completed", "Failed", "Stopped"].includes(j.State),
    );
    t.equal(job.State, "Failed");
    t.match(job.StateMessage, /the compute node stopped while the execution ran/);
  },
);
