/**
 * Revocation latency with real processes: `shoal orchestrator serve` and
 * `shoal compute serve` children; for each node, the time from sending
 * `DELETE /api/v1/orchestrator/nodes/{id}` (what `shoal node delete` sends)
 * to the API's answer, to the node logging its disconnection (its own log
 * clock, same machine), and to the node's process exiting. Beside it, in the
 * same run, the floor: a bare nats-server reload that drops one user, timed
 * from setIdentities() to that client seeing the disconnection. Target ≤ 2 s.
 *
 *   npm run build && npm run bench:revocation [-- NODES=3]
 */
import "reflect-metadata";
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { ApiClient } from "../cli/api-client.js";
import { connectFabric } from "../fabric/index.js";
import { openPki, writeIssued } from "../pki/index.js";
import { startTestFabric } from "../test/helpers/nats.js";

const NODES = Number(process.argv[2] ?? 3);
const ROOT = path.resolve(import.meta.dirname, "..");
const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-bench-revocation-"));
const cleanups: (() => unknown)[] = [];
const adminPassword = randomBytes(18).toString("base64url");

interface Child {
  proc: ChildProcess;
  lines: string[];
  next: (re: RegExp, timeoutMs?: number) => Promise<string>;
  exited: Promise<number>;
}

/** `shoal ARGS` (the compiled CLI: run `npm run build` first), its stdout+stderr lines collected. */
function shoal(args: string[], env: NodeJS.ProcessEnv = {}): Child {
  const proc = spawn(process.execPath, [path.join(ROOT, "bin", "shoal"), ...args], {
    cwd: ROOT,
    env: { ...process.env, SHOAL_CONFIG: "", ...env },
  });
  const lines: string[] = [];
  const waiters = new Set<() => void>();
  for (const s of [proc.stdout, proc.stderr]) {
    createInterface({ input: s! }).on("line", (l) => {
      lines.push(l);
      for (const w of waiters) w();
    });
  }
  const exited = new Promise<number>((r) => proc.once("exit", () => r(Date.now())));
  cleanups.push(() => proc.kill("SIGKILL"));
  const next = (re: RegExp, timeoutMs = 120_000) =>
    new Promise<string>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`no ${re} from shoal ${args[0]}:\n${lines.join("\n")}`)),
        timeoutMs,
      );
      const check = () => {
        const hit = lines.find((l) => re.test(l));
        if (!hit) return;
        waiters.delete(check);
        clearTimeout(timer);
        resolve(hit);
      };
      waiters.add(check);
      check();
    });
  return { proc, lines, next, exited };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? Number.NaN;

