import "reflect-metadata";
import { execFile } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import t from "tap";
import {
  capModuleMemory,
  collectResults,
  type EngineRunRequest,
  prepareInputs,
  WasmExecutor,
} from "../compute/engines/index.js";
import { parseJobSpec, type Task } from "../core/index.js";

const repo = path.resolve(import.meta.dirname, "..");
const MiB = 1024 * 1024;

const root = await mkdtemp(path.join(os.tmpdir(), "shoal-wasm-"));
t.teardown(() => rm(root, { recursive: true, force: true }));

/** Compiles WAT text (or a .wat file) with wabt's wat2wasm, as scripts/build-wasm does. */
async function wat(source: string): Promise<Buffer> {
  const file = source.endsWith(".wat")
    ? source
    : path.join(root, `m${Math.random().toString(36).slice(2)}.wat`);
  if (file !== source) await writeFile(file, source);
  const out = `${file}.${process.pid}.wasm`;
  await promisify(execFile)("wat2wasm", [file, "-o", out]);
  return readFile(out);
}

const FD_WRITE = `(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))`;
const PROC_EXIT = `(import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))`;

function task(
  module: Buffer,
  params: Record<string, unknown> = {},
  extra: Record<string, unknown> = {},
): Task {
  return parseJobSpec({
    Name: "t",
    Tasks: [
      {
        Name: "main",
        Engine: {
          Type: "wasm",
          Params: {
            EntryModule: { Type: "inline", Params: { Content: module.toString("base64") } },
            ...params,
          },
        },
        ...extra,
      },
    ],
  }).Tasks[0]!;
}

let n = 0;
async function request(tk: Task, over: Partial<EngineRunRequest> = {}): Promise<EngineRunRequest> {
  const workDir = path.join(root, `exec-${n++}`);
  await mkdir(path.join(workDir, "inputs"), { recursive: true });
  await mkdir(path.join(workDir, "outputs"), { recursive: true });
  return {
    executionId: `e${n}`,
    task: tk,
    workDir,
    inputsDir: path.join(workDir, "inputs"),
    outputsDir: path.join(workDir, "outputs"),
    timeoutMs: 20_000,
    limits: { maxMemoryBytes: 16 * MiB, maxStdoutBytes: MiB, maxStderrBytes: MiB },
    ...over,
  };
}

const wasm = new WasmExecutor();
t.teardown(() => wasm.close());
const never = new AbortController().signal;

t.test("hello prints its greeting and arguments, streaming them to onLog", async (t) => {
  const hello = await wat(path.join(repo, "configs/jobs/hello.wat"));
  const logs: string[] = [];
  const req = await request(task(hello, { Parameters: ["from", "shoal tests"] }), {
    onLog: (stream, chunk) => logs.push(`${stream}:${chunk}`),
  });
  const res = await wasm.run(req, never);
  t.equal(res.error, undefined);
  t.equal(res.exitCode, 0);
  t.equal(res.stdout.toString(), "hello from wasm\nfrom\nshoal tests\n");
  t.equal(res.stdoutTruncated, false);
  t.equal(logs.join("").replaceAll("stdout:", ""), "hello from wasm\nfrom\nshoal tests\n");
});

const PRINTENV = `(module ${FD_WRITE}
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $i i32) (local $p i32) (local $len i32)
    (drop (call $sizes (i32.const 0) (i32.const 4)))
    (drop (call $get (i32.const 1024) (i32.const 8192)))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (i32.load (i32.const 0))))
      (local.set $p (i32.load (i32.add (i32.const 1024) (i32.shl (local.get $i) (i32.const 2)))))
      (local.set $len (i32.const 0))
      (block $end (loop $scan
        (br_if $end (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $len)))))
        (local.set $len (i32.add (local.get $len) (i32.const 1)))
        (br $scan)))
      ;; NUL becomes a newline
      (i32.store8 (i32.add (local.get $p) (local.get $len)) (i32.const 10))
      (i32.store (i32.const 16) (local.get $p))
      (i32.store (i32.const 20) (i32.add (local.get $len) (i32.const 1)))
      (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))))`;

