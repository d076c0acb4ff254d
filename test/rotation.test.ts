import "reflect-metadata";
import { X509Certificate } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import { writeIssued } from "../pki/index.js";
import { runShoal, spawnShoal, startOrchestrator, tempDir } from "./helpers/cluster.js";

/**
 * Certificate rotation with real processes: an orchestrator whose PKI issues
 * 20-second certificates (PKI.CertTTL=20s), a compute node running a 40 s exec
 * job. The node renews (new key, same identity) and reconnects several times
 * while the job runs; the job completes, the node is never LOST, its old keys
 * are gone from disk. The orchestrator renews its NATS server certificate and
 * reloads nats-server (same process) while the node stays registered.
 */

// Three real processes and a 40 s job on a loaded machine.
t.setTimeout(300_000);

const serialOf = async (file: string) => new X509Certificate(await fs.readFile(file)).serialNumber;

async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await fs.readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) out.push(path.join(e.parentPath, e.name));
  }
  return out;
}

t.test("a node rotates its 20 s certificate while a job runs, and keeps its registration", async (t) => {
  const dir = await tempDir(t);
  const orch = await startOrchestrator(t, path.join(dir, "orch"), [
    "-c",
    "PKI.CertTTL=20s",
    "-c",
    "PKI.RenewBefore=7s",
  ]);
  const natsCert = path.join(orch.dataDir, "nats", "server.crt");
  const natsSerial0 = await serialOf(natsCert);
  const natsPid = (await fs.readFile(path.join(orch.dataDir, "nats", "nats-server.pid"), "utf8")).trim();

  // The first certificate outlives a slow start; the node (RenewBefore 10m) renews it at once,
  // then every ~13 s (two thirds of the orchestrator's 20 s TTL).
  const nodeDir = path.join(dir, "n1");
  const prefix = path.join(nodeDir, "tls", "node");
  await fs.mkdir(path.dirname(prefix), { recursive: true });
  const now = Date.now();
  const first = await orch.pki.issue({
    role: "compute",
    id: "n1",
    notBefore: new Date(now - 3_600_000),
    notAfter: new Date(now + 180_000),
  });
  await writeIssued(prefix, first);
  const node = spawnShoal(t, [
    "compute",
    "serve",
    "--data-dir",
    nodeDir,
    "--orchestrators",
    `tls://127.0.0.1:${orch.natsPort}`,
    "-c",
    `Compute.TLS.CACert=${orch.ca}`,
    "-c",
    "Compute.Engines.Exec.Allow=/bin/sleep",
    "-c",
    "PKI.CertTTL=1h",
    "-c",
    "PKI.RenewBefore=10m",
    "-c",
    "Logging.Level=info",
  ]);

  const serials = new Set<string>([first.serial]);
  const health: string[] = [];
  const watchNode = async () => {
    const r = await runShoal(t, ["node", "list", "--output", "json", ...orch.api]);
    const n = (JSON.parse(r.stdout || "[]") as { ID: string; Health: string }[]).find((x) => x.ID === "n1");
    if (n) health.push(n.Health);
    const serial = await serialOf(`${prefix}.crt`).catch(() => undefined);
    if (serial) serials.add(serial.toLowerCase());
    return n;
  };
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline && (await watchNode())?.Health !== "HEALTHY") {
    if (node.child.exitCode !== null) throw new Error(`node exited:\n${node.stderr()}`);
    await new Promise((r) => setTimeout(r, 500));
  }

  t.comment(`node registered: ${health.join(",")}`);
  const spec = path.join(dir, "sleep.yaml");
  await fs.writeFile(
    spec,
    [
      "Name: long-sleep",
      "Tasks:",
      "  - Name: main",
      "    Engine:",
      "      Type: exec",
      "      Params:",
      "        Command: /bin/sleep",
      '        Arguments: ["40"]',
      "    Timeouts:",
      "      ExecutionTimeout: 120s",
      "",
    ].join("\n"),
  );
  const job = runShoal(t, ["job", "run", spec, "--wait", "--output", "json", ...orch.api]);
  let done = false;
  void job.then(() => {
    done = true;
  });
  // The 40 s job, with time for a loaded machine; then the daemons say what happened.
  const jobDeadline = Date.now() + 150_000;
  while (!done && Date.now() < jobDeadline) {
    await watchNode();
    await new Promise((r) => setTimeout(r, 1000));
  }
  if (!done) {
    const list = await runShoal(t, ["job", "list", "--output", "json", ...orch.api]);
    throw new Error(
      `the job did not finish in 150 s; jobs: ${list.stdout}\nnode stderr (tail):\n${node.stderr().slice(-6000)}\norchestrator stderr (tail):\n${orch.proc.stderr().slice(-6000)}`,
    );
  }
  const r = await job;
  t.equal(r.code, 0, r.stderr);
  const result = JSON.parse(r.stdout);
  t.equal(result.State, "Completed", JSON.stringify(result.Executions));
  // A bid sent while the node reconnects after a renewal goes unanswered and is asked again
  // (marked Unanswered, not Lost): the job still runs once, on n1.
  const ran = result.Executions.filter((e: { Unanswered?: boolean }) => !e.Unanswered);
  t.equal(ran.length, 1, "one execution ran: never lost and rescheduled");
  t.equal(ran[0].NodeID, "n1");
  t.notOk(
    result.Executions.some((e: { State: string }) => e.State === "Lost"),
    "no execution lost",
  );

  await watchNode();
  t.ok(serials.size >= 3, `the certificate serial changed while the job ran (${serials.size} serials seen)`);
  t.notOk(health.includes("LOST"), `never LOST (${[...new Set(health)].join(", ")})`);
  t.ok(health.length >= 3, `the node was watched throughout (${health.length} looks)`);
  t.match(node.stderr(), /certificate renewed with a new key/);

  // The old keys are gone: neither the first key nor any file holding it remains.
  const keyNow = await fs.readFile(`${prefix}.key`, "utf8");
  t.not(keyNow, first.keyPem, "the key file holds a new key");
  t.equal((await fs.stat(`${prefix}.key`)).mode & 0o777, 0o600, "the key is 0600");
  for (const f of await filesUnder(nodeDir)) {
    const text = await fs.readFile(f, "utf8").catch(() => "");
    if (text.includes(first.keyPem!.trim())) t.fail(`the first key survives in ${f}`);
  }
  // A renewal may be under way right now (one every ~13 s): its staged files go within moments.
  const staged = async () => (await fs.readdir(path.dirname(prefix))).filter((f) => f.endsWith(".new"));
  for (let i = 0; i < 50 && (await staged()).length > 0; i++) await new Promise((r) => setTimeout(r, 200));
  t.same(await staged(), [], "no staged files left");

  // The orchestrator renewed its NATS server certificate and reloaded the same nats-server.
  t.not(await serialOf(natsCert), natsSerial0, "the NATS server certificate was renewed");
  const pidNow = (await fs.readFile(path.join(orch.dataDir, "nats", "nats-server.pid"), "utf8")).trim();
  t.equal(pidNow, natsPid, "nats-server was reloaded, not restarted");
  t.equal(node.child.exitCode, null, "the node still runs");
});
