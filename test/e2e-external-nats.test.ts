import "reflect-metadata";
import type { ChildProcess } from "node:child_process";
import { promises as fs } from "node:fs";
import path from "node:path";
import { createInterface } from "node:readline";
import { jetstreamManager } from "@nats-io/jetstream";
import t, { type Test } from "tap";
import { loadConfig, silentLogger } from "../core/index.js";
import { checkExternalNatsConfig, connectExternalNats } from "../orchestrator/external-nats.js";
import { initPki, openPki, writeIssued } from "../pki/index.js";
import {
  computeServeArgs,
  freePort,
  spawnShoal,
  spawnTied,
  startComputeNode,
  startOrchestrator,
  TEST_ADMIN_PASSWORD,
  tempDir,
  waitUntil,
} from "./helpers/cluster.js";
import { getJob, submitJob, waitForJob, wasmEngine, writeSpec } from "./helpers/e2e-jobs.js";

const HELLO_WASM = path.resolve(import.meta.dirname, "..", "dist", "wasm", "hello.wasm");
const AUTH_FILE = "nats-external-authorization.conf";
/** nats-server 2.9.10 resolves `include` relative to the including file's directory, even an absolute path. */
const INCLUDE = `data/${AUTH_FILE}`;

/** An operator-run nats-server (not supervised by Shoal): its own config file, port chosen by the kernel. */
interface OperatorServer {
  url: string;
  child: ChildProcess;
  /** Resolves on the next "Reloaded server configuration" after SIGHUP. */
  reload(): Promise<void>;
}

async function startOperatorServer(
  t: Test,
  dir: string,
  name: string,
  body: (tls: string) => string,
): Promise<OperatorServer> {
  const conf = path.join(dir, `${name}.conf`);
  const tls = `tls {
  cert_file: "${path.join(dir, "server.crt")}"
  key_file: "${path.join(dir, "server.key")}"
  ca_file: "${path.join(dir, "data", "pki", "ca.crt")}"
  verify_and_map: true
}`;
  await fs.writeFile(conf, `server_name: ${name}\nhost: 127.0.0.1\nport: -1\n${body(tls)}\n`);
  const child = spawnTied("/usr/sbin/nats-server", ["-c", conf], { stdio: ["ignore", "pipe", "pipe"] });
  t.teardown(() => {
    child.kill("SIGKILL");
  });
  const waiters: { re: RegExp; resolve: (m: RegExpExecArray) => void }[] = [];
  const lines: string[] = [];
  const onLine = (line: string) => {
    lines.push(line);
    for (const w of [...waiters]) {
      const m = w.re.exec(line);
      if (m) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(m);
      }
    }
  };
  createInterface({ input: child.stdout! }).on("line", onLine);
  createInterface({ input: child.stderr! }).on("line", onLine);
  const next = (re: RegExp) =>
    new Promise<RegExpExecArray>((resolve, reject) => {
      waiters.push({ re, resolve });
      setTimeout(
        () => reject(new Error(`nats-server ${name}: no ${re} in\n${lines.join("\n")}`)),
        15_000,
      ).unref();
    });
  const listening = next(/Listening for client connections on .*:(\d+)/);
  await next(/Server is ready/);
  const port = (await listening)[1];
  return {
    url: `tls://127.0.0.1:${port}`,
    child,
    reload: async () => {
      const done = next(/Reloaded server configuration/);
      child.kill("SIGHUP");
      await done;
    },
  };
}

/**
 * External NATS mode with real processes: the orchestrator connects to a
 * nats-server the test runs itself (as an operator would, TLS verify_and_map
 * with the Shoal CA, JetStream), whose configuration includes the users block
 * Shoal wrote; a compute node runs a WASM job through it. Refusals name their
 * cause: unreachable, the orchestrator user missing, no JetStream, a server not
 * trusting the Shoal CA. A compute node started before the operator's reload
 * waits (SHOAL_COMPUTE_NOT_ADMITTED) and registers after it; a deleted node
 * leaves the block, the operator's reload cuts it off, and started again it
 * stops at once (SHOAL_NATS_AUTHORIZATION): the broker had admitted it before.
 */
/** `orchestrator serve` on the operator's servers `url` (comma-separated), API on a kernel-chosen port. */
const serveArgs = (dataDir: string, url: string) => [
  "orchestrator",
  "serve",
  "--data-dir",
  dataDir,
  "-c",
  "API.Host=127.0.0.1",
  "-c",
  "API.Port=0",
  "-c",
  `Orchestrator.NATS.Servers=${url}`,
  "-c",
  "Logging.Level=warn",
];

