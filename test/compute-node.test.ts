import "reflect-metadata";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { pino } from "pino";
import t from "tap";
import { ComputeNode, type ComputeNodeEvent } from "../compute/index.js";
import { EnvelopeSigner, type MessageBody, subjects } from "../fabric/index.js";
import { computeConfig, OrchestratorStandIn, workDirsInUse } from "./helpers/compute-standin.js";
import { startTestFabric, type TestIdentity } from "./helpers/nats.js";
import { spoolEntries } from "./helpers/records.js";

const repo = path.resolve(import.meta.dirname, "..");
const root = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-compute-node-"));
t.teardown(() => fs.rm(root, { recursive: true, force: true }));

async function wat(name: string, source?: string): Promise<Buffer> {
  const file =
    source === undefined ? path.join(repo, "configs/jobs", `${name}.wat`) : path.join(root, `${name}.wat`);
  if (source !== undefined) await fs.writeFile(file, source);
  const out = path.join(root, `${name}.wasm`);
  await promisify(execFile)("wat2wasm", [file, "-o", out]);
  return fs.readFile(out);
}

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

/** Prints "started" then spins until killed. */
const STARTED_THEN_LOOP = `(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "started\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 32))
    (i32.store (i32.const 4) (i32.const 8))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (loop $l (br $l))))`;

const hello = await wat("hello");
const upper = await wat("upper");
const loop = await wat("loop", STARTED_THEN_LOOP);

function wasmSpec(module: Buffer, task: Record<string, unknown> = {}, job: Record<string, unknown> = {}) {
  return {
    Name: "t",
    ...job,
    Tasks: [
      {
        Name: "main",
        Engine: {
          Type: "wasm",
          Params: { EntryModule: { Type: "inline", Params: { Content: module.toString("base64") } } },
        },
        Resources: { CPU: "100m", Memory: "16Mi" },
        ...task,
      },
    ],
  };
}

const submitter = { sub: "alice", namespace: "default", method: "password" };
const small = { cpu: 0.1, memory: 16 * 2 ** 20 };
let seq = 0;
const ids = () => {
  seq++;
  return { jobId: `job-${seq}`, executionId: `exec-${seq}` };
};

const fabric = await startTestFabric(t);
const orchestratorId = await fabric.identity("orchestrator", "orch-1");
const orch = await OrchestratorStandIn.start(t, fabric, orchestratorId);

async function startNode(
  identity: TestIdentity,
  dataDir: string,
  overrides: string[] = [],
): Promise<{
  node: ComputeNode;
  events: ComputeNodeEvent[];
  until: (p: (e: ComputeNodeEvent) => boolean) => Promise<ComputeNodeEvent>;
}> {
  const node = new ComputeNode({
    config: await computeConfig(fabric, identity, dataDir, overrides),
    requestTimeoutMs: 1000,
    retryBaseMs: 100,
    shutdownGraceMs: 200,
    deliveryFlushMs: 500,
  });
  t.teardown(() => node.close());
  const events: ComputeNodeEvent[] = [];
  const waiters = new Set<() => void>();
  void (async () => {
    for await (const e of node.events()) {
      events.push(e);
      for (const w of [...waiters]) w();
    }
  })();
  let seen = 0;
  /** The next event (after the last one returned) that matches. */
  const until = async (p: (e: ComputeNodeEvent) => boolean) => {
    for (;;) {
      const i = events.findIndex((e, n) => n >= seen && p(e));
      if (i >= 0) {
        seen = i + 1;
        return events[i]!;
      }
      await new Promise<void>((resolve) => {
        const done = () => {
          waiters.delete(done);
          resolve();
        };
        waiters.add(done);
      });
    }
  };
  await node.start();
  return { node, events, until };
}

