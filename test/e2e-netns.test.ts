import "reflect-metadata";
import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import t, { type Test } from "tap";
import { openPki, writeIssued } from "../pki/index.js";
import { spawnBuiltShoal, tempDir } from "./helpers/cluster.js";

/**
 * Two hosts made of network namespaces joined by a veth pair: the orchestrator
 * in one (10.77.0.1), a compute node in the other (10.77.0.2) dialing the
 * orchestrator's namespace address. Needs root and `ip netns` (skipped otherwise) and
 * the compiled CLI (`npm run build`).
 */
const run = promisify(execFile);
const tag = `${process.pid % 100000}`;
const ORCH_NS = `shoal-o${tag}`;
const NODE_NS = `shoal-c${tag}`;
const ORCH_IP = "10.77.0.1";
const NODE_IP = "10.77.0.2";

async function ip(...args: string[]): Promise<void> {
  await run("ip", args);
}

async function whyNot(): Promise<string | undefined> {
  if (process.getuid?.() !== 0) return "needs root to create network namespaces";
  try {
    await ip("netns", "add", `${ORCH_NS}-probe`);
    await ip("netns", "del", `${ORCH_NS}-probe`);
  } catch (err) {
    return `ip netns is unavailable: ${(err as Error).message.split("\n")[0]}`;
  }
  return undefined;
}

const skip = await whyNot();
if (skip) {
  t.plan(0, `multi-host test in network namespaces skipped: ${skip}`);
} else {
  t.setTimeout(240_000); // four shoal processes on a busy machine
  // The "wire": two namespaces, a veth pair between them.
  t.teardown(async () => {
    await ip("netns", "del", ORCH_NS).catch(() => {});
    await ip("netns", "del", NODE_NS).catch(() => {});
  });
  await ip("netns", "add", ORCH_NS);
  await ip("netns", "add", NODE_NS);
  await ip("link", "add", `sho${tag}`, "type", "veth", "peer", "name", `shc${tag}`);
  await ip("link", "set", `sho${tag}`, "netns", ORCH_NS);
  await ip("link", "set", `shc${tag}`, "netns", NODE_NS);
  await ip("-n", ORCH_NS, "addr", "add", `${ORCH_IP}/24`, "dev", `sho${tag}`);
  await ip("-n", NODE_NS, "addr", "add", `${NODE_IP}/24`, "dev", `shc${tag}`);
  for (const [ns, dev] of [
    [ORCH_NS, `sho${tag}`],
    [NODE_NS, `shc${tag}`],
  ] as const) {
    await ip("-n", ns, "link", "set", "lo", "up");
    await ip("-n", ns, "link", "set", dev, "up");
  }
  const dir = await tempDir(t);

  /** `shoal orchestrator serve` inside the orchestrator namespace, listening on every address there. */
  const orchestrator = async (t: Test, name: string, extra: string[]) => {
    const dataDir = path.join(dir, name);
    const proc = spawnBuiltShoal(
      t,
      [
        "orchestrator",
        "serve",
        "--data-dir",
        dataDir,
        ...["-c", "API.Host=127.0.0.1", "-c", "API.Port=0", "-c", "Orchestrator.Host=0.0.0.0"],
        ...["-c", "Orchestrator.Port=0", "-c", "Logging.Level=info", ...extra],
      ],
      {},
      { prefix: ["ip", "netns", "exec", ORCH_NS] },
    );
    const port = Number((await proc.waitFor(/NATS \(mTLS\):\s+tls:\/\/\S+:(\d+)/, 90_000))[1]);
    return { proc, port, pkiDir: path.join(dataDir, "pki") };
  };

  /** `shoal compute serve` inside the node namespace, dialing tls://10.77.0.1:port. */
  const computeNode = async (t: Test, orch: { port: number; pkiDir: string }, id: string) => {
    const prefix = path.join(dir, id);
    await writeIssued(prefix, await (await openPki(orch.pkiDir)).issue({ role: "compute", id }));
    return spawnBuiltShoal(
      t,
      [
        "compute",
        "serve",
        "--data-dir",
        path.join(dir, `${id}-data`),
        "--orchestrators",
        `tls://${ORCH_IP}:${orch.port}`,
        ...["-c", `Compute.TLS.CACert=${path.join(orch.pkiDir, "ca.crt")}`],
        ...["-c", `Compute.TLS.ClientCert=${prefix}.crt`, "-c", `Compute.TLS.ClientKey=${prefix}.key`],
        ...["-c", "Logging.Level=info"],
      ],
      {},
      { prefix: ["ip", "netns", "exec", NODE_NS] },
    );
  };

  t.test("with Orchestrator.Advertise set to its address, a node on the other host joins", async (t) => {
    const orch = await orchestrator(t, "advertised", ["-c", `Orchestrator.Advertise=${ORCH_IP}`]);
    const node = await computeNode(t, orch, "edge-a");
    await node.waitFor(/"compute node started"/, 90_000);
    await orch.proc.waitFor(/"node":"edge-a".*"node registered"/, 30_000);
    t.pass("edge-a registered over mTLS across the namespaces");
  });

  t.test(
    "without the address in the server certificate, the node's error names it and the SANs",
    async (t) => {
      const orch = await orchestrator(t, "unadvertised", []);
      const node = await computeNode(t, orch, "edge-b");
      const { code } = await node.exited;
      t.not(code, 0, "the node stops");
      const err = node.stderr() + node.stdout();
      t.match(err, /SHOAL_TLS_SAN_MISMATCH/);
      t.match(err, new RegExp(ORCH_IP.replace(/\./g, "\\.")), "names the dialed address");
      t.match(err, /localhost/, "lists the certificate's SANs");
      t.match(err, /127\.0\.0\.1/);
      t.match(err, /Orchestrator\.Advertise|--ip/, "and says how to fix it");
    },
  );
}
