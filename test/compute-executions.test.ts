import "reflect-metadata";
import { execFile, spawn } from "node:child_process";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import t, { type Test } from "tap";
import { ExecAllowList } from "../compute/engines/index.js";
import {
  createEngineRunner,
  type ExecutionContext,
  ExecutionManager,
  failedOutcome,
  fitForManifest,
  ResultSpool,
  type SpooledResult,
} from "../compute/index.js";
import { type JobSpec, parseJobSpec, silentLogger } from "../core/index.js";
import { RESULT_LOG_TAIL_BYTES } from "../fabric/index.js";
import { sleepRunning, waitUntil } from "./helpers/cluster.js";
import { workDirsInUse } from "./helpers/compute-standin.js";

const root = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-executions-"));
t.teardown(() => fs.rm(root, { recursive: true, force: true }));

/** Prints "tick" then spins until killed. */
const LOUD_LOOP = `(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "tick\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 32))
    (i32.store (i32.const 4) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (loop $l (br $l))))`;
await fs.writeFile(path.join(root, "loop.wat"), LOUD_LOOP);
await promisify(execFile)("wat2wasm", [path.join(root, "loop.wat"), "-o", path.join(root, "loop.wasm")]);
const loop = await fs.readFile(path.join(root, "loop.wasm"));
const spec = parseJobSpec({
  Name: "loop",
  Tasks: [
    {
      Name: "main",
      Engine: {
        Type: "wasm",
        Params: { EntryModule: { Type: "inline", Params: { Content: loop.toString("base64") } } },
      },
      Resources: { Memory: "16Mi" },
    },
  ],
});
const submitter = { sub: "alice", namespace: "default", method: "password" };

async function setup(t: Test, name: string) {
  const dir = path.join(root, name);
  const spool = new ResultSpool(path.join(dir, "spool"));
  await spool.init();
  const engines = await createEngineRunner({
    execAllow: ExecAllowList.OFF,
    allowedInputPaths: [],
    wasmMaxMemoryBytes: 64 * 2 ** 20,
    storedModule: () => Promise.reject(new Error("these tests run inline modules")),
    log: silentLogger,
  });
  t.teardown(() => engines.close());
  const spooled: SpooledResult[] = [];
  const logs: { seq: number; bytes: number }[] = [];
  let onSpooled: () => void = () => {};
  const manager = new ExecutionManager({
    root: path.join(dir, "executions"),
    spool,
    runner: engines.run,
    log: silentLogger,
    onLog: (_id, _stream, seq, data) => logs.push({ seq, bytes: data.length }),
    onResult: (e, stored) => {
      void stored.then(() => {
        spooled.push(e);
        onSpooled();
      });
    },
    onCancelled: () => {},
  });
  const nextSpooled = () =>
    new Promise<SpooledResult>((resolve) => {
      onSpooled = () => resolve(spooled.at(-1)!);
    });
  return { dir, spool, manager, spooled, logs, nextSpooled };
}

/** A manager whose runner only does `act` in the directories it was given; one execution at a time. */
async function standIn(
  t: Test,
  name: string,
  act: (ctx: ExecutionContext) => Promise<void>,
  readyWorkDirs = 1,
) {
  const dir = path.join(root, name);
  const spool = new ResultSpool(path.join(dir, "spool"));
  await spool.init();
  const executions = path.join(dir, "executions");
  const used: { workDir: string; entries: string[]; marker: string }[] = [];
  let finished: () => void = () => {};
  const manager = new ExecutionManager({
    root: executions,
    spool,
    runner: async (ctx) => {
      await act(ctx);
      used.push({
        workDir: ctx.workDir,
        entries: (await fs.readdir(ctx.workDir)).sort(),
        marker: await fs.readFile(path.join(ctx.workDir, "execution.json"), "utf8").catch(() => ""),
      });
      return { ...failedOutcome(ctx.executionId, "unused"), state: "Completed", exitCode: 0, files: [] };
    },
    log: silentLogger,
    onLog: () => {},
    onResult: (_e, stored) => void stored.then(() => finished()),
    onCancelled: () => finished(),
    readyWorkDirs,
  });
  t.teardown(() => manager.drain(1000));
  /** Runs one execution of `jobSpec` to its end, work directory retired included. */
  const run = async (executionId: string, jobSpec = spec) => {
    const done = new Promise<void>((resolve) => {
      finished = resolve;
    });
    manager.start({ jobId: "j", executionId, spec: jobSpec, submitter, timeoutMs: 30_000 });
    await done;
    for (let i = 0; i < 100 && manager.running().length + (await workDirsInUse(executions)).length > 0; i++)
      await new Promise((r) => setTimeout(r, 20));
  };
  return { executions, manager, used, run };
}

