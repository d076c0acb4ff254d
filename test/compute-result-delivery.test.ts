import "reflect-metadata";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import t from "tap";
import { ComputeNode, type ComputeNodeEvent, failedOutcome, ResultSpool } from "../compute/index.js";
import { computeConfig, OrchestratorStandIn } from "./helpers/compute-standin.js";
import { startTestFabric, type TestIdentity } from "./helpers/nats.js";
import { spoolEntries } from "./helpers/records.js";

const repo = path.resolve(import.meta.dirname, "..");
const root = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-compute-delivery-"));
t.teardown(() => fs.rm(root, { recursive: true, force: true }));
const upperWasm = path.join(root, "upper.wasm");
await promisify(execFile)("wat2wasm", [path.join(repo, "configs/jobs/upper.wat"), "-o", upperWasm]);
const upper = await fs.readFile(upperWasm);

const spec = (text: string) => ({
  Name: "upper",
  Tasks: [
    {
      Name: "main",
      Engine: {
        Type: "wasm",
        Params: { EntryModule: { Type: "inline", Params: { Content: upper.toString("base64") } } },
      },
      InputSources: [{ Target: "/inputs/in.txt", Source: { Type: "inline", Params: { Content: text } } }],
      ResultPaths: [{ Name: "outputs", Path: "/outputs" }],
      Resources: { CPU: "100m", Memory: "16Mi" },
    },
  ],
});
const submitter = { sub: "alice", namespace: "default", method: "password" };

const fabric = await startTestFabric(t);
const orch = await OrchestratorStandIn.start(t, fabric, await fabric.identity("orchestrator", "orch-1"));

async function startNode(identity: TestIdentity, dataDir: string) {
  const node = new ComputeNode({
    config: await computeConfig(fabric, identity, dataDir),
    requestTimeoutMs: 300,
    retryBaseMs: 100,
    shutdownGraceMs: 200,
    deliveryFlushMs: 300,
  });
  t.teardown(() => node.close());
  const events: ComputeNodeEvent[] = [];
  const iterator = node.events()[Symbol.asyncIterator]();
  /** Resolves with the next event that matches. */
  const until = async (p: (e: ComputeNodeEvent) => boolean) => {
    for (;;) {
      const { value, done } = await iterator.next();
      if (done) throw new Error("the node closed first");
      events.push(value);
      if (p(value)) return value;
    }
  };
  await node.start();
  return { node, until };
}

t.test("an unacknowledged result stays in the spool and is sent again after a restart", async (t) => {
  const identity = await fabric.identity("compute", "node-restart");
  const dataDir = path.join(root, "restart");
  orch.resultReply = () => undefined; // the orchestrator never answers
  const first = await startNode(identity, dataDir);
  await orch.next("register", (b) => b.nodeId === "node-restart");
  const ids = { jobId: "job-r", executionId: "exec-r" };
  await orch.request("node-restart", "run", { ...ids, spec: spec("kept\n"), submitter, timeoutMs: 30_000 });
  await first.until((e) => e.type === "result-spooled");
  await orch.next("result", (b) => b.executionId === "exec-r");
  t.same(
    await spoolEntries(path.join(dataDir, "spool")),
    ["exec-r", "exec-r.json"],
    "kept while unacknowledged",
  );
  const manifest = JSON.parse(await fs.readFile(path.join(dataDir, "spool", "exec-r.json"), "utf8"));
  t.equal(manifest.result.state, "Completed");
  await first.node.close();
  t.same(
    await spoolEntries(path.join(dataDir, "spool")),
    ["exec-r", "exec-r.json"],
    "still there after the node stopped",
  );

  orch.resultReply = () => ({ stored: true });
  const second = await startNode(identity, dataDir);
  const reg = await orch.next("register", (b) => b.nodeId === "node-restart");
  t.same(
    reg.body.executions,
    [{ executionId: "exec-r", state: "Completed" }],
    "register lists the held result",
  );
  await second.until((e) => e.type === "result-acknowledged" && e.executionId === "exec-r");
  const resent = await orch.next("result", (b) => b.executionId === "exec-r");
  t.equal(resent.body.files[0]?.name, "outputs/out.txt");
  t.same(await spoolEntries(path.join(dataDir, "spool")), [], "removed once stored");
});

