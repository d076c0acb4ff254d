import { type ChildProcess, type SpawnOptions as ChildSpawnOptions, spawn } from "node:child_process";
import { promises as fs, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import https from "node:https";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import type { Test } from "tap";
import { ApiClient } from "../../cli/api-client.js";
import { dieWithParentLauncher } from "../../core/index.js";
import { initPki, openPki, type Pki, writeIssued } from "../../pki/index.js";

const ROOT = path.resolve(import.meta.dirname, "..", "..");

/** Ports below this are never handed out for outgoing connections (Linux's ephemeral range starts here). */
const EPHEMERAL_LOW = Number(
  (() => {
    try {
      return readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0];
    } catch {
      return undefined;
    }
  })() ?? 32768,
);
/** How far below the ephemeral range {@link freePort} picks from. */
const PICK_SPAN = 10_000;

/** Whether `port` can be listened on on loopback now. */
function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once("error", () => resolve(false));
    s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

/**
 * A free loopback TCP port for a server started a moment later (nats-server
 * routes and the like, whose port must be known before it starts). Picked at
 * random below the ephemeral range: a kernel-chosen port is one that any of
 * the suite's outgoing connections may take before the server binds it.
 */
export async function freePort(): Promise<number> {
  const low = Math.max(1024, EPHEMERAL_LOW - PICK_SPAN);
  for (let i = 0; i < 50; i++) {
    const port = low + Math.floor(Math.random() * (EPHEMERAL_LOW - low));
    if (await canListen(port)) return port;
  }
  throw new Error(`no free port in ${low}-${EPHEMERAL_LOW - 1} after 50 tries`);
}

const dieWithTest = await dieWithParentLauncher();

/**
 * `spawn`, with the child tied to this test process (SIGTERM when it dies):
 * tap kills a test file that runs past its time limit without running its
 * teardowns, and daemons and servers it started would otherwise run on.
 */
export function spawnTied(command: string, args: string[], options: ChildSpawnOptions = {}): ChildProcess {
  const [launcher, ...argv] = [...dieWithTest, command, ...args];
  return spawn(launcher!, argv, options);
}

/** A temp directory removed when the test ends. */
export async function tempDir(t: Test, prefix = "shoal-e2e-"): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * A plain loopback nats-server with JetStream storing in `dir`, for tests of
 * the orchestrator's state store that do not involve the fabric (no TLS).
 * nats-server picks its own port (`-p -1`) and the URL is read from its log:
 * a port chosen beforehand (freePort) can be taken by another process's
 * socket before the server binds it, and the server then exits while the
 * caller dials whatever holds the port. Resolves at "Server is ready";
 * rejects with the server's log if it exits first.
 */