/** A Shoal PKI in `DIR/data/pki` and the operator's server certificate from it (`shoal pki init` + `shoal pki issue server`). */
async function operatorPki(t: Test, prefix: string) {
  const dir = await tempDir(t, prefix);
  const dataDir = path.join(dir, "data");
  await initPki(path.join(dataDir, "pki"), { trustDomain: "ext.local" });
  const pki = await openPki(path.join(dataDir, "pki"));
  await writeIssued(
    path.join(dir, "server"),
    pki.mint({ role: "server", dns: ["localhost"], ip: ["127.0.0.1"] }),
  );
  return { dir, dataDir, authFile: path.join(dataDir, AUTH_FILE) };
}

/** The orchestrator's own connection to the operator's servers: the same call `orchestrator serve` makes, with the identity it minted. */
function dialAs(dataDir: string, url: string) {
  const identity = path.join(dataDir, "identity", "orchestrator");
  return connectExternalNats({
    servers: url.split(","),
    caFile: path.join(dataDir, "pki", "ca.crt"),
    shoalCaFile: path.join(dataDir, "pki", "ca.crt"),
    certFile: `${identity}.crt`,
    keyFile: `${identity}.key`,
    identity: "spiffe://ext.local/orchestrator/orchestrator",
    id: "orchestrator",
    authorizationFile: path.join(dataDir, AUTH_FILE),
    logger: silentLogger,
  });
}

