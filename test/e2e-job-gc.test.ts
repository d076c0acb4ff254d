import "reflect-metadata";
import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import type { ApiResponseError } from "../cli/api-client.js";
import {
  type OrchestratorHandle,
  startComputeNode,
  startOrchestrator,
  tempDir,
  waitUntil,
} from "./helpers/cluster.js";
import { getJob, submitJob, waitForJob, writeNowhereSpec } from "./helpers/e2e-jobs.js";

/**
 * Job garbage collection with real processes: `shoal orchestrator serve`
 * with a short `Orchestrator.JobGC.Threshold` and one `shoal compute serve`:
 * a finished job goes with its result files, and then its module, which no
 * other job runs.
 * Requires dist/wasm (scripts/build-wasm).
 */
/** Waits (5 s at most) until nothing is at `file`. */
const untilGone = (what: string, file: string) =>
  waitUntil(
    what,
    () =>
      fs.stat(file).then(
        () => undefined,
        () => true,
      ),
    5_000,
  );

/** Waits (20 s at most) until the API no longer finds the job; its error. */
const untilRemoved = (orch: OrchestratorHandle, id: string, what: string) =>
  waitUntil(
    what,
    () =>
      getJob(orch, id).then(
        () => undefined,
        (e: ApiResponseError) => e,
      ),
    20_000,
  );

t.test("a finished job is removed with its result files once the threshold has passed", async (t) => {
  const dir = await tempDir(t);
  const orch = await startOrchestrator(t, path.join(dir, "orch"), ["-c", "Orchestrator.JobGC.Threshold=2s"]);
  await startComputeNode(t, orch, path.join(dir, "n1"), "n1");
  const nowhere = await writeNowhereSpec(dir);
  const queued = await submitJob(orch, nowhere);
  const id = await submitJob(orch, "configs/jobs/upper.yaml");
  const done = await waitForJob(orch, id, "completes", (j) => j.State === "Completed");
  t.equal(done.Executions[0]?.Results?.length, 1, "it has a result file");
  const resultsDir = path.join(orch.dataDir, "results", id);
  t.ok((await fs.stat(resultsDir)).isDirectory(), "stored on the orchestrator's disk");
  const storedModule = async (wasm: string) => {
    const digest = createHash("sha256")
      .update(await fs.readFile(wasm))
      .digest("hex");
    return path.join(orch.dataDir, "modules", `${digest}.wasm`);
  };
  const upper = await storedModule("dist/wasm/upper.wasm");
  const hello = await storedModule("dist/wasm/hello.wasm");
  t.ok((await fs.stat(upper)).isFile(), "its module is stored apart");

  const err = await untilRemoved(orch, id, "the job is removed");
  t.equal(err.status, 404);
  t.equal(err.code, "SHOAL_ORCH_JOB_NOT_FOUND");
  // The job is forgotten first, its files removed right after.
  await untilGone("its result files are removed", resultsDir);
  await t.rejects(fs.stat(resultsDir), { code: "ENOENT" }, "its result files are removed");
  const list = await orch.client.get<{ Items: { ID: string }[] }>("/api/v1/orchestrator/jobs");
  t.notOk(
    list.Items.some((j) => j.ID === id),
    "nor listed",
  );
  t.equal((await getJob(orch, queued)).State, "Queued", "an unfinished job older than the threshold stays");
  // No stored job names the removed job's module: it goes at the second sweep (every 0.5 s) after.
  await untilGone("the removed job's module is removed", upper);
  t.ok((await fs.stat(hello)).isFile(), "the queued job's module stays");
});

t.test(
  "beyond Orchestrator.JobGC.MaxJobs finished jobs, the first to end is removed at the next sweep",
  async (t) => {
    const dir = await tempDir(t);
    const orch = await startOrchestrator(t, path.join(dir, "orch"), [
      "-c",
      "Orchestrator.JobGC.Threshold=0s",
      "-c",
      "Orchestrator.JobGC.MaxJobs=1",
    ]);
    await startComputeNode(t, orch, path.join(dir, "n1"), "n1");
    const first = await submitJob(orch, "configs/jobs/upper.yaml");
    await waitForJob(orch, first, "the first completes", (j) => j.State === "Completed");
    const second = await submitJob(orch, "configs/jobs/upper.yaml");
    await waitForJob(orch, second, "the second completes", (j) => j.State === "Completed");
    // A sweep comes at least every 10 s with a limit, whatever the threshold (here none).
    const err = await untilRemoved(orch, first, "the first job is removed");
    t.equal(err.code, "SHOAL_ORCH_JOB_NOT_FOUND");
    await untilGone("its result files are removed", path.join(orch.dataDir, "results", first));
    t.equal((await getJob(orch, second)).State, "Completed", "the last to end stays");
  },
);