const execSpec = parseJobSpec({
  Name: "exec",
  Tasks: [{ Name: "main", Engine: { Type: "exec", Params: { Command: "/bin/true" } } }],
});
const withInput = parseJobSpec({
  ...spec,
  Tasks: spec.Tasks.map((task) => ({
    ...task,
    InputSources: [{ Source: { Type: "inline", Params: { Content: "aGk=" } }, Target: "/inputs/a" }],
  })),
});

t.test(
  "work directories are made ahead, each with empty inputs/ and outputs/; drain removes those left",
  async (t) => {
    const { executions, manager, used, run } = await standIn(t, "fresh", async () => {}, 2);
    for (const executionId of ["e-one", "e-two", "e-three", "e-four"]) await run(executionId, execSpec);
    t.equal(new Set(used.map((u) => u.workDir)).size, 4, "four different directories: exec never reuses one");
    for (const u of used) {
      t.equal(path.dirname(u.workDir), await fs.realpath(executions), "under the root, as a real path");
      t.same(
        u.entries.filter((e) => e !== "execution.json"),
        ["inputs", "outputs"],
        "with its inputs/ and outputs/ (and its marker, written beside the run)",
      );
    }
    const left = await fs.readdir(executions);
    t.equal(left.length, 2, "the used ones are removed; two are ready for the next executions");
    t.notOk(left.some((name) => used.some((u) => path.basename(u.workDir) === name)));
    await manager.drain(1000);
    t.same(await fs.readdir(executions), [], "none left after drain");
  },
);

t.test(
  "a WASM execution that leaves its work directory as it was made gives it back, marker emptied",
  async (t) => {
    const { executions, used, run } = await standIn(t, "reuse", async () => {});
    await run("e-one");
    await run("e-two");
    t.equal(used[1]?.workDir, used[0]?.workDir, "the second execution runs in the first one's directory");
    t.same(JSON.parse(used[1]?.marker ?? ""), { jobId: "j", executionId: "e-two" }, "marked for the second");
    t.same(
      await fs.readdir(executions),
      [path.basename(used[0]?.workDir ?? "")],
      "no other directory was made",
    );
    t.equal(
      await fs.readFile(path.join(used[0]?.workDir ?? "", "execution.json"), "utf8"),
      "",
      "marker emptied",
    );
  },
);

t.test(
  "a work directory is removed, not given back, when the execution could have left something in it",
  async (t) => {
    const cases: [string, (ctx: ExecutionContext) => Promise<void>, JobSpec?][] = [
      ["a file in outputs/", (ctx) => fs.writeFile(path.join(ctx.outputsDir, "left"), "x")],
      ["a directory in inputs/", (ctx) => fs.mkdir(path.join(ctx.inputsDir, "left"))],
      ["a file beside inputs/ and outputs/", (ctx) => fs.writeFile(path.join(ctx.workDir, "left"), "x")],
      ["an exec task", async () => {}, execSpec],
      ["a task with inputs", async () => {}, withInput],
    ];
    for (const [what, act, jobSpec] of cases) {
      const { executions, used, run } = await standIn(
        t,
        `no-reuse-${cases.findIndex((c) => c[0] === what)}`,
        act,
      );
      await run("e-one", jobSpec);
      await run("e-two", jobSpec);
      t.not(used[1]?.workDir, used[0]?.workDir, `${what}: the second execution gets another directory`);
      t.notOk(
        (await fs.readdir(executions)).includes(path.basename(used[0]?.workDir ?? "")),
        `${what}: the first one is removed`,
      );
    }
  },
);

t.test("a cancelled execution's work directory is removed, not given back", async (t) => {
  let cancelled = false;
  const { executions, manager, used, run } = await standIn(t, "cancelled", async (ctx) => {
    if (cancelled) return;
    cancelled = true;
    queueMicrotask(() => manager.cancel(ctx.executionId, "stop"));
    await new Promise((resolve) => ctx.signal.addEventListener("abort", resolve, { once: true }));
  });
  await run("e-cancelled");
  await run("e-two");
  t.not(used[1]?.workDir, used[0]?.workDir);
  t.notOk((await fs.readdir(executions)).includes(path.basename(used[0]?.workDir ?? "")));
});

