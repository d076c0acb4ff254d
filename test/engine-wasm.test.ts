import "reflect-metadata";
import path from "node:path";
import t from "tap";
import { collectResults, prepareInputs, WasmExecutor } from "../compute/engines/index.js";
import type { Task } from "../core/index.js";
import { FD_WRITE, LOOP, PROC_EXIT, repo, wasmHarness } from "./helpers/wasm-fixtures.js";

const { wat, request, task, wasm, never } = await wasmHarness(t);

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

const MEDDLE_STDIO = `(module ${FD_WRITE} ${PROC_EXIT}
  (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_renumber" (func $renumber (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_fdstat_set_flags" (func $flags (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_seek" (func $seek (param i32 i64 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "still here\\nY")
  (func $write (param $at i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $at))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (drop (call $close (i32.const 0)))
    (drop (call $close (i32.const 1)))
    (drop (call $close (i32.const 2)))
    (call $write (i32.const 64) (i32.const 11))
    ;; back to the start of stdout: an appending descriptor still writes at the end
    (drop (call $seek (i32.const 1) (i64.const 0) (i32.const 0) (i32.const 16)))
    (call $write (i32.const 75) (i32.const 1))
    (call $proc_exit (i32.add
      (call $renumber (i32.const 3) (i32.const 1))
      (call $flags (i32.const 1) (i32.const 0))))))`;

t.test(
  "a module cannot close, renumber or change the node's stdio descriptors, reused by the next",
  async (t) => {
    // node:wasi would close the host descriptors behind 0–2, which belong to the node: it
    // then closed them again itself, by a number the process may have reused meanwhile.
    const res = await wasm.run(await request(task(await wat(MEDDLE_STDIO))), never);
    t.equal(res.error, undefined);
    t.equal(res.exitCode, 58 + 58, "fd_renumber onto stdout and fd_fdstat_set_flags on it answer ENOTSUP");
    t.equal(res.stdout.toString(), "still here\nY", "stdout is still the node's, and appended to");
    // The next executions get the same descriptors, emptied: nothing of this one shows.
    const hello = await wat(path.join(repo, "configs/jobs/hello.wat"));
    for (let i = 0; i < 3; i++) {
      const next = await wasm.run(await request(task(hello)), never);
      t.equal(next.stdout.toString(), "hello from wasm\n", `execution ${i + 2} sees only its own output`);
    }
  },
);

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

t.test("a stop while the module is still being fetched ends the run at once", async (t) => {
  const fetching = new WasmExecutor({ storedModule: () => new Promise<Buffer>(() => {}) });
  await fetching.start();
  t.teardown(() => fetching.close());
  const stored = {
    ...task(await wat(LOOP)),
    Engine: {
      Type: "wasm",
      Params: { EntryModule: { Type: "stored", Params: { Digest: `sha256:${"a".repeat(64)}` } } },
    },
  } as Task;
  const stop = new AbortController();
  const run = fetching.run(await request(stored), stop.signal);
  setTimeout(() => stop.abort(new Error("job stopped")), 50);
  const settled = await Promise.race([
    run.then(
      () => "resolved",
      (err: { code?: string }) => err.code,
    ),
    new Promise((r) => setTimeout(() => r("still fetching"), 3000)),
  ]);
  t.equal(settled, "SHOAL_ENGINE_CANCELLED", "a fetch that never answers does not hold the execution");
});
