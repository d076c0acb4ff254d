import "reflect-metadata";
import { existsSync, realpathSync } from "node:fs";
import { mkdir, mkdtemp, rm, symlink } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import t from "tap";
import {
  type EngineRunRequest,
  ExecAllowList,
  ExecExecutor,
  ExecNotAllowedError,
} from "../compute/engines/index.js";
import { isRunning, parseJobSpec, type Task } from "../core/index.js";

const root = await mkdtemp(path.join(os.tmpdir(), "shoal-exec-"));
t.teardown(() => rm(root, { recursive: true, force: true }));

function task(Command: string, Arguments: string[] = [], Env: Record<string, string> = {}): Task {
  return parseJobSpec({
    Name: "t",
    Tasks: [{ Name: "main", Engine: { Type: "exec", Params: { Command, Arguments } }, Env }],
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
    limits: { maxMemoryBytes: 256 * 1024 * 1024, maxStdoutBytes: 1024 * 1024, maxStderrBytes: 1024 * 1024 },
    ...over,
  };
}

const never = new AbortController().signal;

/**
 * Whether `pid` is dead within a second: the group's SIGKILL is sent at once,
 * but the result comes when the direct child is gone, and another process of
 * the group may still be on its way out (seen once on a loaded CI).
 */
async function diesSoon(pid: number): Promise<boolean> {
  // A zombie waiting for a reaper (pid 1 in a container may never reap it) counts as dead.
  for (let i = 0; i < 100 && (await isRunning(pid)); i++) await new Promise((r) => setTimeout(r, 10));
  return !(await isRunning(pid));
}
const exec = new ExecExecutor({
  allow: await ExecAllowList.resolve([
    "/bin/echo",
    "/usr/bin/env",
    "/bin/sleep",
    "/bin/sh",
    "/usr/bin/head",
    "/bin/false",
    "/bin/pwd",
  ]),
});
t.teardown(() => exec.close());

t.test("an allow-listed /bin/echo runs, without a shell", async (t) => {
  const logs: string[] = [];
  const res = await exec.run(
    await request(task("/bin/echo", ["hello", "$HOME", "*"]), { onLog: (_s, c) => logs.push(String(c)) }),
    never,
  );
  t.equal(res.error, undefined);
  t.equal(res.exitCode, 0);
  t.equal(res.stdout.toString(), "hello $HOME *\n", "no expansion: there is no shell");
  t.equal(logs.join(""), "hello $HOME *\n");
  const pwd = await exec.run(await request(task("/bin/pwd")), never);
  t.match(pwd.stdout.toString(), /exec-\d+\n$/, "cwd is the work directory");
  const fails = await exec.run(await request(task("/bin/false")), never);
  t.equal(fails.exitCode, 1);
  t.equal(fails.error, undefined);
});

t.test("commands that are not allow-listed are refused", async (t) => {
  await t.rejects(exec.run(await request(task("/bin/cat", ["/etc/passwd"])), never), {
    code: "SHOAL_ENGINE_EXEC_NOT_ALLOWED",
  });
  const off = new ExecExecutor({ allow: ExecAllowList.OFF });
  t.teardown(() => off.close());
  const err = await off.run(await request(task("/bin/echo")), never).catch((e: unknown) => e);
  t.ok(err instanceof ExecNotAllowedError);
  t.match((err as Error).message, /exec engine is off/);
  const missing = (await exec.run(await request(task("/no/such/program")), never).catch((e) => e)) as Error;
  t.match(missing, { code: "SHOAL_ENGINE_EXEC_NOT_ALLOWED", message: /does not exist on this node/ });
  // parseJobSpec refuses a relative command; the engine refuses it too (it would resolve against the node's cwd).
  const tk = task("/bin/echo");
  const relativeTask = {
    ...tk,
    Engine: { Type: "exec", Params: { Command: "echo", Arguments: [] } },
  } as Task;
  const relative = (await exec.run(await request(relativeTask), never).catch((e) => e)) as Error;
  t.match(relative, { code: "SHOAL_ENGINE_EXEC_NOT_ALLOWED", message: /is not an absolute path/ });
});

t.test("the allow list and the command are compared by real path", async (t) => {
  const dir = path.join(root, "real-paths");
  await mkdir(dir);
  const onlyEcho = new ExecExecutor({ allow: await ExecAllowList.resolve(["/usr/bin/echo"]) });
  t.teardown(() => onlyEcho.close());
  // A link in a directory nobody allow-listed, leading to a shell that is not allowed either.
  await symlink("/bin/sh", path.join(dir, "sh"));
  const viaLink = (await onlyEcho
    .run(await request(task(path.join(dir, "sh"), ["-c", "echo pwned"])), never)
    .catch((e) => e)) as ExecNotAllowedError;
  t.equal(viaLink.code, "SHOAL_ENGINE_EXEC_NOT_ALLOWED");
  t.equal(viaLink.realPath, realpathSync("/bin/sh"));
  // A link named like the allowed program, leading elsewhere, is what it leads to.
  await symlink("/bin/sh", path.join(dir, "echo"));
  await t.rejects(onlyEcho.run(await request(task(path.join(dir, "echo"))), never), {
    code: "SHOAL_ENGINE_EXEC_NOT_ALLOWED",
  });
  // /bin/echo is /usr/bin/echo where /bin links to usr/bin: the same program, allowed.
  if (realpathSync("/bin/echo") === "/usr/bin/echo") {
    const res = await onlyEcho.run(await request(task("/bin/echo", ["same"])), never);
    t.equal(res.exitCode, 0);
    t.equal(res.stdout.toString(), "same\n");
    const fromBin = new ExecExecutor({ allow: await ExecAllowList.resolve(["/bin/echo"]) });
    t.teardown(() => fromBin.close());
    t.equal((await fromBin.run(await request(task("/usr/bin/echo")), never)).exitCode, 0);
  }
  // A link to an allowed program is allowed, and the real program is what runs.
  await symlink("/usr/bin/echo", path.join(dir, "my-echo"));
  t.equal((await onlyEcho.run(await request(task(path.join(dir, "my-echo"))), never)).exitCode, 0);
});

t.test("an allow list entry that is relative, missing or not a file stops the node starting", async (t) => {
  const cases: [string, RegExp][] = [
    ["bin/echo", /Allow\[0\] "bin\/echo" is not an absolute path/],
    ["/no/such/program", /Allow\[0\] "\/no\/such\/program" does not exist on this node/],
    ["/usr/bin", /resolves to \/usr\/bin, which is not a file/],
  ];
  for (const [entry, message] of cases) {
    await t.rejects(
      ExecAllowList.resolve([entry]),
      { code: "SHOAL_ENGINE_EXEC_ALLOW_INVALID", message },
      entry,
    );
  }
  const dangling = path.join(root, "dangling");
  await symlink(path.join(root, "nowhere"), dangling);
  await t.rejects(ExecAllowList.resolve(["/bin/echo", dangling]), {
    code: "SHOAL_ENGINE_EXEC_ALLOW_INVALID",
    message: /Allow\[1\]/,
  });
  const list = await ExecAllowList.resolve(["/bin/echo", "/usr/bin/echo"]);
  t.same(
    list.realPaths,
    [realpathSync("/bin/echo"), realpathSync("/usr/bin/echo")].filter((p, i, a) => a.indexOf(p) === i),
  );
  t.ok(Object.isFrozen(list.realPaths));
  t.notOk(ExecAllowList.OFF.enabled);
});

t.test("symlinks are resolved before the allow-list check", async (t) => {
  const dir = path.join(root, "links");
  await mkdir(dir);
  await symlink("/bin/cat", path.join(dir, "echo"));
  const err = (await exec
    .run(await request(task(path.join(dir, "echo"), ["/etc/passwd"])), never)
    .catch((e) => e)) as Error & {
    code: string;
  };
  t.equal(err.code, "SHOAL_ENGINE_EXEC_NOT_ALLOWED", "a link named echo that leads to cat is cat");
  t.match(err.message, /resolves to .*cat/);
  // An allow-list entry that is itself a link allows what it leads to.
  await symlink("/usr/bin/env", path.join(dir, "printenv-link"));
  const viaLink = new ExecExecutor({ allow: await ExecAllowList.resolve([path.join(dir, "printenv-link")]) });
  t.teardown(() => viaLink.close());
  t.equal((await viaLink.run(await request(task("/usr/bin/env")), never)).exitCode, 0);
});

t.test("the environment is scrubbed to PATH, SHOAL_* and the job's Env", async (t) => {
  process.env.SHOAL_TEST_CANARY = "must not leak";
  t.teardown(() => {
    delete process.env.SHOAL_TEST_CANARY;
  });
  // env -0: NUL-separated, since tap's own variables may hold newlines.
  const res = await exec.run(await request(task("/usr/bin/env", ["-0"], { GREETING: "hi" })), never);
  t.equal(res.exitCode, 0);
  const env: Record<string, string> = Object.fromEntries(
    res.stdout
      .toString()
      .split("\0")
      .filter(Boolean)
      .map((l) => l.split(/=(.*)/s).slice(0, 2)),
  );
  // tap's processinfo plugin wraps child_process.spawn and adds its own variables
  // (NODE_OPTIONS pointing at itself, _TAPJS_PROCESSINFO_*) to every child; not ours.
  const injectedByTap = (k: string) =>
    k.startsWith("_TAPJS_PROCESSINFO") || (k === "NODE_OPTIONS" && /@tapjs\/processinfo/.test(env[k]!));
  t.same(
    Object.keys(env)
      .filter((k) => !injectedByTap(k))
      .sort(),
    ["GREETING", "PATH", "SHOAL_INPUTS", "SHOAL_OUTPUTS"],
  );
  t.equal(env.PATH, "/usr/bin:/bin");
  t.equal(env.GREETING, "hi");
  t.notOk("HOME" in env || "USER" in env || "SHOAL_TEST_CANARY" in env);
  // parseJobSpec refuses loader variables; the engine refuses them too, for specs built by hand.
  const tk = task("/bin/echo");
  const sneaky = { ...tk, Env: { LD_PRELOAD: "/tmp/evil.so" } } as Task;
  await t.rejects(exec.run(await request(sneaky), never), { code: "SHOAL_ENGINE_ENV_NOT_ALLOWED" });
});

t.test("a timeout kills the whole process group", async (t) => {
  const res = await exec.run(await request(task("/bin/sleep", ["30"]), { timeoutMs: 300 }), never);
  t.equal(res.exitCode, -1);
  t.equal(res.error?.code, "SHOAL_ENGINE_TIMEOUT");
  const group = await exec.run(
    await request(task("/bin/sh", ["-c", "sleep 30 & echo $!; wait"]), { timeoutMs: 500 }),
    never,
  );
  t.equal(group.error?.code, "SHOAL_ENGINE_TIMEOUT");
  const pid = Number(group.stdout.toString().trim());
  t.ok(pid > 0, "the background sleep reported its pid");
  t.ok(await diesSoon(pid), "the background child died with the group");
  const abort = new AbortController();
  const running = exec.run(await request(task("/bin/sleep", ["30"])), abort.signal);
  setTimeout(() => abort.abort(), 200);
  t.equal((await running).error?.code, "SHOAL_ENGINE_CANCELLED");
});

t.test("output is capped and flagged", async (t) => {
  const res = await exec.run(
    await request(task("/usr/bin/head", ["-c", "100000", "/dev/zero"]), {
      limits: { maxMemoryBytes: 256 * 1024 * 1024, maxStdoutBytes: 1000, maxStderrBytes: 1000 },
    }),
    never,
  );
  t.equal(res.exitCode, 0);
  t.equal(res.stdout.length, 1000);
  t.ok(res.stdoutTruncated);
  t.equal(res.stderrTruncated, false);
});

t.test(
  "memory is capped with RLIMIT_AS when prlimit exists",
  { skip: !existsSync("/usr/bin/prlimit") },
  async (t) => {
    const res = await exec.run(
      await request(task("/bin/sh", ["-c", "ulimit -v"]), {
        limits: { maxMemoryBytes: 64 * 1024 * 1024, maxStdoutBytes: 1000, maxStderrBytes: 1000 },
      }),
      never,
    );
    t.equal(res.stdout.toString().trim(), String(64 * 1024), "ulimit -v shows the cap in KiB");
  },
);
