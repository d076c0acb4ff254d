import "reflect-metadata";
import { closeSync, existsSync, openSync, readdirSync, readlinkSync } from "node:fs";
import path from "node:path";
import t from "tap";
import { WasmExecutor, WasmModuleCache, WasmWorkerPool } from "../compute/engines/index.js";
import type { WasmWorkerData, WasmWorkerMessage } from "../compute/engines/wasm-worker.js";
import { LOOP, MiB, PROC_EXIT, repo, wasmFixtures, wasmTask } from "./helpers/wasm-fixtures.js";

const fx = await wasmFixtures(t);
const never = new AbortController().signal;
const wasm = new WasmExecutor({ pool: { warm: 1 } });
await wasm.start();
t.teardown(() => wasm.close());
const hello = await fx.wat(path.join(repo, "configs/jobs/hello.wat"));

t.test("the pool reuses a healthy worker and replaces a killed or retired one", async (t) => {
  const pool = new WasmWorkerPool({ warm: 1, runsPerWorker: 2 });
  t.teardown(() => pool.close());
  await pool.start();
  t.equal(pool.idle, 1, "the warm worker is started ahead of demand");
  const first = await pool.acquire();
  t.equal(pool.idle, 0);
  const extra = await pool.acquire();
  t.not(extra, first, "when every worker is busy another one is started");
  pool.release(first);
  pool.release(extra);
  t.equal(await pool.acquire(), extra, "the most recently used idle worker is handed out first");
  await extra.kill();
  pool.release(extra);
  const next = await pool.acquire();
  t.not(next, extra, "a killed worker is never handed out again");
  t.ok(next.alive);
  next.runs = 2;
  pool.release(next);
  t.not(await pool.acquire(), next, "a worker is retired after runsPerWorker executions");
  await pool.close();
  await t.rejects(pool.acquire(), { code: "SHOAL_ENGINE_CLOSED" });
});

t.test(
  "an execution waiting for a busy worker takes the first one given back, and only after growAfterMs a new one",
  async (t) => {
    const pool = new WasmWorkerPool({ warm: 1, growAfterMs: 400 });
    t.teardown(() => pool.close());
    await pool.start();
    const first = await pool.acquire();
    const waiting = pool.acquire();
    await new Promise((r) => setTimeout(r, 50));
    t.equal(pool.size, 1, "no worker is started while the wait is shorter than growAfterMs");
    pool.release(first);
    t.equal(await waiting, first, "the worker given back serves the waiting execution");
    t.equal(pool.size, 1);
    const grown = await pool.acquire();
    t.not(grown, first, "past growAfterMs another worker is started for it");
    t.equal(pool.size, 2);
    t.ok(grown.alive);
  },
);

t.test(
  "an execution whose wait outlasts growAfterMs while a busy worker has answered, unread, takes that worker",
  async (t) => {
    const pool = new WasmWorkerPool({ warm: 1, growAfterMs: 20 });
    t.teardown(() => pool.close());
    await pool.start();
    const req = await fx.request(wasmTask(hello));
    const nul = openSync("/dev/null", "r+");
    t.teardown(() => closeSync(nul));
    const data: WasmWorkerData = {
      module: await new WasmModuleCache().get(hello, req.limits.maxMemoryBytes, "_start"),
      args: ["hello"],
      env: {},
      preopens: { "/inputs": req.inputsDir, "/outputs": req.outputsDir },
      stdin: nul,
      stdout: nul,
      stderr: nul,
      entrypoint: "_start",
      maxMemoryBytes: req.limits.maxMemoryBytes,
    };
    const first = await pool.acquire();
    const waiting = pool.acquire();
    // This thread sends the execution and stays busy for longer than growAfterMs while the
    // worker answers. Busy in a setImmediate callback (the check phase), the loop's next
    // turn runs the waiting execution's timer (the timers phase) before it reads the
    // answer (the poll phase).
    const { ran } = await new Promise<{ ran: Promise<WasmWorkerMessage> }>((resolve) =>
      setImmediate(() => {
        const ran = first.run(data);
        const since = Date.now();
        while ((!first.answered || Date.now() - since < 100) && Date.now() - since < 10_000);
        resolve({ ran });
      }),
    );
    t.ok(first.answered, "the worker answered while this thread was busy");
    t.same(await ran, { exitCode: 0 });
    pool.release(first);
    t.equal(await waiting, first, "the waiting execution takes the worker that answered");
    t.equal(pool.size, 1, "no worker was started for it");
  },
);

t.test("closing the pool refuses the executions waiting for a worker at once", async (t) => {
  const pool = new WasmWorkerPool({ warm: 1, growAfterMs: 60_000 });
  await pool.start();
  await pool.acquire();
  const waiting = pool.acquire().then(
    () => "served",
    (err: { code?: string }) => err.code,
  );
  await pool.close();
  const outcome = await Promise.race([
    waiting,
    new Promise((r) => setTimeout(() => r("still waiting"), 2000)),
  ]);
  t.equal(outcome, "SHOAL_ENGINE_CLOSED");
});

// Memory and a mutable global both count up from their initial values: a
// second run that saw the first run's instance would exit with 2.
const COUNTER = `(module ${PROC_EXIT} (memory (export "memory") 1) (global $g (mut i32) (i32.const 0))
  (func (export "_start")
    (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))
    (global.set $g (i32.add (global.get $g) (i32.const 1)))
    (call $proc_exit (i32.add (i32.load (i32.const 0)) (global.get $g)))))`;