t.test("the environment is the task's Env plus EnvironmentVariables, nothing of the host's", async (t) => {
  const res = await wasm.run(
    await request(
      task(
        await wat(PRINTENV),
        { EnvironmentVariables: { B: "2", A: "override" } },
        { Env: { A: "1", C: "3" } },
      ),
    ),
    never,
  );
  t.equal(res.exitCode, 0);
  t.same(res.stdout.toString().trim().split("\n").sort(), ["A=override", "B=2", "C=3"]);
});

const EXIT = `(module ${PROC_EXIT} (memory (export "memory") 1)
  (func (export "_start") (call $proc_exit (i32.const 3)))
  (func (export "other") (call $proc_exit (i32.const 7)))
  (func (export "boom") unreachable))`;

t.test("proc_exit codes are reported; Entrypoint picks another export", async (t) => {
  const module = await wat(EXIT);
  const res = await wasm.run(await request(task(module)), never);
  t.equal(res.exitCode, 3);
  t.equal(res.error, undefined, "a non-zero exit is the program's outcome, not an engine failure");
  const other = await wasm.run(await request(task(module, { Entrypoint: "other" })), never);
  t.equal(other.exitCode, 7);
  const trap = await wasm.run(await request(task(module, { Entrypoint: "boom" })), never);
  t.equal(trap.exitCode, -1);
  t.equal(trap.error?.code, "SHOAL_ENGINE_CRASHED");
  t.match(trap.error?.message, /unreachable/);
  await t.rejects(wasm.run(await request(task(module, { Entrypoint: "missing" })), never), {
    code: "SHOAL_ENGINE_MODULE_INVALID",
    message: /does not export function missing/,
  });
});

const LOOP = `(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))`;

t.test("an endless loop is killed at the timeout, and on cancel", async (t) => {
  const module = await wat(LOOP);
  const res = await wasm.run(await request(task(module), { timeoutMs: 300 }), never);
  t.equal(res.exitCode, -1);
  t.equal(res.error?.code, "SHOAL_ENGINE_TIMEOUT");
  const abort = new AbortController();
  const running = wasm.run(await request(task(module)), abort.signal);
  setTimeout(() => abort.abort(), 300);
  const cancelled = await running;
  t.equal(cancelled.error?.code, "SHOAL_ENGINE_CANCELLED");
});

const GROW = `(module ${PROC_EXIT} (memory (export "memory") 1)
  (func (export "_start")
    (if (i32.lt_s (memory.grow (i32.const 1000)) (i32.const 0)) (then (call $proc_exit (i32.const 4))))))`;

t.test("memory is capped: a large initial memory is refused, growth past the cap fails", async (t) => {
  const huge = await wat(`(module (memory (export "memory") 2000) (func (export "_start")))`);
  await t.rejects(wasm.run(await request(task(huge)), never), { code: "SHOAL_ENGINE_MEMORY_LIMIT" });
  t.throws(() => capModuleMemory(huge, 16 * MiB), { code: "SHOAL_ENGINE_MEMORY_LIMIT" });
  const grow = await wat(GROW);
  const capped = await wasm.run(await request(task(grow)), never);
  t.equal(capped.exitCode, 4, "memory.grow by 1000 pages fails under a 16 MiB cap");
  const roomy = await wasm.run(
    await request(task(grow), {
      limits: { maxMemoryBytes: 128 * MiB, maxStdoutBytes: 1, maxStderrBytes: 1 },
    }),
    never,
  );
  t.equal(roomy.exitCode, 0, "and succeeds under a 128 MiB cap");
  const declared = await wat(`(module (memory (export "memory") 1 4) (func (export "_start")))`);
  t.equal(capModuleMemory(declared, 16 * MiB), declared, "a module already within the cap is left as is");
});

const SPAM = (times: string) => `(module ${FD_WRITE} (memory (export "memory") 1)
  (data (i32.const 100) "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\\n")
  (func (export "_start") (local $i i32)
    (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 64))
    (block $done (loop $l
      ${times}
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))))`;