t.test("a node that allows host inputs warns when the kernel lets users hard-link any file", async (t) => {
  const identity = await fabric.identity("compute", "node-links");
  const sysctl = path.join(root, "protected_hardlinks");
  const allowed = path.join(root, "links-allowed");
  await fs.mkdir(allowed);
  const warnings = async (protectedValue: string | undefined, overrides: string[]) => {
    if (protectedValue === undefined) await fs.rm(sysctl, { force: true });
    else await fs.writeFile(sysctl, `${protectedValue}\n`);
    const lines: { msg: string; sysctl?: string }[] = [];
    const node = new ComputeNode({
      config: await computeConfig(fabric, identity, path.join(root, "links"), overrides),
      logger: pino({ level: "warn" }, { write: (line: string) => lines.push(JSON.parse(line)) }),
      protectedHardlinksFile: sysctl,
    });
    await node.start();
    await node.close();
    return lines.filter((l) => l.sysctl === "fs.protected_hardlinks=0").map((l) => l.msg);
  };
  const inputs = [`Compute.Inputs.AllowedPaths=${allowed}`];
  t.match(await warnings("0", inputs), [
    /hard-link into it files they do not own.*set fs.protected_hardlinks=1/,
  ]);
  t.same(await warnings("1", inputs), [], "protected: no warning");
  t.same(await warnings(undefined, inputs), [], "unknown (not Linux): no warning");
  t.same(await warnings("0", []), [], "no host inputs allowed: nothing to warn about");
});

t.test("registers with the id of its certificate, then heartbeats", async (t) => {
  const identity = await fabric.identity("compute", "node-reg");
  const { node, until } = await startNode(identity, path.join(root, "reg"), ["Compute.Labels=region=eu"]);
  t.equal(node.id, "node-reg");
  const reg = await orch.next("register", (b) => b.nodeId === "node-reg");
  t.equal(reg.iss, "spiffe://test.local/compute/node-reg", "signed by its own identity");
  t.same(reg.body.engines, ["wasm"], "exec is off without an allow list");
  t.same(reg.body.labels, { region: "eu" });
  t.same(reg.body.executions, []);
  t.ok(reg.body.capacity.cpu > 0 && reg.body.capacity.memory > 0);
  const registered = await until((e) => e.type === "registered");
  t.same(registered, { type: "registered", approval: "APPROVED", orchestrator: orchestratorId.spiffeId });
  const first = await orch.next("heartbeat", (b) => b.nodeId === "node-reg");
  const second = await orch.next("heartbeat", (b) => b.nodeId === "node-reg");
  t.ok(second.body.seq > first.body.seq, "heartbeat sequence grows");
  t.same(first.body.running, []);
  await node.close();
  t.equal(await node.closed(), undefined, "a clean stop has no error");
  await t.rejects(fs.stat(path.join(root, "reg", "compute.lock")), { code: "ENOENT" }, "lock released");
});

t.test(
  "labels of the config and the join token that together break the label rules stop the start",
  async (t) => {
    const identity = await fabric.identity("compute", "node-labels");
    const dataDir = path.join(root, "labels");
    const many = (prefix: string) => Array.from({ length: 40 }, (_, i) => [`${prefix}${i}`, "v"]);
    await fs.mkdir(path.join(dataDir, "tls"), { recursive: true });
    await fs.writeFile(
      path.join(dataDir, "tls", "enrollment.json"),
      JSON.stringify({ Labels: Object.fromEntries(many("t")) }),
    );
    const config = many("c")
      .map(([k, v]) => `${k}=${v}`)
      .join(",");
    await t.rejects(startNode(identity, dataDir, [`Compute.Labels=${config}`]), {
      code: "SHOAL_CONFIG_INVALID",
      message: /Compute\.Labels with the join token's labels: 80 labels, more than 64/,
    });
    await t.rejects(fs.stat(path.join(dataDir, "compute.lock")), { code: "ENOENT" }, "lock released");
  },
);