t.test(
  "a result pending across a broker restart is delivered after reconnecting and registering again",
  async (t) => {
    const identity = await fabric.identity("compute", "node-reconnect");
    const dataDir = path.join(root, "reconnect");
    orch.resultReply = () => undefined;
    const { until } = await startNode(identity, dataDir);
    await orch.next("register", (b) => b.nodeId === "node-reconnect");
    await orch.request("node-reconnect", "run", {
      jobId: "job-c",
      executionId: "exec-c",
      spec: spec("across\n"),
      submitter,
      timeoutMs: 30_000,
    });
    await orch.next("result", (b) => b.executionId === "exec-c");

    // Stop answering at all: kill the broker; the supervisor starts it again on the same port.
    orch.resultReply = () => ({ stored: true });
    process.kill(fabric.supervisor.pid!, "SIGKILL");
    await until((e) => e.type === "disconnected");
    await until((e) => e.type === "reconnected");
    const reg = await orch.next("register", (b) => b.nodeId === "node-reconnect");
    t.same(reg.body.executions, [{ executionId: "exec-c", state: "Completed" }]);
    await until((e) => e.type === "result-acknowledged" && e.executionId === "exec-c");
    t.same(await spoolEntries(path.join(dataDir, "spool")), []);
  },
);

t.test("a result the orchestrator keeps refusing is dropped after the limit", async (t) => {
  const identity = await fabric.identity("compute", "node-refused");
  const dataDir = path.join(root, "refused");
  orch.resultReply = () => ({
    stored: false,
    reason: "execution is Cancelled; its result is no longer wanted",
  });
  const { until } = await startNode(identity, dataDir);
  await orch.next("register", (b) => b.nodeId === "node-refused");
  await orch.request("node-refused", "run", {
    jobId: "job-x",
    executionId: "exec-x",
    spec: spec("x\n"),
    submitter,
    timeoutMs: 30_000,
  });
  const dropped = await until((e) => e.type === "result-refused" && e.dropped);
  t.match(dropped, { executionId: "exec-x", reason: /no longer wanted/ });
  t.same(await spoolEntries(path.join(dataDir, "spool")), []);
});

t.test("a dropped result whose spool entry cannot be removed is logged; the node carries on", async (t) => {
  const identity = await fabric.identity("compute", "node-stuck");
  const dataDir = path.join(root, "stuck");
  const spoolDir = path.join(dataDir, "spool");
  const spool = new ResultSpool(spoolDir);
  await spool.init();
  await spool.put("job-s", { ...failedOutcome("exec-stuck", ""), state: "Completed", exitCode: 0 }, []);
  // Immutable: not even root may rename or unlink in it (permissions would not stop root).
  const immutable = await promisify(execFile)("chattr", ["+i", spoolDir]).then(
    () => true,
    (err: Error) => {
      t.plan(0, `the file system has no immutable flag (chattr: ${err.message.trim()})`);
      return false;
    },
  );
  if (!immutable) return;
  t.teardown(() => promisify(execFile)("chattr", ["-i", spoolDir]));
  orch.resultReply = () => ({ stored: false, reason: "not wanted" });
  t.teardown(() => {
    orch.resultReply = () => ({ stored: true });
  });
  const { node } = await startNode(identity, dataDir);
  for (let i = 0; i < 3; i++) await orch.next("result", (b) => b.executionId === "exec-stuck", 10_000);
  const stopped = await Promise.race([
    node.closed(),
    new Promise((r) => setTimeout(() => r("running"), 500)),
  ]);
  t.equal(stopped, "running", "no unhandled rejection stopped the node");
  t.same(await spoolEntries(spoolDir), ["exec-stuck.json"], "the entry stays for the next start");
});

t.test(
  "a spooled result larger than the broker accepts is reported as failed and does not hold up later ones",
  async (t) => {
    const identity = await fabric.identity("compute", "node-oversized");
    const dataDir = path.join(root, "oversized");
    // As a node before the byte budgets could spool it (1.5 MiB of output), oldest first.
    const spool = new ResultSpool(path.join(dataDir, "spool"));
    await fs.mkdir(path.join(dataDir, "spool"), { recursive: true, mode: 0o700 });
    const outcome = (executionId: string, stdout: string) => ({
      executionId,
      state: "Completed" as const,
      exitCode: 0,
      stdout,
      stderr: "",
      stdoutTruncated: false,
      stderrTruncated: false,
    });
    await spool.put("job-o", outcome("exec-o1", "\u00e9".repeat(768 * 1024)), []);
    await new Promise((r) => setTimeout(r, 10));
    await spool.put("job-o", outcome("exec-o2", "small\n"), []);
    orch.resultReply = () => ({ stored: true });
    const { until } = await startNode(identity, dataDir);
    const failed = await orch.next("result", (b) => b.executionId === "exec-o1", 10_000);
    t.match(
      failed.body,
      { state: "Failed", stdout: "", error: /max_payload/ },
      "the orchestrator learns the execution failed, and why",
    );
    const later = await orch.next("result", (b) => b.executionId === "exec-o2", 10_000);
    t.equal(later.body.stdout, "small\n", "the later result is delivered");
    // Both acknowledged, the failure in place of the first (sent side by side: in either order).
    const acknowledged = new Set<string>();
    await until((e) => {
      if (e.type === "result-acknowledged") acknowledged.add(e.executionId);
      return acknowledged.has("exec-o1") && acknowledged.has("exec-o2");
    });
    t.same(await spoolEntries(path.join(dataDir, "spool")), [], "both leave the spool");
  },
);