try {
  // The floor: nats-server alone, one reload without the user.
  const fabric = await startTestFabric({ teardown: (fn) => cleanups.push(fn) }, { jetStream: false });
  const floor: number[] = [];
  for (let i = 0; i < 5; i++) {
    const id = await fabric.identity("compute", `f${i}`);
    const conn = await connectFabric({
      servers: fabric.url,
      caFile: fabric.caFile,
      certFile: id.certFile,
      keyFile: id.keyFile,
      identity: id.spiffeId,
    });
    await conn.flush();
    const disconnected = (async () => {
      for await (const st of conn.status()) if (st.type === "disconnected") return Date.now();
      return Date.now();
    })();
    const t0 = Date.now();
    fabric.identities = fabric.identities.filter((x) => x.spiffeId !== id.spiffeId);
    void fabric.supervisor.setIdentities(fabric.identities);
    floor.push((await disconnected) - t0);
    await conn.close();
  }

  const orch = shoal(
    [
      "orchestrator",
      "serve",
      "--data-dir",
      path.join(dir, "orch"),
      ...["-c", "API.Host=127.0.0.1", "-c", "API.Port=0", "-c", "Orchestrator.Host=127.0.0.1"],
      ...["-c", "Orchestrator.Port=0", "-c", "Logging.Level=warn"],
    ],
    { SHOAL_ADMIN_PASSWORD: adminPassword },
  );
  const apiPort = Number(/:(\d+)$/.exec((await orch.next(/^\s+API:\s+https:/)).trim())?.[1]);
  const natsPort = Number(/:(\d+)$/.exec((await orch.next(/^\s+NATS \(mTLS\):/)).trim())?.[1]);
  const pkiDir = path.join(dir, "orch", "pki");
  const ca = path.join(pkiDir, "ca.crt");
  const pki = await openPki(pkiDir);
  // Deleting a node takes an admin: log in as the first admin, bootstrapped from SHOAL_ADMIN_PASSWORD.
  const url = `https://127.0.0.1:${apiPort}`;
  const login = await ApiClient.create({ url, caFile: ca });
  const { Token } = await login.request<{ Token: string }>("POST", "/api/v1/auth/password", {
    body: { username: "admin", password: adminPassword },
  });
  login.close();
  const api = await ApiClient.create({ url, caFile: ca, token: () => Token });
  cleanups.push(() => api.close());

  const nodes: { id: string; child: Child }[] = [];
  for (let i = 0; i < NODES; i++) {
    const id = `bench-${i}`;
    const prefix = path.join(dir, id, "identity");
    await fs.mkdir(path.dirname(prefix), { recursive: true });
    await writeIssued(prefix, await pki.issue({ role: "compute", id }));
    const child = shoal([
      "compute",
      "serve",
      "--data-dir",
      path.join(dir, id),
      "--orchestrators",
      `tls://127.0.0.1:${natsPort}`,
      ...["-c", `Compute.TLS.CACert=${ca}`, "-c", `Compute.TLS.ClientCert=${prefix}.crt`],
      ...["-c", `Compute.TLS.ClientKey=${prefix}.key`, "-c", "Logging.Level=info"],
    ]);
    nodes.push({ id, child });
  }
  for (const n of nodes) await n.child.next(/"compute node started"/);
  for (let i = 0; i < 600; i++) {
    const { Items } = await api.get<{ Items: { ID: string; Health: string }[] }>(
      "/api/v1/orchestrator/nodes",
    );
    if (Items.filter((n) => n.Health === "HEALTHY").length === NODES) break;
    await new Promise((r) => setTimeout(r, 100));
  }

  const rows: { id: string; answer: number; disconnect: number; exit: number }[] = [];
  for (const n of nodes) {
    const t0 = Date.now();
    await api.request("DELETE", `/api/v1/orchestrator/nodes/${n.id}`);
    const answer = Date.now() - t0;
    const line = await n.child.next(/"disconnected from the fabric"/);
    const disconnect = Date.parse((JSON.parse(line) as { time: string }).time) - t0;
    const exit = (await n.child.exited) - t0;
    if (!n.child.lines.some((l) => l.includes("SHOAL_NATS_AUTHORIZATION"))) {
      throw new Error(`${n.id} stopped without SHOAL_NATS_AUTHORIZATION:\n${n.child.lines.join("\n")}`);
    }
    rows.push({ id: n.id, answer, disconnect, exit });
  }

  console.log(`revocation: ${NODES} compute processes, load ${os.loadavg()[0]!.toFixed(1)}`);
  console.log("node        delete→API answer  delete→disconnected  delete→process exit");
  for (const r of rows) {
    console.log(
      `${r.id.padEnd(12)}${`${r.answer} ms`.padStart(17)}${`${r.disconnect} ms`.padStart(21)}${`${r.exit} ms`.padStart(21)}`,
    );
  }
  const disc = median(rows.map((r) => r.disconnect));
  const base = median(floor);
  console.log(
    `median delete→disconnected: ${disc} ms (target ≤ 2000 ms: ${disc <= 2000 ? "met" : "MISSED"})`,
  );
  console.log(`floor, bare nats-server reload dropping a user → client disconnected: median ${base} ms`);
  console.log(`ratio delete→disconnected / bare reload: ${(disc / base).toFixed(2)}`);
} finally {
  for (const c of cleanups.reverse()) await Promise.resolve(c()).catch(() => {});
  await fs.rm(dir, { recursive: true, force: true });
}