t.test("the engine's time limit fails the execution and its work directory is removed", async (t) => {
  const { manager, nextSpooled, dir } = await setup(t, "timeout");
  const done = nextSpooled();
  manager.start({ jobId: "j", executionId: "e-timeout", spec, submitter, timeoutMs: 300 });
  const entry = await done;
  t.equal(entry.result.state, "Failed");
  t.match(entry.result.error, /SHOAL_ENGINE_TIMEOUT/);
  // Removed right after the result is handed on, off its path.
  let left = await workDirsInUse(path.join(dir, "executions"));
  for (let i = 0; i < 100 && left.length > 0; i++) {
    await new Promise((r) => setTimeout(r, 20));
    left = await workDirsInUse(path.join(dir, "executions"));
  }
  t.same(left, []);
});

t.test(
  "shutdown: output streams in numbered batches; executions still running after the grace period are aborted and spooled as failed",
  async (t) => {
    const { manager, spooled, logs } = await setup(t, "drain");
    manager.start({ jobId: "j", executionId: "e-drain", spec, submitter, timeoutMs: 60_000 });
    await new Promise<void>((resolve) => {
      const poll = setInterval(() => {
        if (logs.length === 0) return;
        clearInterval(poll);
        resolve();
      }, 20);
    });
    t.same(logs[0], { seq: 0, bytes: 5 }, "the first batch is numbered 0");
    t.same(manager.running(), ["e-drain"]);
    await manager.drain(100);
    t.same(manager.running(), []);
    t.equal(spooled.length, 1);
    t.equal(spooled[0]?.result.state, "Failed");
    t.match(spooled[0]?.result.error, /shut down/);
  },
);

t.test("work directories left by a crash become failed results; stray directories are removed", async (t) => {
  const { dir, manager, spool } = await setup(t, "recover");
  const executions = path.join(dir, "executions");
  await fs.mkdir(path.join(executions, "e-crashed", "outputs"), { recursive: true });
  await fs.writeFile(
    path.join(executions, "e-crashed", "execution.json"),
    JSON.stringify({ jobId: "j-crashed", executionId: "e-crashed" }),
  );
  await fs.mkdir(path.join(executions, "stray"), { recursive: true });
  const recovered = await manager.recover();
  t.equal(recovered.length, 1);
  t.equal(recovered[0]?.jobId, "j-crashed");
  t.match(recovered[0]?.result, {
    executionId: "e-crashed",
    state: "Failed",
    error: /stopped while the execution ran/,
  });
  t.same(await fs.readdir(executions), []);
  t.same(
    (await spool.list()).map((e) => e.result.executionId),
    ["e-crashed"],
  );
});

t.test("programs left running in a work directory are killed at recovery, and nothing else", async (t) => {
  const { dir, manager } = await setup(t, "recover-programs");
  const workDir = path.join(dir, "executions", "w-left");
  await fs.mkdir(workDir, { recursive: true });
  await fs.writeFile(
    path.join(workDir, "execution.json"),
    JSON.stringify({ jobId: "j-left", executionId: "e-left" }),
  );
  const start = (args: string[], cwd: string) => {
    const child = spawn(args[0]!, args.slice(1), { cwd, detached: true, stdio: "ignore" });
    t.teardown(() => {
      try {
        process.kill(-child.pid!, "SIGKILL");
      } catch {
        // ESRCH: killed by the test, or by the recovery.
      }
    });
    return child;
  };
  const running = async (...args: string[]) =>
    (await Promise.all(args.map(sleepRunning))).filter(Boolean).length;
  start(["sleep", "300.71"], workDir);
  // A program that started another and died (as an exec program does with its node).
  const shell = start(["sh", "-c", "sleep 300.72 & exec sleep 300.73"], workDir);
  start(["sleep", "300.74"], dir);
  await waitUntil(
    "the programs run",
    async () => (await running("300.71", "300.72", "300.73", "300.74")) === 4 || undefined,
  );
  shell.kill("SIGKILL");
  await waitUntil("the shell's program is gone", async () => (await running("300.73")) === 0 || undefined);

  await manager.recover();
  await waitUntil(
    "what ran in the work directory is killed",
    async () => (await running("300.71", "300.72")) === 0 || undefined,
    5000,
  );
  t.equal(await running("300.74"), 1, "a program elsewhere runs on");
});

t.test(
  "a crash after the result was spooled, before its work directory was removed, keeps the result",
  async (t) => {
    const { dir, manager, spool } = await setup(t, "recover-spooled");
    const executions = path.join(dir, "executions");
    await spool.put(
      "j-done",
      {
        executionId: "e-done",
        state: "Completed",
        exitCode: 0,
        stdout: "done\n",
        stderr: "",
        stdoutTruncated: false,
        stderrTruncated: false,
      },
      [],
    );
    await fs.mkdir(path.join(executions, "e-done", "outputs"), { recursive: true });
    await fs.writeFile(
      path.join(executions, "e-done", "execution.json"),
      JSON.stringify({ jobId: "j-done", executionId: "e-done" }),
    );
    t.same(await manager.recover(), [], "nothing new is spooled");
    t.same(await fs.readdir(executions), [], "the work directory is removed");
    const [entry] = await spool.list();
    t.equal(entry?.result.state, "Completed", "the spooled result is not replaced by a Failed one");
    t.equal(entry?.result.stdout, "done\n");
  },
);