t.test("bids: the job-selection policy refuses with reasons, accepts what fits", async (t) => {
  const identity = await fabric.identity("compute", "node-bid");
  await startNode(identity, path.join(root, "bid"), ["Compute.Labels=region=eu", "Compute.Resources.CPU=1"]);
  await orch.next("register", (b) => b.nodeId === "node-bid");
  const bid = async (spec: unknown, resources = small) =>
    (await orch.request("node-bid", "bid", { ...ids(), spec, submitter, resources }))
      .body as MessageBody<"bid-reply">;

  const exec = {
    Name: "e",
    Tasks: [{ Name: "main", Engine: { Type: "exec", Params: { Command: "/bin/echo" } } }],
  };
  const refusedExec = await bid(exec);
  t.equal(refusedExec.accept, false);
  t.match(refusedExec.reason, /Exec\.Allow/);
  t.equal(refusedExec.busy, undefined, "a policy refusal is not a busy one");

  const elsewhere = await bid(
    wasmSpec(hello, {}, { Constraints: [{ Key: "region", Operator: "=", Values: ["us"] }] }),
  );
  t.equal(elsewhere.accept, false);
  t.match(elsewhere.reason, /region = us/);

  const tooBig = await bid(wasmSpec(hello), { cpu: 2, memory: 1 });
  t.equal(tooBig.accept, false);
  t.match(tooBig.reason, /free capacity/);

  const garbage = await bid({ Name: "x" });
  t.equal(garbage.accept, false);
  t.match(garbage.reason, /invalid job spec/);

  t.same(await bid(wasmSpec(hello), { cpu: 0.6, memory: 1 }), { accept: true });
  const second = await bid(wasmSpec(hello), { cpu: 0.6, memory: 1 });
  t.equal(second.accept, false, "the first accepted bid holds its capacity");
  t.equal(second.busy, true, "refused for want of free capacity only: asking again later may succeed");

  // A bid that carries the run starts the execution once it is accepted, and only then.
  const run = { timeoutMs: 30_000 };
  const refusedRun = (
    await orch.request("node-bid", "bid", {
      ...ids(),
      spec: wasmSpec(hello),
      submitter,
      resources: { cpu: 0.6, memory: 1 },
      run,
    })
  ).body as MessageBody<"bid-reply">;
  t.equal(refusedRun.accept, false, "the policy still applies to a bid that carries the run");
  t.equal(refusedRun.started, undefined);
  const started = ids();
  t.same(
    (
      await orch.request("node-bid", "bid", {
        ...started,
        spec: wasmSpec(hello),
        submitter,
        resources: small,
        run,
      })
    ).body,
    { accept: true, started: true },
  );
  const result = await orch.next("result", (b) => b.executionId === started.executionId);
  t.equal(result.body.state, "Completed", "it ran without a separate run message");
});

t.test(
  "a wasm job runs: status, logs, and results with valid digests, then the spool is emptied",
  async (t) => {
    const identity = await fabric.identity("compute", "node-run");
    const dataDir = path.join(root, "run");
    const { node, until } = await startNode(identity, dataDir);
    await orch.next("register", (b) => b.nodeId === "node-run");

    const a = ids();
    const helloSpec = wasmSpec(hello, {
      Engine: {
        Type: "wasm",
        Params: {
          EntryModule: { Type: "inline", Params: { Content: hello.toString("base64") } },
          Parameters: ["from", "shoal"],
        },
      },
    });
    t.same(
      (await orch.request("node-run", "bid", { ...a, spec: helloSpec, submitter, resources: small })).body,
      { accept: true },
    );
    t.same(
      (await orch.request("node-run", "run", { ...a, spec: helloSpec, submitter, timeoutMs: 30_000 })).body,
      {
        accepted: true,
      },
    );
    const running = await orch.next("status", (b) => b.executionId === a.executionId);
    t.equal(running.body.state, "Running");
    const helloResult = await orch.next("result", (b) => b.executionId === a.executionId);
    t.equal(helloResult.body.state, "Completed");
    t.equal(helloResult.body.exitCode, 0);
    t.equal(helloResult.body.stdout, "hello from wasm\nfrom\nshoal\n");
    // Its short output was not streamed yet when it ended: it rides in the result.
    t.same(
      helloResult.body.logs?.map((l) => [l.stream, l.seq, Buffer.from(l.data, "base64").toString()]),
      [["stdout", 0, "hello from wasm\nfrom\nshoal\n"]],
    );

    const b = ids();
    const upperSpec = wasmSpec(upper, {
      InputSources: [
        { Target: "/inputs/in.txt", Source: { Type: "inline", Params: { Content: "signed results\n" } } },
      ],
      ResultPaths: [{ Name: "outputs", Path: "/outputs" }],
    });
    t.same(
      (await orch.request("node-run", "run", { ...b, spec: upperSpec, submitter, timeoutMs: 30_000 })).body,
      {
        accepted: true,
      },
      "a run without a bid is checked against the policy and accepted",
    );
    const result = await orch.next("result", (r) => r.executionId === b.executionId);
    t.equal(result.body.state, "Completed");
    t.equal(result.body.files.length, 1);
    const file = result.body.files[0]!;
    t.equal(file.name, "outputs/out.txt");
    const chunks = orch.received.filter(
      (e) =>
        e.kind === "result-chunk" && (e.body as MessageBody<"result-chunk">).executionId === b.executionId,
    );
    t.equal(chunks.length, file.chunks.length, "one result-chunk per manifest digest");
    const data = chunks.map((c) => {
      const body = c.body as MessageBody<"result-chunk">;
      const bytes = Buffer.from(body.data, "base64");
      t.equal(sha256(bytes), body.sha256, "chunk digest matches its bytes");
      t.equal(body.sha256, file.chunks[body.index], "and the manifest");
      return bytes;
    });
    const whole = Buffer.concat(data);
    t.equal(whole.toString(), "SIGNED RESULTS\n");
    t.equal(sha256(whole), file.sha256);
    t.equal(file.size, whole.length);

    await until((e) => e.type === "result-acknowledged" && e.executionId === b.executionId);
    t.same(await spoolEntries(path.join(dataDir, "spool")), [], "acknowledged results leave the spool");
    // Removed right after the result is spooled, off the result's path.
    let left = await workDirsInUse(path.join(dataDir, "executions"));
    for (let i = 0; i < 100 && left.length > 0; i++) {
      await new Promise((r) => setTimeout(r, 20));
      left = await workDirsInUse(path.join(dataDir, "executions"));
    }
    t.same(left, [], "work directories are removed");
    t.same(node.running(), []);
  },
);

