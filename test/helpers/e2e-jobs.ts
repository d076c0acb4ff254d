import { execFile } from "node:child_process";
import { promises as fs, readFileSync } from "node:fs";
import type { IncomingHttpHeaders } from "node:http";
import https from "node:https";
import path from "node:path";
import { promisify } from "node:util";
import { loadJobSpecFile, procStat } from "../../core/index.js";
import type { JobView } from "../../orchestrator/index.js";
import { type OrchestratorHandle, waitUntil } from "./cluster.js";

/** Compiles WAT text into `dir/name.wasm` with wabt's wat2wasm (as scripts/build-wasm does); returns the path. */
export async function buildWasm(dir: string, name: string, wat: string): Promise<string> {
  const source = path.join(dir, `${name}.wat`);
  const out = path.join(dir, `${name}.wasm`);
  await fs.writeFile(source, wat);
  await promisify(execFile)("wat2wasm", [source, "-o", out]);
  return out;
}

/** Spins for ever: only a kill stops it. */
export const SPIN_WAT = `(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))`;

/** Sleeps `ms` (WASI poll_oneoff on the monotonic clock), then prints "slept". */
export function sleepWat(ms: number): string {
  return `(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "slept\\n")
  (func (export "_start")
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const ${ms * 1_000_000}))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
    (i32.store (i32.const 100) (i32.const 200))
    (i32.store (i32.const 104) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 100) (i32.const 1) (i32.const 140)))))`;
}

/**
 * Writes a one-task job spec to `dir/name.yaml`; `task` is YAML flow text added to the task,
 * `job` to the job (e.g. its Constraints).
 */
export async function writeSpec(
  dir: string,
  name: string,
  engine: string,
  task = "",
  job = "",
): Promise<string> {
  const file = path.join(dir, `${name}.yaml`);
  await fs.writeFile(
    file,
    `Name: ${name}\n${job ? `${job}\n` : ""}Tasks:\n  - Name: main\n    Engine: ${engine}\n${task ? `    ${task}\n` : ""}`,
  );
  return file;
}

/** Writes `dir/nowhere.yaml`: a hello job whose constraint (`pool=nowhere`) no node matches, so it stays Queued. */
export function writeNowhereSpec(dir: string): Promise<string> {
  return writeSpec(
    dir,
    "nowhere",
    wasmEngine(path.resolve("dist/wasm/hello.wasm")),
    "",
    `Constraints: [{Key: pool, Operator: "=", Values: [nowhere]}]`,
  );
}

/** `shoal compute serve` settings of a node with one CPU, labelled `pool=small`. */
export const SMALL_NODE = ["-c", "Compute.Resources.CPU=1", "-c", "Compute.Labels=pool=small"];

/** A job that sleeps `ms` and needs one whole CPU of a `pool=small` node ({@link SMALL_NODE}). */
export async function writeSmallSpec(dir: string, name: string, ms: number): Promise<string> {
  const module = await buildWasm(dir, name, sleepWat(ms));
  return writeSpec(
    dir,
    name,
    wasmEngine(module),
    "Resources: {CPU: 1}",
    `Constraints: [{Key: pool, Operator: "=", Values: [small]}]`,
  );
}

/** The `Engine:` value of a wasm task running a module file. */
export function wasmEngine(module: string): string {
  return `{Type: wasm, Params: {EntryModule: {Type: localFile, Params: {SourcePath: ${module}}}}}`;
}

/**
 * Submits a spec file as `shoal job run SPEC` does (module read and sent
 * inline), from this process: e2e-jobs proves the CLI's own submission, and
 * each CLI process costs seconds on a loaded machine. Returns the job id.
 */
export async function submitJob(orch: OrchestratorHandle, specFile: string): Promise<string> {
  const spec = await loadJobSpecFile(specFile);
  return (await orch.client.put<{ JobID: string }>("/api/v1/orchestrator/jobs", { Job: spec })).JobID;
}