t.test("output carried in a manifest is cut to fit its JSON budget", async (t) => {
  t.same(fitForManifest("short", 100), { text: "short", cut: false });
  const control = "\u0001".repeat(100);
  const fitted = fitForManifest(control, 62);
  t.ok(fitted.cut);
  t.ok(JSON.stringify(fitted.text).length <= 62);
  t.ok(JSON.stringify(`${fitted.text}\u0001`).length > 62, "as much as fits");
  // Measured in UTF-8 bytes, as a message carries it: each of these is three.
  t.same(fitForManifest("漢".repeat(10), 20), { text: "漢".repeat(6), cut: true });
});

t.test(
  "output not streamed yet when an execution ends rides in its result, up to RESULT_LOG_TAIL_BYTES; more is streamed",
  async (t) => {
    const dir = path.join(root, "tail");
    const spool = new ResultSpool(path.join(dir, "spool"));
    await spool.init();
    const streamed: { stream: string; seq: number; text: string }[] = [];
    const results = new Map<string, SpooledResult>();
    /** What each execution writes: [stream, text, pause after it (ms)]. */
    const scripts = new Map<string, [stream: "stdout" | "stderr", text: string, pauseMs: number][]>();
    let finished: () => void = () => {};
    const manager = new ExecutionManager({
      root: path.join(dir, "executions"),
      spool,
      runner: async (ctx) => {
        for (const [stream, text, pauseMs] of scripts.get(ctx.executionId)!) {
          ctx.onLog(stream, Buffer.from(text));
          await new Promise((r) => setTimeout(r, pauseMs));
        }
        return { ...failedOutcome(ctx.executionId, "unused"), state: "Completed", exitCode: 0, files: [] };
      },
      log: silentLogger,
      onLog: (_id, stream, seq, data) => streamed.push({ stream, seq, text: Buffer.from(data).toString() }),
      onResult: (e, stored) =>
        void stored.then(() => {
          results.set(e.result.executionId, e);
          finished();
        }),
      onCancelled: () => {},
      logFlushMs: 50,
    });
    t.teardown(() => manager.drain(1000));
    const run = async (
      executionId: string,
      script: [stream: "stdout" | "stderr", text: string, pauseMs: number][],
    ) => {
      scripts.set(executionId, script);
      streamed.length = 0;
      const done = new Promise<void>((resolve) => {
        finished = resolve;
      });
      manager.start({ jobId: "j", executionId, spec, submitter, timeoutMs: 30_000 });
      await done;
      const logs = results.get(executionId)!.result.logs;
      return {
        streamed: [...streamed],
        tail: logs?.map((l) => ({ ...l, data: Buffer.from(l.data, "base64").toString() })),
      };
    };

    const short = await run("e-short", [
      ["stdout", "out\n", 0],
      ["stderr", "err\n", 0],
    ]);
    t.same(short.streamed, [], "a short execution's output costs no log message");
    t.same(short.tail, [
      { stream: "stdout", seq: 0, data: "out\n" },
      { stream: "stderr", seq: 1, data: "err\n" },
    ]);

    const full = "x".repeat(RESULT_LOG_TAIL_BYTES);
    const atLimit = await run("e-limit", [["stdout", full, 0]]);
    t.same(atLimit.streamed, [], "exactly RESULT_LOG_TAIL_BYTES still rides in the result");
    t.equal(atLimit.tail?.[0]?.data, full);

    const over = await run("e-over", [["stdout", `${full}y`, 0]]);
    t.same(
      over.streamed,
      [{ stream: "stdout", seq: 0, text: `${full}y` }],
      "one byte more is streamed as before",
    );
    t.equal(over.tail, undefined, "and the result carries none");

    const later = await run("e-later", [
      ["stdout", "early\n", 200],
      ["stdout", "late\n", 0],
    ]);
    t.same(later.streamed, [{ stream: "stdout", seq: 0, text: "early\n" }], "what was flushed while it ran");
    t.same(later.tail, [{ stream: "stdout", seq: 1, data: "late\n" }], "the rest, numbered after it");

    const onDisk = (await spool.list()).find((e) => e.result.executionId === "e-short");
    t.same(
      onDisk?.result.logs,
      results.get("e-short")?.result.logs,
      "the last lines are spooled with the result",
    );
  },
);
