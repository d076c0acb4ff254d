import "reflect-metadata";
import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import t, { type Test } from "tap";
import type { JobSpec, WasmParams } from "../core/index.js";
import { runShoal, startComputeNode, startOrchestrator, tempDir } from "./helpers/cluster.js";
import { getJob, scrapeMetrics } from "./helpers/e2e-jobs.js";

/** `module` with a custom section (named "pad") of `bytes` zeros appended: still valid, and as large as wanted. */
function withCustomSection(module: Buffer, bytes: number): Buffer {
  const leb = (n: number) => {
    const out: number[] = [];
    for (let v = n; ; v = Math.floor(v / 128)) {
      if (v < 128) return Buffer.from([...out, v]);
      out.push((v % 128) | 0x80);
    }
  };
  const payload = Buffer.concat([leb(3), Buffer.from("pad"), Buffer.alloc(bytes)]);
  return Buffer.concat([module, Buffer.from([0]), leb(payload.length), payload]);
}

/**
 * End to end with real processes: `shoal orchestrator serve`, compute nodes
 * from `shoal compute serve`, and the CLI. Requires dist/wasm (scripts/build-wasm).
 */
t.test("orchestrator and compute nodes run batch, ops and queued jobs", async (t) => {
  const dir = await tempDir(t);
  // Subtests run one job at a time; the queued job's subtest reaches this limit on purpose.
  const orch = await startOrchestrator(t, path.join(dir, "orch"), [
    "-c",
    "Orchestrator.Scheduler.MaxUnfinishedJobsPerSubmitter=2",
  ]);
  const { api } = orch;
  const startNode = (id: string, labels: string) =>
    startComputeNode(t, orch, path.join(dir, id), id, ["-c", `Compute.Labels=${labels}`]);
  await Promise.all([startNode("n1", "env=edge,zone=a"), startNode("n2", "env=edge,zone=b")]);

  /** `shoal job run --wasm MODULE --wait --output json -- ARG`, which must complete; returns the job. */
  const runWasm = async (t: Test, module: string, arg: string) => {
    const r = await runShoal(t, [
      "job",
      "run",
      "--wasm",
      module,
      "--wait",
      "--output",
      "json",
      ...api,
      "--",
      arg,
    ]);
    t.equal(r.code, 0, r.stderr);
    const job = JSON.parse(r.stdout);
    t.equal(
      job.State,
      "Completed",
      JSON.stringify({ message: job.StateMessage, executions: job.Executions }),
    );
    t.match(job.Executions[0].Stdout, new RegExp(`hello from wasm[\\s\\S]*${arg}`));
    return job;
  };

  t.test("a batch WASM job completes with its stdout", async (t) => {
    const job = await runWasm(t, "dist/wasm/hello.wasm", "e2e");
    t.equal(job.Executions.length, 1);
    t.equal(job.Executions[0].ExitCode, 0);
  });

  t.test("a module larger than one fabric message runs; the job names it by digest", async (t) => {
    // hello.wasm with a 2 MiB custom section: a valid module, twice what one NATS message carries.
    const module = withCustomSection(await fs.readFile("dist/wasm/hello.wasm"), 2 * 1024 * 1024);
    const file = path.join(dir, "big.wasm");
    await fs.writeFile(file, module);
    const job = await runWasm(t, file, "big");
    const digest = createHash("sha256").update(module).digest("hex");
    const stored = (await getJob(orch, job.ID)).Spec as JobSpec;
    t.same((stored.Tasks[0]!.Engine.Params as WasmParams).EntryModule, {
      Type: "stored",
      Params: { Digest: `sha256:${digest}` },
    });
    const kept = path.join(dir, job.Executions[0].NodeID, "modules", `${digest}.wasm`);
    t.ok((await fs.readFile(kept)).equals(module), "the node that ran it keeps what it fetched");
    t.ok((await fs.readFile(path.join(dir, "orch", "modules", `${digest}.wasm`))).equals(module));
  });

  t.test("result files come back verified and `job get` checks their digests", async (t) => {
    const r = await runShoal(t, [
      "job",
      "run",
      "configs/jobs/upper.yaml",
      "--wait",
      "--output",
      "json",
      ...api,
    ]);
    t.equal(r.code, 0, r.stderr);
    const job = JSON.parse(r.stdout);
    const out = path.join(dir, "results");
    const got = await runShoal(t, ["job", "get", job.ID, "--out", out, ...api]);
    t.equal(got.code, 0, got.stderr);
    const [line] = got.stdout.trim().split("\n");
    const file = line!.split(/\s+/)[0]!;
    t.match(await fs.readFile(file, "utf8"), /SHOAL RUNS WEBASSEMBLY ON THE EDGE/);
  });

  t.test("an ops job runs once on every matching node", async (t) => {
    const r = await runShoal(t, [
      "job",
      "run",
      "configs/jobs/ops-hello.yaml",
      "--wait",
      "--output",
      "json",
      ...api,
    ]);
    t.equal(r.code, 0, r.stderr);
    const job = JSON.parse(r.stdout);
    t.equal(job.State, "Completed");
    t.same(job.Executions.map((e: { NodeID: string }) => e.NodeID).sort(), ["n1", "n2"]);
  });

  t.test("a job no node matches queues, then runs when such a node joins", async (t) => {
    const spec = path.join(dir, "zone-c.yaml");
    const module = path.resolve("dist/wasm/hello.wasm");
    await fs.writeFile(
      spec,
      `Name: zone-c\nLabels: {team: lab, release: "1.10"}\nConstraints:\n  - {Key: zone, Operator: "=", Values: [c]}\nTasks:\n  - Name: main\n    Engine: {Type: wasm, Params: {EntryModule: {Type: localFile, Params: {SourcePath: ${module}}}}}\n`,
    );
    const submitted = await runShoal(t, ["job", "run", spec, ...api]);
    t.equal(submitted.code, 0, submitted.stderr);
    const id = submitted.stdout.trim();
    t.equal((await getJob(orch, id)).State, "Queued");
    // A second queued job is the submitter's limit of unfinished jobs: a third is refused.
    const unlabelled = path.join(dir, "zone-c-unlabelled.yaml");
    await fs.writeFile(unlabelled, (await fs.readFile(spec, "utf8")).replace(/^Labels: .*\n/m, ""));
    const second = await runShoal(t, ["job", "run", unlabelled, ...api]);
    t.equal(second.code, 0, second.stderr);
    const refused = await runShoal(t, ["job", "run", unlabelled, ...api]);
    t.not(refused.code, 0, "a job past the submitter's limit is refused");
    t.match(refused.stderr, /SHOAL_ORCH_JOB_LIMIT[\s\S]*MaxUnfinishedJobsPerSubmitter/);
    const stopped = await runShoal(t, ["job", "stop", second.stdout.trim(), ...api]);
    t.equal(stopped.code, 0, stopped.stderr);
    await startNode("n3", "env=lab,zone=c");
    // `logs --follow` ends when the job reaches a final state (fed by the store's changes).
    const logs = await runShoal(t, ["job", "logs", id, "--follow", ...api]);
    t.equal(logs.code, 0, logs.stderr);
    // The short output came in the result (no logs message): streamed before the end.
    t.match(logs.stdout, /hello from wasm\n/);
    const final = JSON.parse((await runShoal(t, ["job", "describe", id, "--output", "json", ...api])).stdout);
    t.equal(final.State, "Completed");
    t.equal(final.Executions[0].NodeID, "n3");
    // The CLI lists jobs by label (the release's 1.10 as written, not 1.1).
    const listed = async (...labels: string[]) => {
      const r = await runShoal(t, [
        "job",
        "list",
        ...labels.flatMap((l) => ["--label", l]),
        "--output",
        "json",
        ...api,
      ]);
      t.equal(r.code, 0, r.stderr);
      return (JSON.parse(r.stdout) as { ID: string }[]).map((j) => j.ID);
    };
    t.same(await listed("team=lab", "release=1.10"), [id], "only the job with both labels");
    t.same(await listed("team=lab", "release=1.1"), [], "a label must match exactly");
  });

  t.test("bad input is refused with the field named", async (t) => {
    const spec = path.join(dir, "bad.yaml");
    await fs.writeFile(spec, "Name: bad\nTasks:\n  - Name: main\n    Engine: {Type: docker, Params: {}}\n");
    const r = await runShoal(t, ["job", "run", spec, ...api]);
    t.not(r.code, 0);
    t.match(r.stderr, /SHOAL_JOB_INVALID[\s\S]*Tasks\[0\]\.Engine\.Type/);
  });

  t.test("Prometheus metrics count what happened, for the operator and not for anyone", async (t) => {
    const metrics = (token?: string) => scrapeMetrics(orch, token);
    const anonymous = await metrics();
    t.equal(anonymous.status, 403);
    t.match(JSON.parse(anonymous.text), { error: { code: "SHOAL_AUTH_DENIED" } });

    const { Items } = await orch.client.get<{ Items: { State: string }[] }>("/api/v1/orchestrator/jobs");
    const completed = Items.filter((j) => j.State === "Completed").length;
    t.ok(completed >= 5, `${completed} jobs completed above`);
    const m = await metrics(await orch.adminToken());
    t.equal(m.status, 200);
    t.match(m.headers["content-type"], /^text\/plain; version=0\.0\.4/);
    t.equal(m.value('shoal_jobs{state="Completed"}'), completed);
    t.equal(m.value('shoal_jobs_finished_total{state="Completed"}'), completed);
    t.equal(m.value('shoal_nodes{approval="APPROVED",health="HEALTHY"}'), 3);
    t.ok(
      m.value('shoal_api_requests_total{method="PUT",route="/api/v1/orchestrator/jobs",status="201"}')! >=
        completed,
    );
    t.ok(
      m.value('shoal_api_requests_total{method="PUT",route="/api/v1/orchestrator/jobs",status="400"}')! >= 1,
    );
    t.equal(
      m.value('shoal_api_requests_total{method="GET",route="/api/v1/agent/metrics",status="403"}'),
      1,
      "the refused scrape is counted too",
    );
    t.ok(m.value("process_cpu_seconds_total")! > 0, "with the process's own metrics");
  });
});