t.test("stdout and stderr are capped and flagged; a runaway writer is killed", async (t) => {
  const hundred = await wat(SPAM("(br_if $done (i32.ge_u (local.get $i) (i32.const 100)))"));
  const res = await wasm.run(
    await request(task(hundred), {
      limits: { maxMemoryBytes: 16 * MiB, maxStdoutBytes: 1000, maxStderrBytes: 10 },
    }),
    never,
  );
  t.equal(res.exitCode, 0);
  t.equal(res.stdout.length, 1000);
  t.ok(res.stdoutTruncated);
  t.equal(res.stderr.length, 10);
  t.ok(res.stderrTruncated);
  const endless = await wat(SPAM(""));
  const killed = await wasm.run(
    await request(task(endless), {
      limits: {
        maxMemoryBytes: 16 * MiB,
        maxStdoutBytes: 100,
        maxStderrBytes: 100,
        maxLogFileBytes: 1 * MiB,
      },
    }),
    never,
  );
  t.equal(killed.error?.code, "SHOAL_ENGINE_OUTPUT_LIMIT");
  t.equal(killed.stdout.length, 100);
});

t.test("upper reads /inputs/in.txt and writes /outputs/out.txt", async (t) => {
  const upper = await wat(path.join(repo, "configs/jobs/upper.wat"));
  const tk = task(
    upper,
    {},
    {
      InputSources: [
        { Target: "/inputs/in.txt", Source: { Type: "inline", Params: { Content: "Edge nodes, unite!\n" } } },
      ],
      ResultPaths: [{ Name: "out", Path: "/outputs/out.txt" }],
    },
  );
  const req = await request(tk);
  await prepareInputs(req.inputsDir, tk.InputSources, { allowedPaths: [] });
  const res = await wasm.run(req, never);
  t.equal(res.exitCode, 0, res.stderr.toString());
  t.equal(res.stdout.toString(), "upper: wrote /outputs/out.txt\n");
  const results = await collectResults(req.outputsDir, tk.ResultPaths);
  t.equal(results.files.length, 1);
  t.equal(results.files[0]!.name, "out");
  t.equal(Buffer.concat(results.files[0]!.chunks.map((c) => c.data)).toString(), "EDGE NODES, UNITE!\n");

  const none = await request(tk);
  const missing = await wasm.run(none, never);
  t.equal(missing.exitCode, 1, "without its input it exits 1");
  t.match(missing.stderr.toString(), /cannot open \/inputs\/in.txt/);
});

t.test("modules that are not WASI commands are refused before running", async (t) => {
  const notWasm = { ...task(await wat(LOOP)) };
  const bad = {
    ...notWasm,
    Engine: {
      Type: "wasm",
      Params: {
        ...(notWasm.Engine.Params as object),
        EntryModule: { Type: "inline", Params: { Content: Buffer.from("hello").toString("base64") } },
      },
    },
  } as Task;
  await t.rejects(wasm.run(await request(bad), never), { code: "SHOAL_ENGINE_MODULE_INVALID" });
  const foreign = await wat(
    `(module (import "env" "f" (func)) (memory (export "memory") 1) (func (export "_start")))`,
  );
  await t.rejects(wasm.run(await request(task(foreign)), never), {
    code: "SHOAL_ENGINE_MODULE_INVALID",
    message: /imports env\.f/,
  });
  const local = task(await wat(LOOP));
  const fromDisk = {
    ...local,
    Engine: {
      Type: "wasm",
      Params: {
        ...(local.Engine.Params as object),
        EntryModule: { Type: "localFile", Params: { SourcePath: "/etc/passwd" } },
      },
    },
  } as Task;
  await t.rejects(wasm.run(await request(fromDisk), never), { code: "SHOAL_INPUT_NOT_ALLOWED" });
});

t.test("a closed executor refuses new runs", async (t) => {
  const ex = new WasmExecutor();
  await ex.start();
  await ex.close();
  t.equal(await ex.closed(), undefined);
  t.equal(ex.close(), ex.close(), "close() returns the same promise");
  await t.rejects(ex.run(await request(task(await wat(LOOP))), never), { code: "SHOAL_ENGINE_CLOSED" });
});