t.test("orchestrator on an operator-run nats-server", async (t) => {
  const { dir, dataDir, authFile } = await operatorPki(t, "shoal-ext-nats-");
  const serve = (url: string) => serveArgs(dataDir, url);

  // Clustering is of the supervised server only.
  const clustered = await loadConfig({
    env: {},
    overrides: ["Orchestrator.NATS.Servers=tls://nats:4222", "Orchestrator.Cluster.Name=c1"],
  });
  t.throws(() => checkExternalNatsConfig(clustered), { code: "SHOAL_ORCH_NATS_EXTERNAL_CONFIG" });

  // A server that knows some other identity but not the orchestrator: Shoal writes its block, then names the fix.
  const stranger = await startOperatorServer(
    t,
    dir,
    "stranger",
    (tls) =>
      `${tls}\nauthorization { users = [ { user: "spiffe://ext.local/compute/other" } ] }\njetstream { store_dir: "${path.join(dir, "js-stranger")}" }`,
  );
  const refused = spawnShoal(t, serve(stranger.url), { SHOAL_ADMIN_PASSWORD: TEST_ADMIN_PASSWORD });
  const { code } = await refused.exited;
  t.not(code, 0, "the orchestrator does not start");
  t.match(refused.stderr(), /SHOAL_ORCH_NATS_NOT_ADMITTED/, "with the code");
  t.match(
    refused.stderr(),
    new RegExp(`copy ${authFile}.*include ${AUTH_FILE}`),
    "and the fix names the file to include",
  );
  const stat = await fs.stat(authFile);
  t.equal(stat.mode & 0o777, 0o600, "the users block is written 0600");
  const block = await fs.readFile(authFile, "utf8");
  t.match(block, /user: "spiffe:\/\/ext\.local\/orchestrator\/orchestrator"/);
  t.match(block, /"\$KV\.>"/, "with the orchestrator's grants");
  t.match(refused.stdout(), /NATS users block for your servers/, "the block is printed too");
  stranger.child.kill("SIGTERM");

  // The block included, but no JetStream.
  const noJs = await startOperatorServer(t, dir, "nojs", (tls) => `${tls}\ninclude "${INCLUDE}"`);
  const dial = (url: string) => dialAs(dataDir, url);
  await t.rejects(
    dial(noJs.url.replace(/:\d+$/, ":1")),
    { code: "SHOAL_NATS_UNREACHABLE", fix: /Orchestrator\.NATS\.Servers/ },
    "an unreachable server is named",
  );
  await t.rejects(
    dial(noJs.url),
    { code: "SHOAL_ORCH_NATS_NO_JETSTREAM" },
    "a server without JetStream is named",
  );
  noJs.child.kill("SIGTERM");

  // A server whose client CA is not Shoal's: the handshake names the CA to configure.
  await initPki(path.join(dir, "foreign"), { trustDomain: "ext.local" });
  const foreign = await startOperatorServer(t, dir, "foreign", (tls) =>
    tls.replace(path.join(dataDir, "pki", "ca.crt"), path.join(dir, "foreign", "ca.crt")),
  );
  await t.rejects(
    dial(foreign.url),
    { code: "SHOAL_TLS_CLIENT_UNKNOWN_CA", fix: /ca_file .*ca\.crt/ },
    "a server that does not trust the Shoal CA is named",
  );
  foreign.child.kill("SIGTERM");

  // A server whose max_payload is below the 1 MiB a result may take: refused at once, not when the first large result is stuck.
  const small = await startOperatorServer(
    t,
    dir,
    "small",
    (tls) =>
      `${tls}\nmax_payload: 524288\ninclude "${INCLUDE}"\njetstream { store_dir: "${path.join(dir, "js-small")}" }`,
  );
  await t.rejects(
    dial(small.url),
    {
      code: "SHOAL_NATS_MAX_PAYLOAD",
      details: { maxPayload: 524288, required: 1048576 },
      fix: /max_payload: 1048576.*every NATS server/,
    },
    "a server whose max_payload is too small is named, with the size to set",
  );
  small.child.kill("SIGTERM");

  // The operator's real server: Shoal's block included, JetStream on.
  const server = await startOperatorServer(
    t,
    dir,
    "operator",
    (tls) => `${tls}\ninclude "${INCLUDE}"\njetstream { store_dir: "${path.join(dir, "js")}" }`,
  );
  const orch = await startOrchestrator(t, dataDir, ["-c", `Orchestrator.NATS.Servers=${server.url}`]);
  t.match(orch.proc.stdout(), new RegExp(`NATS \\(mTLS\\):\\s+${server.url} \\(operator-run\\)`));
  t.notOk(
    await fs.access(path.join(dataDir, "nats", "nats.conf")).then(
      () => true,
      () => false,
    ),
    "no supervised nats-server",
  );

  // A new compute identity: the block is rewritten and the operator reloads; the node needs nothing different.
  const issue = async (id: string) => {
    await fs.mkdir(path.join(dir, id), { recursive: true });
    await writeIssued(path.join(dir, id, "identity"), await orch.pki.issue({ role: "compute", id }));
    await waitUntil(`the block admits ${id}`, async () =>
      (await fs.readFile(authFile, "utf8")).includes(`spiffe://ext.local/compute/${id}"`) ? true : undefined,
    );
  };
  await issue("n1");
  await waitUntil("the orchestrator asks for a reload", async () =>
    /reload your nats-server/.test(orch.proc.stderr() + orch.proc.stdout()) ? true : undefined,
  );
  await server.reload();
  const n1 = await startComputeNode(t, orch, path.join(dir, "n1"), "n1");
  const spec = await writeSpec(dir, "hello", wasmEngine(HELLO_WASM));
  const id = await submitJob(orch, spec);
  const job = await waitForJob(orch, id, "completes", (j) => j.State === "Completed" || j.State === "Failed");
  t.equal(job.State, "Completed", "the WASM job completes");
  t.match(job.Executions[0]?.Stdout, /hello from wasm/);

  // A node started before the operator's reload waits (it was never admitted) and joins after it.
  await issue("n2");
  const n2 = spawnShoal(
    t,
    computeServeArgs({ dataDir: path.join(dir, "n2"), servers: server.url, caFile: orch.ca }),
  );
  await n2.waitFor(/SHOAL_COMPUTE_NOT_ADMITTED/);
  t.match(
    n2.stdout() + n2.stderr(),
    /the broker has not admitted this identity yet.*reload their nats-server/,
    "the node says why it waits and what the operator must do",
  );
  // Two more refused dials at least (0.5 s, 1 s backoff): still waiting, one warning only.
  await new Promise((r) => setTimeout(r, 2500));
  t.equal(n2.child.exitCode, null, "the node waits instead of exiting");
  t.equal(
    (n2.stdout() + n2.stderr()).match(/SHOAL_COMPUTE_NOT_ADMITTED/g)?.length,
    1,
    "the wait is logged once, not at every retry",
  );
  await server.reload();
  await waitUntil("n2 registers after the reload", async () => {
    if (n2.child.exitCode !== null) throw new Error(`n2 exited:\n${n2.stderr()}`);
    const { Items } = await orch.client.get<{ Items: { ID: string; Health: string }[] }>(
      "/api/v1/orchestrator/nodes",
    );
    return Items.some((n) => n.ID === "n2" && n.Health === "HEALTHY") ? true : undefined;
  });
  t.pass("the node registered once the operator reloaded");

  // A deleted node leaves the block; the operator's reload then closes its connection.
  await orch.client.request("DELETE", "/api/v1/orchestrator/nodes/n1");
  await waitUntil("n1 leaves the block", async () =>
    (await fs.readFile(authFile, "utf8")).includes("spiffe://ext.local/compute/n1") ? undefined : true,
  );
  await server.reload();
  t.not((await n1.exited).code, 0, "the reload cuts the deleted node off");
  t.match(n1.stderr(), /SHOAL_NATS_AUTHORIZATION/);

  // Started again, the deleted node does not wait: the broker admitted this identity before, so its refusal now means revoked.
  const again = spawnShoal(
    t,
    computeServeArgs({ dataDir: path.join(dir, "n1"), servers: server.url, caFile: orch.ca }),
  );
  t.not((await again.exited).code, 0, "a revoked node that was admitted before stops");
  t.match(again.stderr(), /SHOAL_NATS_AUTHORIZATION/, "with the broker's reason");
  t.notMatch(again.stdout() + again.stderr(), /SHOAL_COMPUTE_NOT_ADMITTED/, "and does not wait");
});

