import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t, { type Test } from "tap";
import { MAX_PENDING_PER_ADDRESS } from "../orchestrator/pending-enrollments.js";
import { createCsr, generatePrivateKey, listCertificates, publicKeyFingerprint } from "../pki/index.js";
import { apiCaller } from "./helpers/api-call.js";
import {
  type ShoalProcess,
  spawnBuiltShoal,
  startOrchestrator,
  tempDir,
  waitUntil,
} from "./helpers/cluster.js";

/**
 * Enrollment without a join token, with real processes (`shoal orchestrator
 * serve`, `shoal compute serve --ca-fingerprint FP` without --join, `shoal
 * node approve|reject`): the request waits as a PENDING node, nothing is
 * issued until an operator approves, only the holder of the CSR's key gets
 * the certificate, labels given on approval become the node's (checked as a
 * join token's are), a rejected node exits with SHOAL_ORCH_ENROLL_REJECTED and
 * writes nothing, and anonymous requests are bounded.
 */
t.test("a node without a token waits as PENDING until an operator decides", async (t) => {
  const dir = await tempDir(t);
  const orch = await startOrchestrator(t, path.join(dir, "orch"), [], {}, spawnBuiltShoal);
  const caPem = await fs.readFile(orch.ca, "utf8");
  const caller = apiCaller(`https://127.0.0.1:${orch.apiPort}`, caPem);
  t.teardown(() => caller.close());
  const enroll = (body: unknown) => caller.call("POST", "/api/v1/enroll", { body });
  const exists = (p: string) =>
    fs.access(p).then(
      () => true,
      () => false,
    );
  const serve = (id: string): ShoalProcess =>
    spawnBuiltShoal(t, [
      "compute",
      "serve",
      "--data-dir",
      path.join(dir, id),
      "--orchestrators",
      `tls://127.0.0.1:${orch.natsPort}`,
      "--api",
      `https://127.0.0.1:${orch.apiPort}`,
      "--ca-fingerprint",
      orch.pki.rootFingerprint,
      "--id",
      id,
      "-c",
      "Logging.Level=info",
    ]);
  const nodeAs = async (id: string, node: ShoalProcess, want: (n: NodeRow) => boolean) =>
    waitUntil(
      `node ${id} listed as wanted`,
      async () => {
        if (node.child.exitCode !== null) throw new Error(`compute ${id} exited:\n${node.stderr()}`);
        const { Items } = await orch.client.get<{ Items: NodeRow[] }>("/api/v1/orchestrator/nodes");
        return Items.find((n) => n.ID === id && want(n));
      },
      60_000,
    );
  const operator = async (t: Test, verb: "approve" | "reject", id: string, extra: string[] = []) => {
    const p = spawnBuiltShoal(t, ["node", verb, id, ...extra, "--output", "json", ...orch.api], {
      SHOAL_TOKEN: await orch.adminToken(),
    });
    const { code } = await p.exited;
    t.equal(code, 0, `shoal node ${verb} ${id}: ${p.stderr()}`);
    return JSON.parse(p.stdout()) as NodeRow;
  };

  t.test("approved: the node gets its certificate, connects and is APPROVED", async (t) => {
    const node = serve("edge-a");
    const pending = await nodeAs("edge-a", node, (n) => n.Approval === "PENDING");
    t.equal(pending.Health, "NOT_CONNECTED");
    const logged = (
      await node.waitFor(/"keyFingerprint":"(sha256:[0-9a-f]{64})".*shoal node approve edge-a/)
    )[1];
    t.match(pending.Enrollment, { State: "PENDING", KeyFingerprint: logged, Address: /127\.0\.0\.1/ });
    t.notOk(await exists(path.join(dir, "edge-a", "tls")), "no certificate before approval");
    t.notOk(
      (await listCertificates(orch.pkiDir)).some((c) => c.id === "edge-a"),
      "nothing issued before approval",
    );

    // Someone who knows only the node id gets nothing, before or after approval.
    const intruder = generatePrivateKey("ecdsa-p256");
    const stolen = { CSR: createCsr(intruder, "edge-a"), NodeID: "edge-a" };
    const before = await enroll(stolen);
    t.equal(before.status, 409);
    t.equal(before.json.error?.code, "SHOAL_ORCH_NODE_ID_TAKEN");

    // Stopped while it waits, it keeps its key and asks again with it: the same request.
    node.child.kill("SIGTERM");
    t.equal((await node.exited).code, 0, `a signal while waiting is a clean stop: ${node.stderr()}`);
    t.equal(
      (await fs.stat(path.join(dir, "edge-a", "pending-enrollment.key"))).mode & 0o777,
      0o600,
      "the waiting key is kept, 0600",
    );
    const again = serve("edge-a");
    t.equal(
      (await again.waitFor(/"keyFingerprint":"(sha256:[0-9a-f]{64})".*shoal node approve edge-a/))[1],
      logged,
      "restarted, it asks with the same key",
    );

    // Labels on approval are checked as a join token's are (one schema): the field is named, nothing is decided.
    const token = await orch.adminToken();
    const approveWith = (id: string, body: unknown) =>
      caller.call("POST", `/api/v1/orchestrator/nodes/${id}/approve`, { token, body });
    for (const [Labels, field] of [
      [{ "": "x" }, "Labels"],
      [{ ["k".repeat(129)]: "x" }, "Labels"],
      [{ "zone name": "x" }, "Labels"],
      [{ zone: "v".repeat(257) }, "Labels.zone"],
      [{ zone: { nested: "x" } }, "Labels.zone"],
    ] as const) {
      const bad = await approveWith("edge-a", { Labels });
      t.equal(bad.status, 400, `refused: ${JSON.stringify(Labels).slice(0, 40)}`);
      t.match(bad.json.error, { code: "SHOAL_ORCH_REQUEST_INVALID", field });
    }
    const badToken = await caller.call("POST", "/api/v1/pki/join-tokens", {
      token,
      body: { Labels: { "": "x" } },
    });
    t.equal(badToken.status, 400, "the join-token route refuses the same label");
    t.match(badToken.json.error, { code: "SHOAL_ORCH_REQUEST_INVALID", field: "Labels" });
    const cliBad = spawnBuiltShoal(t, ["node", "approve", "edge-a", "--label", "novalue", ...orch.api], {
      SHOAL_TOKEN: token,
    });
    t.not((await cliBad.exited).code, 0, "the CLI refuses a label that is not k=v");
    t.match(cliBad.stderr(), /SHOAL_USAGE/);
    t.ok(await nodeAs("edge-a", again, (n) => n.Approval === "PENDING"), "nothing was decided");

    const approved = await operator(t, "approve", "edge-a", ["--label", "zone=edge", "--label", "tier=gold"]);
    t.match(approved, { ID: "edge-a", Approval: "APPROVED", Labels: { zone: "edge", tier: "gold" } });
    const running = await nodeAs("edge-a", again, (n) => n.Approval === "APPROVED" && n.Health === "HEALTHY");
    t.same(
      running.Labels,
      { zone: "edge", tier: "gold" },
      "the node registers with the labels it was approved with",
    );
    const enrolled = JSON.parse(
      await fs.readFile(path.join(dir, "edge-a", "tls", "enrollment.json"), "utf8"),
    );
    t.same(enrolled.Labels, { zone: "edge", tier: "gold" }, "and keeps them for its restarts");
    const registered = await approveWith("edge-a", { Labels: { zone: "other" } });
    t.equal(registered.status, 400, "a registered node's labels are its own");
    t.match(registered.json.error, { code: "SHOAL_ORCH_REQUEST_INVALID", field: "Labels" });
    const tls = path.join(dir, "edge-a", "tls");
    t.equal((await fs.stat(path.join(tls, "node.key"))).mode & 0o777, 0o600);
    t.notOk(
      await exists(path.join(dir, "edge-a", "pending-enrollment.key")),
      "the waiting key moved into tls/",
    );
    const after = await enroll(stolen);
    t.equal(after.status, 409);
    t.equal(after.json.error?.code, "SHOAL_ORCH_NODE_ID_TAKEN");
    t.notOk("Certificate" in after.json, "no certificate for another key");
    t.not(publicKeyFingerprint(intruder), logged);
  });

  t.test("rejected: the node exits with SHOAL_ORCH_ENROLL_REJECTED and writes nothing", async (t) => {
    const node = serve("edge-r");
    await nodeAs("edge-r", node, (n) => n.Approval === "PENDING");
    t.ok(await exists(path.join(dir, "edge-r", "pending-enrollment.key")), "the key waits");
    t.match(await operator(t, "reject", "edge-r"), { ID: "edge-r", Approval: "REJECTED" });
    const { code } = await node.exited;
    t.equal(code, 1);
    t.match(node.stderr(), /SHOAL_ORCH_ENROLL_REJECTED/);
    t.notOk(await exists(path.join(dir, "edge-r")), "nothing written");
    t.notOk((await listCertificates(orch.pkiDir)).some((c) => c.id === "edge-r"));
    const { Items } = await orch.client.get<{ Items: NodeRow[] }>("/api/v1/orchestrator/nodes");
    t.notOk(
      Items.some((n) => n.ID === "edge-r"),
      "a decided request is no longer listed as waiting",
    );
  });

  t.test("anonymous requests are bounded and need a valid CSR", async (t) => {
    const bad = await enroll({ CSR: "not a csr", NodeID: "junk" });
    t.equal(bad.status, 400);
    t.equal(bad.json.error?.code, "SHOAL_PKI_BAD_PEM");
    for (let i = 0; i < MAX_PENDING_PER_ADDRESS; i++) {
      const key = generatePrivateKey("ecdsa-p256");
      const r = await enroll({ CSR: createCsr(key, `flood-${i}`), NodeID: `flood-${i}` });
      t.equal(r.status, 202, `request ${i} waits`);
      // Asking again with the same key is the same request, not another one.
      if (i === 0) t.equal((await enroll({ CSR: createCsr(key, "x"), NodeID: "flood-0" })).status, 202);
    }
    const over = await enroll({ CSR: createCsr(generatePrivateKey("ecdsa-p256"), "x"), NodeID: "flood-x" });
    t.equal(over.status, 429);
    t.equal(over.json.error?.code, "SHOAL_ORCH_ENROLL_LIMIT");
    const { Items } = await orch.client.get<{ Items: NodeRow[] }>("/api/v1/orchestrator/nodes");
    t.equal(Items.filter((n) => n.ID.startsWith("flood-")).length, MAX_PENDING_PER_ADDRESS);
  });
});

interface NodeRow {
  ID: string;
  Approval: string;
  Health: string;
  Labels?: Record<string, string>;
  Enrollment?: Record<string, string>;
}