export async function startJetStream(t: Test, dir: string, extraArgs: string[] = []): Promise<string> {
  const child = spawnTied("nats-server", ["-js", "-a", "127.0.0.1", "-p", "-1", "-sd", dir, ...extraArgs], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  const exited = new Promise<number | null>((resolve) => child.once("exit", resolve));
  // Awaited: the data directory is removed next, and the server may still be writing to it.
  t.teardown(async () => {
    child.kill("SIGTERM");
    await exited;
  });
  let log = "";
  const ready = new Promise<string>((resolve, reject) => {
    child.stderr!.on("data", (d: Buffer) => {
      log += d;
      const port = /Listening for client connections on [^\s]*:(\d+)/.exec(log)?.[1];
      if (port && /Server is ready/.test(log)) resolve(`127.0.0.1:${port}`);
    });
    void exited.then((code) =>
      reject(new Error(`nats-server exited (${code}) before it was ready:\n${log}`)),
    );
    setTimeout(() => reject(new Error(`nats-server not ready after 60 s:\n${log}`)), 60_000).unref();
  });
  return ready;
}

/** A running `shoal ...` process started from the TypeScript sources. */
export interface ShoalProcess {
  child: ChildProcess;
  /** Everything written to stdout so far. */
  stdout: () => string;
  stderr: () => string;
  /** Resolves with the first stdout+stderr match of `re` (rejects when the process exits first). */
  waitFor: (re: RegExp, timeoutMs?: number) => Promise<RegExpMatchArray>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** The folders compiled into dist/ that the CLI is made of. */
const CLI_SOURCE_DIRS = ["core", "pki", "fabric", "auth", "orchestrator", "compute", "cli"];

/** True when the compiled copy of a source file (relative to the root) is at least as new as it. */
function isBuilt(rel: string): boolean {
  const built = statSync(path.join(ROOT, "dist", rel.replace(/\.ts$/, ".js")), { throwIfNoEntry: false });
  return built !== undefined && built.mtimeMs >= statSync(path.join(ROOT, rel)).mtimeMs;
}

/** True when every source file under `dir` has a compiled copy in dist/ at least as new as itself. */
function isDistFresh(dir: string): boolean {
  return readdirSync(path.join(ROOT, dir), { withFileTypes: true }).every((entry) => {
    const rel = path.join(dir, entry.name);
    if (entry.isDirectory()) return isDistFresh(rel);
    return !entry.name.endsWith(".ts") || entry.name.endsWith(".d.ts") || isBuilt(rel);
  });
}

let cliEntry: string[] | undefined;

const BUILT_CLI = path.join(ROOT, "test", "helpers", "shoal-built.mjs");

/**
 * How spawnShoal starts the CLI: compiled (shoal-built.mjs) when dist/ is at
 * least as new as every source file, else test/helpers/shoal-cli.ts through
 * tap's TypeScript loader. Both run the same code; the loader costs each
 * process about 6x the CPU (seconds per start on a loaded machine, more than
 * half of an e2e test's time). SHOAL_TEST_CLI=sources forces the sources.
 */
function shoalEntry(): string[] {
  cliEntry ??=
    process.env.SHOAL_TEST_CLI !== "sources" && CLI_SOURCE_DIRS.every(isDistFresh)
      ? [BUILT_CLI]
      : ["--import", "@tapjs/typescript/import", path.join(ROOT, "test", "helpers", "shoal-cli.ts")];
  return cliEntry;
}

/**
 * Runs the real CLI (compiled, or from the sources when dist/ is stale: see
 * shoalEntry) as a child process, killed when the test ends.
 */
export function spawnShoal(t: Test, args: string[], env: NodeJS.ProcessEnv = {}): ShoalProcess {
  return spawnNode(t, [...shoalEntry(), ...args], { TS_NODE_TRANSPILE_ONLY: "1", ...env });
}

/**
 * Like {@link spawnShoal} but always runs the compiled CLI (test/helpers/shoal-built.mjs, from dist/:
 * run `npm run build` first). Starts in a fraction of the time, for tests
 * that start many processes on a loaded machine.
 */
export function spawnBuiltShoal(
  t: Test,
  args: string[],
  env: NodeJS.ProcessEnv = {},
  opts: SpawnOptions = {},
): ShoalProcess {
  return spawnNode(t, [BUILT_CLI, ...args], env, opts);
}

/**
 * A launcher like {@link spawnShoal} for the CLI at `entry` (an installed
 * copy, say), started through `opts.prefix` when given.
 */
export function shoalAt(entry: string, opts: SpawnOptions = {}): typeof spawnShoal {
  return (t, args, env = {}) => spawnNode(t, [entry, ...args], env, opts);
}

export interface SpawnOptions {
  /** A launcher that execs node, e.g. `["ip", "netns", "exec", "NS"]`. */
  prefix?: string[];
}

let testHome: string | undefined;

/**
 * One HOME per test process for the CLIs it spawns: their token store (keyed by API
 * URL, and ports are reused across test files running side by side) and client key
 * never touch the real `~/.shoal` or another test file's.
 */
function isolatedHome(): string {
  if (testHome === undefined) {
    const home = mkdtempSync(path.join(os.tmpdir(), "shoal-test-home-"));
    process.once("exit", () => rmSync(home, { recursive: true, force: true }));
    testHome = home;
  }
  return testHome;
}

/**
 * Runs node with `argv`. Without tap's hooks, which tap puts in every child's
 * NODE_OPTIONS however the child's environment is given: they cost each
 * daemon and CLI run about 0.2 s of CPU at start-up (and all of them together
 * a fifth of the suite's time), and they would take the extension-less
 * `bin/shoal` of an installed package for CommonJS.
 */
function spawnNode(t: Test, argv: string[], env: NodeJS.ProcessEnv, opts: SpawnOptions = {}): ShoalProcess {
  const [command, ...launcher] = [
    ...(opts.prefix ?? []),
    "/usr/bin/env",
    "-u",
    "NODE_OPTIONS",
    process.execPath,
  ];
  const child = spawnTied(command!, [...launcher, ...argv], {
    cwd: ROOT,
    env: { ...process.env, HOME: isolatedHome(), SHOAL_CONFIG: "", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  let err = "";
  const listeners = new Set<() => void>();
  child.stdout?.on("data", (d: Buffer) => {
    out += d.toString();
    for (const l of listeners) l();
  });
  child.stderr?.on("data", (d: Buffer) => {
    err += d.toString();
    for (const l of listeners) l();
  });
  let done = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once("exit", (code, signal) => {
      done = true;
      resolve({ code, signal });
      for (const l of listeners) l();
    });
  });
  t.teardown(async () => {
    if (!done) {
      child.kill("SIGKILL");
      await exited;
    }
  });
  const waitFor = (re: RegExp, timeoutMs = 60_000) =>
    new Promise<RegExpMatchArray>((resolve, reject) => {
      const check = () => {
        const m = (out + err).match(re);
        if (m) {
          listeners.delete(check);
          clearTimeout(timer);
          resolve(m);
        } else if (done) {
          listeners.delete(check);
          clearTimeout(timer);
          reject(new Error(`process exited before ${re}:\n${out}\n${err.slice(-4000)}`));
        }
      };
      const timer = setTimeout(() => {
        listeners.delete(check);
        reject(new Error(`timed out waiting for ${re}:\n${out}\n${err.slice(-4000)}`));
      }, timeoutMs);
      listeners.add(check);
      check();
    });
  return { child, stdout: () => out, stderr: () => err, waitFor, exited };
}

/** Runs a `shoal ...` command to completion. */
export async function runShoal(
  t: Test,
  args: string[],
  env: NodeJS.ProcessEnv = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const p = spawnShoal(t, args, env);
  const { code } = await p.exited;
  return { code, stdout: p.stdout(), stderr: p.stderr() };
}

/** An orchestrator started by `startOrchestrator`, with what clients need to reach it. */
export interface OrchestratorHandle {
  proc: ShoalProcess;
  dataDir: string;
  pkiDir: string;
  pki: Pki;
  ca: string;
  apiPort: number;
  natsPort: number;
  /** `--api URL --ca-cert CA` for CLI calls. */
  api: string[];
  /** An in-process API client acting as the first admin, for a test's own checks and waits (a CLI process per poll costs seconds). */
  client: ApiClient;
  /** A token of the first admin (password {@link TEST_ADMIN_PASSWORD}); give it to the CLI as SHOAL_TOKEN. */
  adminToken: () => Promise<string>;
}

/** The first admin's password of orchestrators started by {@link startOrchestrator}. */
export const TEST_ADMIN_PASSWORD = "test-admin-password";

/**
 * Starts `shoal orchestrator serve` on loopback with both ports chosen by the
 * kernel (read back from its banner, so parallel tests never race for a port).
 */
export async function startOrchestrator(
  t: Test,
  dataDir: string,
  extra: string[] = [],
  env: NodeJS.ProcessEnv = {},
  launch: typeof spawnShoal = spawnShoal,
): Promise<OrchestratorHandle> {
  const base = ["-c", "API.Host=127.0.0.1", "-c", "API.Port=0", "-c", "Orchestrator.Host=127.0.0.1"];
  const ports = ["-c", "Orchestrator.Port=0", "-c", "Logging.Level=warn"];
  const proc = launch(t, ["orchestrator", "serve", "--data-dir", dataDir, ...base, ...ports, ...extra], {
    SHOAL_ADMIN_PASSWORD: TEST_ADMIN_PASSWORD,
    ...env,
  });
  // Registered after spawnShoal's own teardown, so it runs first (tap runs them last in, first out).
  t.teardown(async () => {
    // A failed test shows what the daemon logged last (warnings and errors), routes' chatter left out.
    if (!t.passing()) {
      const lines = proc.stderr().split("\n");
      t.comment(
        `orchestrator ${path.basename(dataDir)}:\n${lines
          .filter((l) => !/route|routing/.test(l))
          .slice(-40)
          .join("\n")}`,
      );
    }
    if (proc.child.exitCode === null && proc.child.signalCode === null) {
      proc.child.kill("SIGKILL");
      await proc.exited;
    }
    await killLeftoverNats(dataDir);
  });
  // Generous: first start mints a PKI, and a loaded 2-core CI machine is slow to spawn.
  const apiPort = Number((await proc.waitFor(/API:\s+https:\/\/\S+:(\d+)/, 90_000))[1]);
  const natsPort = Number((await proc.waitFor(/NATS \(mTLS\):\s+tls:\/\/\S+:(\d+)/))[1]);
  const pkiDir = path.join(dataDir, "pki");
  const ca = path.join(pkiDir, "ca.crt");
  const url = `https://127.0.0.1:${apiPort}`;
  const api = ["--api", url, "--ca-cert", ca];
  let token: Promise<string> | undefined;
  const adminToken = () => {
    token ??= fs.readFile(ca, "utf8").then(
      (caPem) =>
        new Promise<string>((resolve, reject) => {
          const body = JSON.stringify({ username: "admin", password: TEST_ADMIN_PASSWORD });
          const req = https.request(
            `https://127.0.0.1:${apiPort}/api/v1/auth/password`,
            {
              method: "POST",
              ca: caPem,
              headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) },
            },
            (res) => {
              let text = "";
              res.on("data", (d: Buffer) => {
                text += d.toString();
              });
              res.on("end", () =>
                res.statusCode === 201
                  ? resolve(JSON.parse(text).Token)
                  : reject(new Error(`admin login: ${res.statusCode} ${text}`)),
              );
            },
          );
          req.on("error", reject);
          req.end(body);
        }),
    );
    // A failed login is tried again at the next call (an orchestrator whose store was down).
    token.catch(() => {
      token = undefined;
    });
    return token;
  };
  const client = await ApiClient.create({ url, caFile: ca, token: adminToken });
  t.teardown(() => client.close());
  return {
    proc,
    dataDir,
    pkiDir,
    pki: await openPki(pkiDir),
    ca,
    apiPort,
    natsPort,
    api,
    client,
    adminToken,
  };
}

/**
 * Kills the nats-server an orchestrator started in `dataDir`, if it still
 * runs: a SIGKILLed orchestrator cannot stop its child, which would outlive
 * the test holding a port and the JetStream store.
 */
export async function killLeftoverNats(dataDir: string): Promise<void> {
  const natsDir = path.join(dataDir, "nats");
  const pid = Number(await fs.readFile(path.join(natsDir, "nats-server.pid"), "utf8").catch(() => ""));
  if (!Number.isInteger(pid) || pid <= 0) return;
  const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
  if (cmdline.includes(path.join(natsDir, "nats.conf"))) process.kill(pid, "SIGKILL");
}

/** Polls `check` every `everyMs` until it returns a value other than undefined; throws `what` after `timeoutMs`. */
export async function waitUntil<T>(
  what: string,
  check: () => Promise<T | undefined>,
  timeoutMs = 30_000,
  everyMs = 100,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/**
 * `compute serve` of a node with an identity from files (by default
 * DATA-DIR/identity.crt and .key, where {@link startComputeNode} issues it):
 * the arguments, to which a caller appends its own `-c` overrides.
 */
export function computeServeArgs(o: {
  dataDir: string;
  /** `--orchestrators`: the broker URL(s). */
  servers: string;
  caFile: string;
  certFile?: string;
  keyFile?: string;
}): string[] {
  const prefix = path.join(o.dataDir, "identity");
  return [
    "compute",
    "serve",
    "--data-dir",
    o.dataDir,
    "--orchestrators",
    o.servers,
    "-c",
    `Compute.TLS.CACert=${o.caFile}`,
    "-c",
    `Compute.TLS.ClientCert=${o.certFile ?? `${prefix}.crt`}`,
    "-c",
    `Compute.TLS.ClientKey=${o.keyFile ?? `${prefix}.key`}`,
  ];
}

/**
 * Issues a compute identity from the orchestrator's PKI (unless DATA-DIR/identity.crt
 * exists already), starts `shoal compute
 * serve` with it and resolves once the orchestrator lists the node HEALTHY and
 * APPROVED (asked in-process every 100 ms; a process starts slowly on a
 * loaded machine, hence the minute).
 */
export async function startComputeNode(
  t: Test,
  orch: OrchestratorHandle,
  dataDir: string,
  id: string,
  extra: string[] = [],
  launch: typeof spawnShoal = spawnShoal,
): Promise<ShoalProcess> {
  const prefix = path.join(dataDir, "identity");
  await fs.mkdir(dataDir, { recursive: true });
  // A test may issue it first (e.g. to let an operator-run server learn the identity before the node dials).
  const issued = await fs.access(`${prefix}.crt`).then(
    () => true,
    () => false,
  );
  if (!issued) await writeIssued(prefix, await orch.pki.issue({ role: "compute", id }));
  const node = launch(t, [
    ...computeServeArgs({ dataDir, servers: `tls://127.0.0.1:${orch.natsPort}`, caFile: orch.ca }),
    "-c",
    "Logging.Level=warn",
    ...extra,
  ]);
  await waitUntil(
    `compute ${id} is HEALTHY and APPROVED`,
    async () => {
      if (node.child.exitCode !== null) throw new Error(`compute ${id} exited:\n${node.stderr()}`);
      const { Items } = await orch.client.get<{ Items: { ID: string; Health: string; Approval: string }[] }>(
        "/api/v1/orchestrator/nodes",
      );
      return Items.some((n) => n.ID === id && n.Health === "HEALTHY" && n.Approval === "APPROVED")
        ? true
        : undefined;
    },
    60_000,
  ).catch((err: Error) => {
    throw new Error(`${err.message}\n${node.stderr()}`);
  });
  return node;
}

/**
 * Clustered orchestrators, one per name, with data directories `root/<name>`
 * (three keep JetStream's quorum with one of them gone; two cannot). They
 * share one PKI, copied into each data directory before the first start, as
 * docs/orchestrator.md tells operators; `prepare` runs first, on the
 * directories (to mount one, say). `args(i)` adds settings to the i-th.
 * Resolves once the first has printed its cluster banner.
 */
export async function startOrchestratorCluster<N extends string>(
  t: Test,
  root: string,
  names: readonly N[],
  args: (i: number) => string[] = () => [],
  prepare: (dirs: string[]) => Promise<void> = async () => {},
): Promise<Record<N, OrchestratorHandle>> {
  const shared = path.join(root, "pki");
  await initPki(shared, { trustDomain: "shoal.local" });
  const dirs = names.map((n) => path.join(root, n));
  await prepare(dirs);
  for (const dir of dirs) await fs.cp(shared, path.join(dir, "pki"), { recursive: true });
  // JetStream clustering needs every server's routes configured up front.
  const ports: number[] = [];
  for (const _ of dirs) ports.push(await freePort());
  const clusterArgs = (i: number) => [
    ...["-c", "Orchestrator.Cluster.Name=shoal-test", "-c", "Orchestrator.Cluster.Host=127.0.0.1"],
    ...["-c", `Orchestrator.Cluster.Port=${ports[i]}`],
    ...["-c", `Orchestrator.Cluster.Peers=${ports.filter((_, j) => j !== i).map((p) => `127.0.0.1:${p}`)}`],
    ...args(i),
  ];
  const started = await Promise.all(dirs.map((dir, i) => startOrchestrator(t, dir, clusterArgs(i))));
  // Printed just after the API line startOrchestrator waits for: it may not be read yet.
  await started[0]!.proc.waitFor(new RegExp(`cluster shoal-test, ${names.length} copies`));
  return Object.fromEntries(names.map((n, i) => [n, started[i]!])) as Record<N, OrchestratorHandle>;
}

/** Whether a process runs `sleep ARG` (a zombie, whose command line is empty, does not). */
export async function sleepRunning(arg: string): Promise<boolean> {
  const pids = (await fs.readdir("/proc")).filter((name) => /^\d+$/.test(name));
  const lines = await Promise.all(
    pids.map((pid) => fs.readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "")),
  );
  return lines.some((line) => line.endsWith(`sleep\0${arg}\0`));
}