t.test("each execution on a warm worker gets a fresh instance, memory and WASI", async (t) => {
  const counter = await fx.wat(COUNTER);
  for (let i = 0; i < 3; i++) {
    const res = await wasm.run(await fx.request(wasmTask(counter)), never);
    t.equal(res.exitCode, 2, `run ${i}: memory and globals start from the module's initial values`);
  }
});

t.test("executions do not leak file descriptors (WASI preopens are closed)", async (t) => {
  const fds = () => readdirSync("/proc/self/fd").length;
  await wasm.run(await fx.request(wasmTask(hello)), never);
  const before = fds();
  const runs = 30;
  for (let i = 0; i < runs; i++) {
    const res = await wasm.run(await fx.request(wasmTask(hello)), never);
    t.equal(res.exitCode, 0);
  }
  t.ok(
    fds() - before < runs,
    `descriptors before ${before}, after ${fds()} (${2 * runs} more would be a leak)`,
  );
});

t.test("a worker killed at the timeout is replaced and the next execution runs", async (t) => {
  const loop = await fx.wat(LOOP);
  const killed = await wasm.run(await fx.request(wasmTask(loop), { timeoutMs: 200 }), never);
  t.equal(killed.error?.code, "SHOAL_ENGINE_TIMEOUT");
  const res = await wasm.run(await fx.request(wasmTask(hello)), never);
  t.equal(res.exitCode, 0);
  t.equal(res.stdout.toString(), "hello from wasm\n");
});

// Opens /outputs/held.txt (fd 4 is the /outputs preopen), then spins until killed.
const HOLD_AND_SPIN = `(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "held.txt")
  (func (export "_start")
    (if (call $path_open (i32.const 4) (i32.const 0) (i32.const 100) (i32.const 8) (i32.const 1)
          (i64.const 0x42) (i64.const 0) (i32.const 0) (i32.const 200))
      (then unreachable))
    (loop $l (br $l))))`;

t.test("killed executions leave no descriptor open (preopens, files the module opened)", async (t) => {
  const own = () =>
    readdirSync("/proc/self/fd").flatMap((fd) => {
      try {
        return [readlinkSync(`/proc/self/fd/${fd}`)];
      } catch {
        return []; // the descriptor readdir itself used
      }
    });
  const loop = await fx.wat(LOOP);
  const hold = await fx.wat(HOLD_AND_SPIN);
  /** The descriptor count once it holds still: a replacement worker thread opens a few of its own as it starts. */
  const settled = async () => {
    let last = own().length;
    for (let steady = 0, i = 0; steady < 3 && i < 30; i++) {
      await new Promise((r) => setTimeout(r, 100));
      const now = own().length;
      steady = now === last ? steady + 1 : 0;
      last = now;
    }
    return last;
  };
  // One kill first, so the pool's replacement worker is part of the baseline.
  await wasm.run(await fx.request(wasmTask(loop), { timeoutMs: 100 }), never);
  const before = await settled();
  const dirs: string[] = [];
  for (let i = 0; i < 10; i++) {
    // Even runs spin to their timeout; odd ones open a file and are stopped once it exists.
    const holds = i % 2 === 1;
    const req = await fx.request(wasmTask(holds ? hold : loop), { timeoutMs: holds ? 20_000 : 100 });
    dirs.push(req.workDir);
    const stop = new AbortController();
    const held = path.join(req.outputsDir, "held.txt");
    const watch = holds ? setInterval(() => existsSync(held) && stop.abort(), 10) : undefined;
    const res = await wasm.run(req, stop.signal);
    clearInterval(watch);
    t.equal(res.error?.code, holds ? "SHOAL_ENGINE_CANCELLED" : "SHOAL_ENGINE_TIMEOUT", `run ${i}`);
  }
  const afterCount = await settled();
  const after = own();
  t.same(
    after.filter((target) => dirs.some((d) => target.startsWith(d))),
    [],
    "no descriptor into a killed execution's directories",
  );
  // A leak is two or more per killed execution (20+); a worker thread starting or stopping meanwhile is a few.
  t.ok(
    afterCount < before + 8,
    `descriptors before ${before}, after ${afterCount} (20+ more would be the leak)`,
  );
});

t.test("compiled modules are cached by digest and memory cap", async (t) => {
  const cache = new WasmModuleCache({ maxModules: 2 });
  const a = await cache.get(hello, 16 * MiB, "_start");
  t.equal(await cache.get(Buffer.from(hello), 16 * MiB, "_start"), a, "same bytes: same compiled module");
  const b = await cache.get(hello, 32 * MiB, "_start");
  t.not(b, a, "another memory cap is another module");
  t.equal(cache.size, 2);
  await t.rejects(cache.get(hello, 16 * MiB, "missing"), {
    code: "SHOAL_ENGINE_MODULE_INVALID",
    message: /does not export function missing/,
  });
  await t.rejects(cache.get(Buffer.from("\0asm not really"), 16 * MiB, "_start"), {
    code: "SHOAL_ENGINE_MODULE_INVALID",
  });
  t.equal(cache.size, 2, "a module that does not compile is not kept");
  await cache.get(await fx.wat(LOOP), 16 * MiB, "_start");
  t.equal(cache.size, 2, "the least recently used module makes room");
  t.equal(await cache.get(hello, 16 * MiB, "_start"), a, "the recently used one stays");
  t.not(await cache.get(hello, 32 * MiB, "_start"), b, "the evicted one is compiled again");
});
