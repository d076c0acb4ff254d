import "reflect-metadata";
import { execFile } from "node:child_process";
import { promises as fs } from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import t, { type Test } from "tap";
import type { ApiResponseError } from "../cli/api-client.js";
import { writeIssued } from "../pki/index.js";
import {
  computeServeArgs,
  runShoal,
  startComputeNode,
  startOrchestrator,
  tempDir,
  waitUntil,
} from "./helpers/cluster.js";
import {
  getJob,
  scrapeMetrics,
  submitJob,
  waitForJob,
  wasmEngine,
  writeNowhereSpec,
  writeSpec,
} from "./helpers/e2e-jobs.js";
import { fillBut, smallDisk, whySmallDisksCannot } from "./helpers/small-disk.js";

/**
 * A full disk, for real: a small tmpfs mounted over a node's data directory,
 * over the orchestrator's result files, or over its whole data directory,
 * with real processes. The job
 * copies an input of 250,000 bytes to a result file of the same size
 * (dist/wasm/upper.wasm). Needs root to mount (skipped otherwise) and
 * dist/wasm (scripts/build-wasm).
 */
const run = promisify(execFile);
const INPUT = "x".repeat(250_000);

/** An orchestrator whose whole data directory is an 8 MiB tmpfs, with `Orchestrator.Storage.MinFree` at `minFree`. */
async function orchestratorOnSmallDisk(t: Test, dir: string, minFree: string) {
  const orchDir = path.join(dir, "orch");
  await smallDisk(t, orchDir, "8m");
  return startOrchestrator(t, orchDir, ["-c", `Orchestrator.Storage.MinFree=${minFree}`]);
}

/**
 * An orchestrator, and a node `n1` whose data directory is a tmpfs of `size`
 * with `Compute.Storage.MinFree` at `minFree` (and `extra` settings).
 */
async function nodeOnSmallDisk(t: Test, size: string, minFree: string, extra: string[] = []) {
  const dir = await tempDir(t);
  const orch = await startOrchestrator(t, path.join(dir, "orch"));
  const nodeDir = path.join(dir, "n1");
  await smallDisk(t, nodeDir, size);
  const node = await startComputeNode(t, orch, nodeDir, "n1", [
    "-c",
    `Compute.Storage.MinFree=${minFree}`,
    ...extra,
  ]);
  return { dir, orch, nodeDir, node };
}

/** The job: upper-cases INPUT into the result file `outputs/out.txt`. */
async function bigJob(dir: string, timeout: string): Promise<string> {
  return writeSpec(
    dir,
    "big",
    wasmEngine(path.resolve("dist/wasm/upper.wasm")),
    `InputSources: [{Alias: text, Target: /inputs/in.txt, Source: {Type: inline, Params: {Content: "${INPUT}"}}}]
    ResultPaths: [{Name: outputs, Path: /outputs}]
    Timeouts: {ExecutionTimeout: ${timeout}}`,
  );
}

/** Every file under `dir`, as paths relative to it. */
async function filesUnder(dir: string): Promise<string[]> {
  const entries = await fs.readdir(dir, { recursive: true, withFileTypes: true });
  return entries.filter((e) => !e.isDirectory()).map((e) => path.relative(dir, path.join(e.path, e.name)));
}