t.test("a cancel stops a running job and nothing is reported as its result", async (t) => {
  const identity = await fabric.identity("compute", "node-cancel");
  const { node, until } = await startNode(identity, path.join(root, "cancel"));
  await orch.next("register", (b) => b.nodeId === "node-cancel");
  const a = ids();
  await orch.request("node-cancel", "run", { ...a, spec: wasmSpec(loop), submitter, timeoutMs: 60_000 });
  const started = await orch.next("logs", (b) => b.executionId === a.executionId);
  t.equal(Buffer.from(started.body.data, "base64").toString(), "started\n");
  t.same(node.running(), [a.executionId]);
  orch.publish("node-cancel", "cancel", { executionId: a.executionId, reason: "job stopped" });
  const status = await orch.next("status", (b) => b.executionId === a.executionId && b.state === "Cancelled");
  t.equal(status.body.error, "job stopped");
  await until((e) => e.type === "cancelled" && e.executionId === a.executionId);
  t.same(node.running(), []);
  t.same(node.pendingResults(), []);
  t.notOk(
    orch.received.some(
      (e) => e.kind === "result" && (e.body as MessageBody<"result">).executionId === a.executionId,
    ),
    "no result for a cancelled execution",
  );
});

t.test("envelopes not from an orchestrator, not for this node, or replayed are ignored", async (t) => {
  const identity = await fabric.identity("compute", "node-trust");
  const other = await fabric.identity("compute", "node-other");
  const { until, events } = await startNode(identity, path.join(root, "trust"));
  await orch.next("register", (b) => b.nodeId === "node-trust");
  const inbound = subjects.computeIn("node-trust");
  const body = { ...ids(), spec: wasmSpec(hello), submitter, resources: small };

  // A compute identity's signature relayed onto the node's subject (as a compromised broker could).
  const [certPem, keyPem] = await Promise.all([
    fs.readFile(other.certFile, "utf8"),
    fs.readFile(other.keyFile, "utf8"),
  ]);
  const forger = new EnvelopeSigner({ certPem, keyPem });
  orch.fabric.publish(inbound, forger.sign("bid", identity.spiffeId, body));
  const forged = await until((e) => e.type === "message-refused");
  t.match(forged, { code: "SHOAL_ENVELOPE_UNKNOWN_SENDER" });

  // Signed by the orchestrator but addressed to another node.
  orch.fabric.publish(inbound, orch.signer.sign("bid", other.spiffeId, body));
  t.match(await until((e) => e.type === "message-refused"), { code: "SHOAL_ENVELOPE_AUDIENCE" });

  // A genuine envelope delivered twice.
  const token = orch.signer.sign("cancel", identity.spiffeId, { executionId: "exec-none", reason: "x" });
  orch.fabric.publish(inbound, token);
  orch.fabric.publish(inbound, token);
  t.match(await until((e) => e.type === "message-refused"), { code: "SHOAL_ENVELOPE_REPLAY" });

  t.notOk(
    events.some((e) => e.type === "bid"),
    "no refused envelope reached the bid handler",
  );
});