t.test("results are sent side by side, each without waiting for the answer to another", async (t) => {
  const identity = await fabric.identity("compute", "node-window");
  const dataDir = path.join(root, "window");
  const spool = new ResultSpool(path.join(dataDir, "spool"));
  await spool.init();
  const ids = ["exec-w1", "exec-w2", "exec-w3"];
  for (const executionId of ids) {
    await spool.put("job-w", { ...failedOutcome(executionId, "kept"), state: "Completed", exitCode: 0 }, []);
  }
  // Never answered: one result at a time, the node would send the first again and again.
  orch.resultReply = () => undefined;
  t.teardown(() => {
    orch.resultReply = () => ({ stored: true });
  });
  await startNode(identity, dataDir);
  for (const executionId of ids) {
    t.ok(await orch.next("result", (b) => b.executionId === executionId, 5000), `${executionId} sent`);
  }
});

t.test("at most two results with files are in flight; one without goes past those waiting", async (t) => {
  const identity = await fabric.identity("compute", "node-window-files");
  const dataDir = path.join(root, "window-files");
  const spool = new ResultSpool(path.join(dataDir, "spool"));
  await spool.init();
  const data = Buffer.from("result bytes\n");
  const digest = createHash("sha256").update(data).digest("hex");
  const file = {
    name: "outputs/out.txt",
    size: data.length,
    sha256: digest,
    chunks: [{ sha256: digest, data }],
  };
  const completed = (executionId: string) => ({
    ...failedOutcome(executionId, ""),
    state: "Completed" as const,
    exitCode: 0,
  });
  for (const executionId of ["exec-f1", "exec-f2", "exec-f3"])
    await spool.put("job-f", completed(executionId), [file]);
  await spool.put("job-f", completed("exec-plain"), []);
  orch.resultReply = () => undefined; // never answered: the first two are sent again and again
  t.teardown(() => {
    orch.resultReply = () => ({ stored: true });
  });
  await startNode(identity, dataDir);
  t.ok(
    await orch.next("result", (b) => b.executionId === "exec-plain", 5000),
    "the result without files is sent",
  );
  await new Promise((r) => setTimeout(r, 1000));
  const sent = new Set(
    orch.received
      .filter((e) => e.kind === "result")
      .map((e) => (e.body as { executionId: string }).executionId),
  );
  t.ok(sent.has("exec-f1") && sent.has("exec-f2"), "the two oldest with files are sent");
  t.notOk(sent.has("exec-f3"), "the third waits for one of them");
});

t.test("a second node on the same data directory is refused", async (t) => {
  const identity = await fabric.identity("compute", "node-lock");
  const dataDir = path.join(root, "lock");
  await startNode(identity, dataDir);
  const twin = new ComputeNode({ config: await computeConfig(fabric, identity, dataDir) });
  await t.rejects(twin.start(), { code: "SHOAL_COMPUTE_DATA_DIR_LOCKED" });
  t.match(await twin.closed(), { code: "SHOAL_COMPUTE_DATA_DIR_LOCKED" });
});

t.test("a REJECTED node stops with a clear error", async (t) => {
  const identity = await fabric.identity("compute", "node-rejected");
  orch.approval = "REJECTED";
  t.teardown(() => {
    orch.approval = "APPROVED";
  });
  const { node } = await startNode(identity, path.join(root, "rejected"));
  const error = await node.closed();
  t.match(error, { code: "SHOAL_COMPUTE_REJECTED", message: /node-rejected/ });
});

t.test(
  "a bid asked again for an execution whose result waits is answered as started, and not run again",
  async (t) => {
    const identity = await fabric.identity("compute", "node-asked-again");
    const dataDir = path.join(root, "asked-again");
    orch.resultReply = () => undefined; // the orchestrator that placed it stopped before it answered
    const { node, until } = await startNode(identity, dataDir);
    await orch.next("register", (b) => b.nodeId === "node-asked-again");
    const bid = {
      jobId: "job-a",
      executionId: "exec-a",
      spec: spec("once\n"),
      submitter,
      resources: { cpu: 0.1, memory: 16 * 2 ** 20 },
      run: { timeoutMs: 30_000 },
    };
    t.same((await orch.request("node-asked-again", "bid", bid)).body, { accept: true, started: true });
    await until((e) => e.type === "result-spooled" && e.executionId === "exec-a");

    // The orchestrator that took the job over asks for the same execution again.
    orch.resultReply = () => ({ stored: true });
    t.same((await orch.request("node-asked-again", "bid", bid)).body, { accept: true, started: true });
    t.notOk(node.running().includes("exec-a"), "the finished execution is not started again");
    await until((e) => e.type === "result-acknowledged" && e.executionId === "exec-a");
    t.same(await spoolEntries(path.join(dataDir, "spool")), [], "its one result is delivered");
  },
);