/** The job as the API shows it now. */
export async function getJob(orch: OrchestratorHandle, id: string): Promise<JobView> {
  return (await orch.client.get<{ Job: JobView }>(`/api/v1/orchestrator/jobs/${id}`)).Job;
}

/** Waits until the job satisfies `done`, and returns it. */
export function waitForJob(
  orch: OrchestratorHandle,
  id: string,
  what: string,
  done: (job: JobView) => boolean,
  timeoutMs = 30_000,
): Promise<JobView> {
  return waitUntil(
    `job ${id} ${what}`,
    async () => {
      const job = await getJob(orch, id);
      return done(job) ? job : undefined;
    },
    timeoutMs,
  );
}

/** Waits until one of the job's executions is Running (reported by its node), and returns it. */
export async function waitForRunning(orch: OrchestratorHandle, id: string) {
  const job = await waitForJob(orch, id, "has a Running execution", (j) =>
    j.Executions.some((e) => e.State === "Running"),
  );
  return job.Executions.find((e) => e.State === "Running")!;
}

/** CPU ticks (user + system) each thread of process `pid` has used. */
async function threadTicks(pid: number): Promise<Map<string, number>> {
  const ticks = new Map<string, number>();
  for (const tid of await fs.readdir(`/proc/${pid}/task`)) {
    const fields = (await procStat(`/proc/${pid}/task/${tid}/stat`)) ?? [];
    if (fields.length > 12) ticks.set(tid, Number(fields[11]) + Number(fields[12]));
  }
  return ticks;
}

/**
 * The thread of process `pid`, other than its main thread, that burns the
 * most CPU: on an otherwise idle compute node, the worker running a spinning
 * WebAssembly module (the engine keeps warm workers, so it is not a new
 * thread). Samples 1.5 s at a time for up to `tries` times (a node reports
 * Running before the module starts, and a loaded machine is slow to start
 * it); undefined if no thread used CPU.
 */
export async function spinningThread(pid: number, tries = 10): Promise<string | undefined> {
  for (let i = 0; i < tries; i++) {
    const before = await threadTicks(pid);
    await new Promise((r) => setTimeout(r, 1500));
    const after = await threadTicks(pid);
    let best: [string, number] | undefined;
    for (const [tid, ticks] of after) {
      const used = ticks - (before.get(tid) ?? ticks);
      if (tid !== String(pid) && used > 0 && (!best || used > best[1])) best = [tid, used];
    }
    if (best) return best[0];
  }
  return undefined;
}

/** Whether thread `tid` of process `pid` still exists. */
export async function threadAlive(pid: number, tid: string): Promise<boolean> {
  return fs.access(`/proc/${pid}/task/${tid}`).then(
    () => true,
    () => false,
  );
}

/**
 * `GET /api/v1/agent/metrics` with `token` if given: the status, headers and
 * Prometheus text, and `value(series)`, one series' value (`name{labels}`
 * exactly as exposed), undefined when it is not there.
 */
export function scrapeMetrics(
  orch: OrchestratorHandle,
  token?: string,
): Promise<{
  status: number;
  headers: IncomingHttpHeaders;
  text: string;
  value: (series: string) => number | undefined;
}> {
  return new Promise((resolve, reject) => {
    const req = https.get(
      `https://127.0.0.1:${orch.apiPort}/api/v1/agent/metrics`,
      { ca: readFileSync(orch.ca), headers: token ? { authorization: `Bearer ${token}` } : {} },
      (res) => {
        let text = "";
        res.on("data", (d: Buffer) => {
          text += d.toString();
        });
        res.on("end", () =>
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            text,
            value: (series) => {
              const line = text.split("\n").find((l) => l.startsWith(`${series} `));
              return line === undefined ? undefined : Number(line.slice(series.length + 1));
            },
          }),
        );
      },
    );
    req.on("error", reject);
  });
}