/**
 * An operator's clustered JetStream (three routed servers, as an operator
 * would run them): an orchestrator started while the cluster has no quorum
 * waits for it; its state gets three copies of every bucket, so it survives
 * the loss of a server, and a job is stored through them.
 */
t.test("on an operator's clustered JetStream the state gets three copies", async (t) => {
  const { dir, dataDir, authFile } = await operatorPki(t, "shoal-ext-cluster-");
  // Included by the servers from the start, with some other user so that they ask who connects; Shoal rewrites it.
  await fs.writeFile(
    authFile,
    'authorization { users = [ { user: "spiffe://ext.local/compute/other" } ] }\n',
    {
      mode: 0o600,
    },
  );
  const routePorts = [await freePort(), await freePort(), await freePort()];
  const routes = routePorts.map((p) => `nats-route://127.0.0.1:${p}`).join(", ");
  const startServer = (i: number) =>
    startOperatorServer(
      t,
      dir,
      `c${i}`,
      (tls) =>
        `${tls}\ninclude "${INCLUDE}"\njetstream { store_dir: "${path.join(dir, `js-c${i}`)}" }\n` +
        `cluster { name: operator, listen: 127.0.0.1:${routePorts[i]}, routes: [${routes}] }`,
    );
  // One server of three first: alone it has no quorum, so its JetStream answers nothing.
  const c0 = await startServer(0);
  // The first start mints the orchestrator's identity and writes its user; the server does not know it yet.
  const first = spawnShoal(t, serveArgs(dataDir, c0.url), { SHOAL_ADMIN_PASSWORD: TEST_ADMIN_PASSWORD });
  t.not((await first.exited).code, 0);
  t.match(first.stderr(), /SHOAL_ORCH_NATS_NOT_ADMITTED/);
  await c0.reload();

  // Admitted now, the orchestrator waits for JetStream — longer than one request's 5 s timeout
  // here — instead of exiting, and starts once the other two servers are up.
  const starting = startOrchestrator(t, dataDir, ["-c", `Orchestrator.NATS.Servers=${c0.url}`]);
  starting.catch(() => {}); // awaited below
  await new Promise((r) => setTimeout(r, 6000));
  await Promise.all([startServer(1), startServer(2)]);
  const orch = await starting;
  const probe = await dialAs(dataDir, c0.url);
  t.teardown(() => probe.close());
  const jsm = await jetstreamManager(probe.nc);
  const copies = async () => {
    const counts = new Map<string, number>();
    for await (const info of jsm.streams.list()) counts.set(info.config.name, info.config.num_replicas);
    return counts;
  };
  const raised = await waitUntil("every bucket has three copies", async () => {
    const counts = await copies();
    return counts.size > 0 && [...counts.values()].every((n) => n === 3) ? counts : undefined;
  });
  t.ok(raised.has("KV_shoal-jobs"), "the jobs bucket among them");
  t.ok(raised.size >= 5, `${raised.size} buckets`);

  const spec = await writeSpec(dir, "hello", wasmEngine(HELLO_WASM));
  const id = await submitJob(orch, spec);
  t.equal((await getJob(orch, id)).State, "Queued", "a job is stored through them (no node yet: queued)");
});
