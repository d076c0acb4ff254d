import "reflect-metadata";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import t from "tap";
import { computeServeArgs, spawnShoal } from "./helpers/cluster.js";
import { OrchestratorStandIn } from "./helpers/compute-standin.js";
import { startTestFabric, type TestIdentity } from "./helpers/nats.js";

const root = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-compute-cli-"));
t.teardown(() => fs.rm(root, { recursive: true, force: true }));
const fabric = await startTestFabric(t);
const orchestrator = await fabric.identity("orchestrator", "orch-1");
const orch = await OrchestratorStandIn.start(t, fabric, orchestrator);

function serveArgs(identity: TestIdentity, dataDir: string): string[] {
  return [
    ...computeServeArgs({
      dataDir,
      servers: fabric.url,
      caFile: fabric.caFile,
      certFile: identity.certFile,
      keyFile: identity.keyFile,
    }),
    "-c",
    "Compute.Heartbeat.Interval=200ms",
  ];
}

// Each spawn compiles the CLI from source (~10 s), so both run at once.
t.test(
  "serve: SIGTERM stops a registered node with exit 0; a non-compute certificate or a bad exec allow list is refused",
  async (t) => {
    const identity = await fabric.identity("compute", "cli-node");
    const node = spawnShoal(t, serveArgs(identity, path.join(root, "serve")));
    const wrong = spawnShoal(t, serveArgs(orchestrator, path.join(root, "wrong")));
    const badAllow = spawnShoal(t, [
      ...serveArgs(identity, path.join(root, "bad-allow")),
      "-c",
      "Compute.Engines.Exec.Allow=/usr/bin/env,/no/such/program",
    ]);

    const reg = await orch.next("register", (b) => b.nodeId === "cli-node", 90_000);
    t.equal(reg.iss, identity.spiffeId);
    await orch.next("heartbeat", (b) => b.nodeId === "cli-node");
    node.child.kill("SIGTERM");
    const { code } = await node.exited;
    t.equal(code, 0, node.stderr().slice(-2000));
    t.match(node.stderr(), /compute node stopped/);

    const refused = await wrong.exited;
    t.equal(refused.code, 1);
    t.match(wrong.stderr(), /SHOAL_COMPUTE_IDENTITY/);
    t.match(wrong.stderr(), /SHOAL_PKI_ROLE_MISMATCH/);

    t.equal((await badAllow.exited).code, 1);
    t.match(
      badAllow.stderr(),
      /SHOAL_ENGINE_EXEC_ALLOW_INVALID: .*Allow\[1\] "\/no\/such\/program" does not exist/,
    );
    t.notOk(
      await fs.access(path.join(root, "bad-allow")).then(
        () => true,
        () => false,
      ),
      "nothing was written",
    );
  },
);