const skip = await whySmallDisksCannot();
if (skip) {
  t.plan(0, `full-disk tests skipped: ${skip}`);
} else {
  // Seven clusters of real processes in turn, one waiting ~45 s for a hung server: past tap's 120 s on a busy machine.
  t.setTimeout(360_000);
  t.test(
    "a node that cannot store a result's files reports the execution Failed at once, and why",
    async (t) => {
      // Room for the node's own files and the input, not for the result's copy in the spool
      // too; and none kept (MinFree 0): the node takes the job, and its disk fills up for real.
      const { dir, orch, nodeDir } = await nodeOnSmallDisk(t, "600k", "0");
      // A timeout far beyond the wait below: a result that never came would fail the wait.
      const id = await submitJob(orch, await bigJob(dir, "10m"));
      const job = await waitForJob(orch, id, "fails", (j) => j.State === "Failed", 30_000);
      t.match(
        job.Executions[0]?.StateMessage,
        /^the node cannot store the result's files: SHOAL_FILE_WRITE: cannot write .*\/spool\/.*: ENOSPC$/,
      );
      t.equal(job.Executions[0]?.Stdout, "upper: wrote /outputs/out.txt\n", "what the run printed is kept");
      t.same(job.Executions[0]?.Results, [], "no files");
      // Once the failure is acknowledged nothing is left behind but the spare manifests kept
      // for reuse (see ResultSpool): the disk is free for the next job.
      await waitUntil("the spool is empty", async () =>
        (await filesUnder(path.join(nodeDir, "spool"))).every((f) => /^\.spare-\d+\.tmp$/.test(f))
          ? true
          : undefined,
      );
      const hello = await submitJob(orch, "configs/jobs/hello.yaml");
      await waitForJob(orch, hello, "completes on the same node", (j) => j.State === "Completed");
    },
  );

  t.test(
    "an orchestrator that cannot store a result keeps nothing partial, and stores it once there is room",
    async (t) => {
      const dir = await tempDir(t);
      const orch = await startOrchestrator(t, path.join(dir, "orch"));
      const results = path.join(orch.dataDir, "results");
      await smallDisk(t, results, "100k");
      await startComputeNode(t, orch, path.join(dir, "n1"), "n1");
      const id = await submitJob(orch, await bigJob(dir, "1s"));
      // The node got no answer: its execution times out here, naming why.
      const failed = await waitForJob(orch, id, "times out", (j) => j.State === "Failed", 30_000);
      const execution = failed.Executions[0]!;
      t.match(
        execution.StateMessage,
        /^execution timeout: its result came but could not be stored here \(a chunk could not be staged: cannot write .*\/results\/\.staging\/.*: ENOSPC\); the node keeps it and sends it again$/,
      );
      t.same(await filesUnder(results), [], "no part of a chunk is left to fill the disk");

      await run("mount", ["-o", "remount,size=2m", results]);
      // The node sends it again (within about 10 s of its last try) and this time it is stored.
      const stored = await waitUntil(
        "the result is stored",
        async () => {
          const e = (await getJob(orch, id)).Executions[0];
          return e?.Results?.length ? e : undefined;
        },
        60_000,
      );
      t.equal(stored.State, "Failed", "the execution keeps its state");
      const out = await fs.readFile(path.join(results, id, execution.ID, "outputs", "out.txt"), "utf8");
      t.equal(out, INPUT.toUpperCase(), "the whole file");
    },
  );

  t.test(
    "an orchestrator whose JetStream hangs on a full disk starts its nats-server again, and loses nothing",
    async (t) => {
      const dir = await tempDir(t);
      // No room kept: the disk fills up for real.
      const orch = await orchestratorOnSmallDisk(t, dir, "0");
      const nowhere = await writeNowhereSpec(dir);
      const queued = await submitJob(orch, nowhere);
      // Everything but about 150 KB: the next job's record (its input) does not fit.
      const filler = await fillBut(orch.dataDir, 150_000);
      const full = await submitJob(orch, await bigJob(dir, "1m")).catch((e: ApiResponseError) => e);
      t.match(full, { status: 503, code: "SHOAL_ORCH_STATE_STORE" }, "the job cannot be stored");
      // nats-server 2.9.10 now waits on a lock it holds: nothing is stored until it is
      // started again, which the orchestrator does, here on a disk still full.
      const pidFile = path.join(orch.dataDir, "nats", "nats-server.pid");
      const hung = await fs.readFile(pidFile, "utf8");
      await orch.proc.waitFor(/stopping nats-server to start it again/, 90_000);
      await waitUntil("the new server is ready", async () =>
        (await fs.readFile(pidFile, "utf8")) !== hung ? true : undefined,
      );
      // Started on a full disk, it stores jobs again once there is room.
      await fs.rm(filler);
      const id = await waitUntil(
        "a job is stored again",
        () => submitJob(orch, nowhere).catch(() => undefined),
        60_000,
        500,
      );
      t.equal((await getJob(orch, id)).State, "Queued");
      t.equal((await getJob(orch, queued)).State, "Queued", "the job stored before is still there");
      t.match(orch.proc.stderr(), /JetStream does not answer/);
      const metrics = await scrapeMetrics(orch, await orch.adminToken());
      t.equal(metrics.value("shoal_nats_server_restarts_total"), 1, "counted");
    },
  );

  t.test(
    "below Orchestrator.Storage.MinFree new jobs are refused and results wait on their node, before anything hangs",
    async (t) => {
      const dir = await tempDir(t);
      const orch = await orchestratorOnSmallDisk(t, dir, "4Mi");
      // Stored while there is room, run once the disk is short of it.
      const id = await submitJob(orch, await bigJob(dir, "10m"));
      const filler = await fillBut(orch.dataDir, 3 * 2 ** 20);
      await new Promise((r) => setTimeout(r, 1_100)); // the free space is read once a second
      const refused = await submitJob(orch, await bigJob(dir, "10m")).catch((e: ApiResponseError) => e);
      t.match(refused, {
        status: 507,
        code: "SHOAL_ORCH_DISK_FULL",
        message:
          /^no room for new jobs: .* has \d+\.\d MiB free, less than Orchestrator.Storage.MinFree \(4\.0 MiB\)$/,
      });
      const node = await startComputeNode(t, orch, path.join(dir, "n1"), "n1");
      await node.waitFor(/result not delivered; will retry/, 60_000);
      t.equal((await getJob(orch, id)).State, "Running", "its result waits on the node");
      t.match(orch.proc.stderr(), /no room for result files: .* less than Orchestrator.Storage.MinFree/);

      await fs.rm(filler);
      const done = await waitForJob(orch, id, "completes", (j) => j.State === "Completed", 60_000);
      t.equal(done.Executions[0]?.Results?.length, 1, "with its result file");
      t.type(await submitJob(orch, await bigJob(dir, "10m")), "string", "new jobs are taken again");
      t.notMatch(orch.proc.stderr(), /JetStream does not answer/, "JetStream never hung");
    },
  );

  t.test(
    "below Compute.Storage.MinFree no job goes to a node, and a queued one does once there is room",
    async (t) => {
      const { orch, nodeDir } = await nodeOnSmallDisk(t, "4m", "2Mi");
      const filler = await fillBut(nodeDir, 2 ** 20);
      // Its next heartbeat (every 5 s) says so.
      const lowDisk = await waitUntil("the node reports its disk short of room", async () => {
        const { Node } = await orch.client.get<{ Node: { LowDisk?: string } }>(
          "/api/v1/orchestrator/nodes/n1",
        );
        return Node.LowDisk;
      });
      t.match(lowDisk, /\/n1 has \d+\.\d MiB free, less than Compute.Storage.MinFree \(2\.0 MiB\)$/);
      const id = await submitJob(orch, "configs/jobs/hello.yaml");
      const queued = await waitForJob(orch, id, "is queued", (j) => j.State === "Queued");
      t.match(queued.StateMessage, `n1: short of disk: ${lowDisk}`);
      t.same(queued.Executions, [], "the node is not asked");
      const metrics = await scrapeMetrics(orch, await orch.adminToken());
      t.equal(metrics.value("shoal_nodes_short_of_disk"), 1, "counted");
      t.equal(metrics.value("shoal_nats_server_restarts_total"), 0);

      await fs.rm(filler);
      await waitForJob(orch, id, "completes on the node once it has room", (j) => j.State === "Completed");
    },
  );

  t.test("a node asked before its heartbeat told of a full disk declines the bid, naming it", async (t) => {
    // No heartbeat in the test's time: the orchestrator knows nothing of the disk.
    const { orch, nodeDir, node } = await nodeOnSmallDisk(t, "4m", "2Mi", [
      "-c",
      "Compute.Heartbeat.Interval=1h",
    ]);
    await fillBut(nodeDir, 2 ** 20);
    await new Promise((r) => setTimeout(r, 1_100)); // the free space is read once a second
    const id = await submitJob(orch, "configs/jobs/hello.yaml");
    const declined = await waitForJob(
      orch,
      id,
      "is declined",
      (j) => j.Executions[0]?.State === "BidRejected",
    );
    t.match(
      declined.Executions[0]?.StateMessage,
      /^bid rejected: no room on the node: .*\/n1 has \d+\.\d MiB free, less than Compute.Storage.MinFree \(2\.0 MiB\)$/,
    );
    t.match(node.stderr(), /declining jobs: the disk is short of room/);
    t.equal(declined.Executions[0]?.ShortOfDisk, true, "a passing decline: the node may be asked again");
  });

  t.test(
    "a node that cannot start on a full disk names the file, leaves nothing behind, and starts once there is room",
    async (t) => {
      const dir = await tempDir(t);
      const orch = await startOrchestrator(t, path.join(dir, "orch"));
      const nodeDir = path.join(dir, "n1");
      await smallDisk(t, nodeDir, "1m");
      await writeIssued(path.join(nodeDir, "identity"), await orch.pki.issue({ role: "compute", id: "n1" }));
      const filler = await fillBut(nodeDir, 0);
      const servers = `tls://127.0.0.1:${orch.natsPort}`;
      const failed = await runShoal(t, computeServeArgs({ dataDir: nodeDir, servers, caFile: orch.ca }));
      t.equal(failed.code, 1);
      t.match(
        failed.stderr,
        /SHOAL_FILE_WRITE: cannot write .*\/n1\/compute\.lock: ENOSPC\n {2}fix: check the directory's permissions and free space/,
      );
      await t.rejects(fs.stat(path.join(nodeDir, "compute.lock")), { code: "ENOENT" }, "no empty lock left");

      await fs.rm(filler);
      await startComputeNode(t, orch, nodeDir, "n1");
    },
  );
}
