import { type ChildProcess, spawn } from "node:child_process";
import { promises as fs } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { connect } from "@nats-io/transport-node";
import type { Test } from "tap";
import { openPki, type Pki, writeIssued } from "../../pki/index.js";

const ROOT = path.resolve(import.meta.dirname, "..", "..");

/** A free loopback TCP port. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
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
 */
export async function startJetStream(t: Test, dir: string): Promise<string> {
  const port = await freePort();
  const child = spawn("nats-server", ["-js", "-a", "127.0.0.1", "-p", String(port), "-sd", dir], {
    stdio: "ignore",
  });
  t.teardown(() => {
    child.kill("SIGTERM");
  });
  const url = `127.0.0.1:${port}`;
  for (let i = 0; i < 200; i++) {
    const nc = await connect({ servers: url, reconnect: false }).catch(() => undefined);
    if (nc) {
      await nc.close();
      return url;
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error("nats-server did not start");
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

/**
 * Runs the real CLI (test/helpers/shoal-cli.ts, i.e. bin/shoal from the
 * sources, through the TypeScript loader tap uses) as a child process,
 * killed when the test ends.
 */
export function spawnShoal(t: Test, args: string[], env: NodeJS.ProcessEnv = {}): ShoalProcess {
  const cli = ["--import", "@tapjs/typescript/import", path.join(ROOT, "test", "helpers", "shoal-cli.ts")];
  return spawnNode(t, [...cli, ...args], { TS_NODE_TRANSPILE_ONLY: "1", ...env });
}

/**
 * Like {@link spawnShoal} but runs the compiled CLI (test/helpers/shoal-built.mjs, from dist/:
 * run `npm run build` first). Starts in a fraction of the time, for tests
 * that start many processes on a loaded machine.
 */
export function spawnBuiltShoal(t: Test, args: string[], env: NodeJS.ProcessEnv = {}): ShoalProcess {
  return spawnNode(t, [path.join(ROOT, "test", "helpers", "shoal-built.mjs"), ...args], env);
}

function spawnNode(t: Test, argv: string[], env: NodeJS.ProcessEnv): ShoalProcess {
  const child = spawn(process.execPath, argv, {
    cwd: ROOT,
    env: { ...process.env, SHOAL_CONFIG: "", ...env },
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
}

/**
 * Starts `shoal orchestrator serve` on loopback with both ports chosen by the
 * kernel (read back from its banner, so parallel tests never race for a port).
 */
export async function startOrchestrator(
  t: Test,
  dataDir: string,
  extra: string[] = [],
  env: NodeJS.ProcessEnv = {},
): Promise<OrchestratorHandle> {
  const base = ["-c", "API.Host=127.0.0.1", "-c", "API.Port=0", "-c", "Orchestrator.Host=127.0.0.1"];
  const ports = ["-c", "Orchestrator.Port=0", "-c", "Logging.Level=warn"];
  const proc = spawnShoal(
    t,
    ["orchestrator", "serve", "--data-dir", dataDir, ...base, ...ports, ...extra],
    env,
  );
  // Generous: first start mints a PKI, and a loaded 2-core CI machine is slow to spawn.
  const apiPort = Number((await proc.waitFor(/API:\s+https:\/\/\S+:(\d+)/, 90_000))[1]);
  const natsPort = Number((await proc.waitFor(/NATS \(mTLS\):\s+tls:\/\/\S+:(\d+)/))[1]);
  const pkiDir = path.join(dataDir, "pki");
  const ca = path.join(pkiDir, "ca.crt");
  const api = ["--api", `https://127.0.0.1:${apiPort}`, "--ca-cert", ca];
  return { proc, dataDir, pkiDir, pki: await openPki(pkiDir), ca, apiPort, natsPort, api };
}

/**
 * Issues a compute identity from the orchestrator's PKI, starts `shoal compute
 * serve` with it and resolves once the orchestrator lists the node HEALTHY and
 * APPROVED.
 */
export async function startComputeNode(
  t: Test,
  orch: OrchestratorHandle,
  dataDir: string,
  id: string,
  extra: string[] = [],
): Promise<ShoalProcess> {
  const prefix = path.join(dataDir, "identity");
  await fs.mkdir(dataDir, { recursive: true });
  await writeIssued(prefix, await orch.pki.issue({ role: "compute", id }));
  const node = spawnShoal(t, [
    "compute",
    "serve",
    "--data-dir",
    dataDir,
    "--orchestrators",
    `tls://127.0.0.1:${orch.natsPort}`,
    "-c",
    `Compute.TLS.CACert=${orch.ca}`,
    "-c",
    `Compute.TLS.ClientCert=${prefix}.crt`,
    "-c",
    `Compute.TLS.ClientKey=${prefix}.key`,
    "-c",
    "Logging.Level=warn",
    ...extra,
  ]);
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    const list = await runShoal(t, ["node", "list", "--output", "json", ...orch.api]);
    const nodes = JSON.parse(list.stdout || "[]") as { ID: string; Health: string; Approval: string }[];
    if (nodes.some((n) => n.ID === id && n.Health === "HEALTHY" && n.Approval === "APPROVED")) return node;
    if (node.child.exitCode !== null) throw new Error(`compute ${id} exited:\n${node.stderr()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`compute ${id} was not HEALTHY and APPROVED within 30 s:\n${node.stderr()}`);
}
