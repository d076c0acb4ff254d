import "reflect-metadata";
import t from "tap";
import { capModuleMemory } from "../compute/engines/index.js";
import { FD_WRITE, LOOP, MiB, PROC_EXIT, wasmHarness } from "./helpers/wasm-fixtures.js";

const { wat, request, task, wasm, never } = await wasmHarness(t);

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

/** Sleeps `ns` in poll_oneoff on `clock` (`flags` 1: an absolute time), then exits with the number of events. */
const SLEEP = (ns: bigint, clock = 1, flags = 0, subscriptions = 1) => `(module ${PROC_EXIT}
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i64.store (i32.const 0) (i64.const 7))
    (i32.store (i32.const 16) (i32.const ${clock}))
    (i64.store (i32.const 24) (i64.const ${ns}))
    (i32.store16 (i32.const 40) (i32.const ${flags}))
    (i64.store (i32.const 48) (i64.const 8))
    (i32.store (i32.const 64) (i32.const 1))
    (i64.store (i32.const 72) (i64.const 60000000000))
    (if (call $poll (i32.const 0) (i32.const 200) (i32.const ${subscriptions}) (i32.const 300))
      (then (call $proc_exit (i32.const 99))))
    (if (i64.ne (i64.load (i32.const 200)) (i64.const 7)) (then (call $proc_exit (i32.const 98))))
    (call $proc_exit (i32.load (i32.const 300)))))`;

t.test(
  "a module asleep in poll_oneoff is killed at the timeout and on cancel, not when it wakes",
  async (t) => {
    const module = await wat(SLEEP(60_000_000_000n));
    const started = Date.now();
    const res = await wasm.run(await request(task(module), { timeoutMs: 300 }), never);
    t.equal(res.error?.code, "SHOAL_ENGINE_TIMEOUT");
    const abort = new AbortController();
    const running = wasm.run(await request(task(module)), abort.signal);
    setTimeout(() => abort.abort(), 300);
    t.equal((await running).error?.code, "SHOAL_ENGINE_CANCELLED");
    // Before the sleep was waited out in JavaScript, each run ended when the module woke: 60 s.
    t.ok(Date.now() - started < 20_000, `both ended within seconds (${Date.now() - started} ms)`);
  },
);

t.test("poll_oneoff still sleeps as long as asked and reports the clock that is due", async (t) => {
  const started = Date.now();
  const res = await wasm.run(await request(task(await wat(SLEEP(300_000_000n)))), never);
  t.equal(res.exitCode, 1, "one event, carrying the subscription's userdata");
  t.ok(Date.now() - started >= 300, "slept 300 ms");
  const two = await wasm.run(await request(task(await wat(SLEEP(100_000_000n, 1, 0, 2)))), never);
  t.equal(two.exitCode, 1, "of two clocks, only the one due is reported");
  const past = await wasm.run(await request(task(await wat(SLEEP(1n, 0, 1)))), never);
  t.equal(past.exitCode, 1, "an absolute realtime deadline long past is due at once");
  const bad = await wasm.run(await request(task(await wat(SLEEP(1n, 1, 0, 0)))), never);
  t.equal(bad.exitCode, 99, "no subscriptions: EINVAL");
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
