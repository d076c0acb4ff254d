import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t, { type Test } from "tap";
import { isRunning } from "../core/index.js";
import { runShoal, startComputeNode, startOrchestrator, tempDir } from "./helpers/cluster.js";
import {
  buildWasm,
  SMALL_NODE,
  SPIN_WAT,
  spinningThread,
  submitJob,
  threadAlive,
  waitForJob,
  waitForRunning,
  wasmEngine,
  writeSmallSpec,
  writeSpec,
} from "./helpers/e2e-jobs.js";

/**
 * Faults end to end with real processes (`shoal orchestrator serve`, two
 * `shoal compute serve`, the CLI): a job past its ExecutionTimeout, `job
 * stop`, the exec allow-list, and graceful SIGTERM of every daemon. A
 * spinning WebAssembly module shows that a timeout or a stop really kills
 * the worker thread on the node.
 */
t.test("timeouts, stop, the exec allow-list and SIGTERM, with real processes", async (t) => {
  const dir = await tempDir(t);
  const orch = await startOrchestrator(t, path.join(dir, "orch"));
  const { api } = orch;
  const [n1, n2] = await Promise.all([
    startComputeNode(t, orch, path.join(dir, "n1"), "n1", [
      "-c",
      "Compute.Engines.Exec.Allow=/bin/echo",
      "-c",
      "Compute.Labels=exec=yes",
    ]),
    startComputeNode(t, orch, path.join(dir, "n2"), "n2"),
  ]);
  const nodes = { n1, n2 };
  const pidOf = (nodeId: string) => nodes[nodeId as keyof typeof nodes].child.pid!;
  const spin = await buildWasm(dir, "spin", SPIN_WAT);
  /** Submits a spinning job and returns its execution with the node's worker thread running it. */
  const startSpinning = async (t: Test, name: string, timeout: string) => {
    const id = await submitJob(
      orch,
      await writeSpec(dir, name, wasmEngine(spin), `Timeouts: {ExecutionTimeout: ${timeout}}`),
    );
    const execution = await waitForRunning(orch, id);
    const pid = pidOf(execution.NodeID);
    const tid = await spinningThread(pid);
    t.ok(tid, `a worker thread of ${execution.NodeID} spins while the execution runs`);
    return { id, execution, pid, tid: tid! };
  };
  const workerGone = async (pid: number, tid: string) => {
    for (let i = 0; i < 100 && (await threadAlive(pid, tid)); i++)
      await new Promise((r) => setTimeout(r, 100));
    return !(await threadAlive(pid, tid));
  };

  t.test(
    "a job past its ExecutionTimeout fails with SHOAL_ENGINE_TIMEOUT and its worker is killed",
    async (t) => {
      const { id, execution, pid, tid } = await startSpinning(t, "spin-timeout", "5s");
      const job = await waitForJob(orch, id, "ends", (j) =>
        ["Completed", "Failed", "Stopped"].includes(j.State),
      );
      t.equal(job.State, "Failed");
      t.match(job.StateMessage, /SHOAL_ENGINE_TIMEOUT: killed after the execution timeout of 5000 ms/);
      const e = job.Executions.find((x) => x.ID === execution.ID)!;
      t.equal(e.State, "Failed");
      t.equal(e.ExitCode, -1);
      t.ok(await workerGone(pid, tid), "the spinning worker thread is gone");
      t.equal(nodes.n1.child.exitCode ?? nodes.n2.child.exitCode, null, "the compute nodes keep running");
    },
  );

  t.test("`shoal job stop` stops a running job and the node kills its execution", async (t) => {
    const { id, execution, pid, tid } = await startSpinning(t, "spin-stop", "5m");
    // The job was submitted as the admin (orch.client): only its owner or an admin may stop it.
    const stopped = await runShoal(t, ["job", "stop", id, "--output", "json", ...api], {
      SHOAL_TOKEN: await orch.adminToken(),
    });
    t.equal(stopped.code, 0, stopped.stderr);
    t.match(JSON.parse(stopped.stdout), { JobID: id, State: "Stopped" });
    const job = await waitForJob(orch, id, "is Stopped", (j) => j.State === "Stopped");
    t.equal(job.Executions.find((x) => x.ID === execution.ID)?.State, "Cancelled");
    t.ok(await workerGone(pid, tid), "the node killed the spinning worker thread");
  });

  t.test("a job queued for a node's capacity runs there once a stopped job frees it", async (t) => {
    // n3 has one CPU. The orchestrator frees the stopped job's CPU at once, but the node only
    // once the cancelled module is gone: the queued job's first bid can find the node busy,
    // and a busy node is asked again rather than counted as declining the job for good.
    await startComputeNode(t, orch, path.join(dir, "n3"), "n3", SMALL_NODE);
    const holding = await submitJob(orch, await writeSmallSpec(dir, "holding", 60_000));
    await waitForRunning(orch, holding);
    const waiting = await submitJob(orch, await writeSmallSpec(dir, "waiting", 10));
    const queued = await waitForJob(orch, waiting, "Queued", (j) => j.State === "Queued");
    t.match(queued.StateMessage, /CPU/, "it waits for n3's CPU");
    await orch.client.delete(`/api/v1/orchestrator/jobs/${holding}`);
    const done = await waitForJob(
      orch,
      waiting,
      "ends",
      (j) => ["Completed", "Failed"].includes(j.State),
      20_000,
    );
    t.equal(done.State, "Completed", JSON.stringify(done.Executions));
    t.same(
      done.Executions.map((e) => [e.NodeID, e.State]),
      [["n3", "Completed"]],
      "one execution: the busy bid was asked again, not refused",
    );
  });

  t.test("an exec job runs only a command in Compute.Engines.Exec.Allow", async (t) => {
    const refused = await submitJob(
      orch,
      await writeSpec(
        dir,
        "exec-cat",
        "{Type: exec, Params: {Command: /bin/cat, Arguments: [/etc/hostname]}}",
        "Timeouts: {QueueTimeout: 0}",
      ),
    );
    const job = await waitForJob(orch, refused, "ends", (j) => j.State === "Failed");
    t.match(job.StateMessage, /queue timeout: .*n1: declined the job.*n2: no exec engine/);
    t.equal(job.Executions.length, 1, "only the node with exec enabled is asked");
    t.match(job.Executions[0], {
      NodeID: "n1",
      State: "BidRejected",
      StateMessage:
        /SHOAL_ENGINE_EXEC_NOT_ALLOWED: command "\/bin\/cat" is not in Compute\.Engines\.Exec\.Allow/,
    });

    const r = await runShoal(t, [
      "job",
      "run",
      "configs/jobs/exec-echo.yaml",
      "--wait",
      "--output",
      "json",
      ...api,
    ]);
    t.equal(r.code, 0, r.stderr);
    const allowed = JSON.parse(r.stdout);
    t.equal(allowed.State, "Completed");
    t.match(allowed.Executions, [
      { NodeID: "n1", State: "Completed", ExitCode: 0, Stdout: "hello from exec\n" },
    ]);

    // The node compares real paths: a link to a shell is the shell, whatever its name.
    const link = path.join(dir, "echo");
    await fs.symlink("/bin/sh", link);
    const viaLink = await submitJob(
      orch,
      await writeSpec(
        dir,
        "exec-link",
        `{Type: exec, Params: {Command: ${link}, Arguments: [-c, "echo pwned"]}}`,
        "Timeouts: {QueueTimeout: 0}",
      ),
    );
    const linked = await waitForJob(orch, viaLink, "ends", (j) => j.State === "Failed");
    t.match(linked.Executions, [
      {
        NodeID: "n1",
        State: "BidRejected",
        StateMessage: new RegExp(
          `SHOAL_ENGINE_EXEC_NOT_ALLOWED: command "${link}" is not in Compute\\.Engines\\.Exec\\.Allow \\(it resolves to ${await fs.realpath("/bin/sh")}\\)`,
        ),
      },
    ]);
    // ...and another spelling of an allowed program is that program (n1 allows /bin/echo).
    const other = (await fs.realpath("/bin/echo")) === "/usr/bin/echo" ? "/usr/bin/echo" : "/bin/echo";
    const sameProgram = await submitJob(
      orch,
      await writeSpec(dir, "exec-usr-echo", `{Type: exec, Params: {Command: ${other}, Arguments: [same]}}`),
    );
    const same = await waitForJob(orch, sameProgram, "ends", (j) =>
      ["Completed", "Failed"].includes(j.State),
    );
    t.equal(same.State, "Completed", same.StateMessage);
    t.match(same.Executions, [{ NodeID: "n1", State: "Completed", Stdout: "same\n" }]);
  });

  t.test("SIGTERM stops compute nodes and the orchestrator gracefully (exit 0)", async (t) => {
    const natsPid = Number(await fs.readFile(path.join(orch.dataDir, "nats", "nats-server.pid"), "utf8"));
    for (const node of Object.values(nodes)) node.child.kill("SIGTERM");
    for (const [id, node] of Object.entries(nodes)) {
      t.match(await node.exited, { code: 0 }, `${id} exits 0: ${node.stderr().slice(-1000)}`);
    }
    orch.proc.child.kill("SIGTERM");
    t.match(await orch.proc.exited, { code: 0 }, orch.proc.stderr().slice(-1000));
    t.notOk(await isRunning(natsPid), "the supervised nats-server stopped with it");
  });
});
