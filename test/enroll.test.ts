import "reflect-metadata";
import { promises as fs } from "node:fs";
import https from "node:https";
import path from "node:path";
import t, { type Test } from "tap";
import { createJoinToken } from "../pki/index.js";
import {
  type OrchestratorHandle,
  runShoal,
  type ShoalProcess,
  spawnShoal,
  startOrchestrator,
  tempDir,
} from "./helpers/cluster.js";

/**
 * Zero-touch enrollment with real processes: `shoal orchestrator serve`,
 * `shoal compute serve --join TOKEN --ca-fingerprint FP` on empty data
 * directories, a real job on the enrolled node, and every refusal with its
 * code, a non-zero exit and nothing written.
 */
t.test("compute nodes enroll from a join token and the CA fingerprint alone", async (t) => {
  const dir = await tempDir(t);
  const orch = await startOrchestrator(t, path.join(dir, "orch"));
  const fp = orch.pki.rootFingerprint;

  const serve = (dataDir: string, token: string, id: string, fingerprint = fp): ShoalProcess =>
    spawnShoal(t, joinArgs(orch, dataDir, token, id, fingerprint));
  const token = async (opts: Parameters<typeof createJoinToken>[1] = {}) =>
    (await createJoinToken(orch.pkiDir, opts)).token;
  const exists = (p: string) =>
    fs.access(p).then(
      () => true,
      () => false,
    );

  t.test("a node enrolls, connects over mTLS and runs a job", async (t) => {
    const created = await runShoal(t, [
      "pki",
      "join-token",
      "create",
      "--dir",
      orch.pkiDir,
      "--label",
      "zone=enrolled",
      "--output",
      "json",
    ]);
    t.equal(created.code, 0, created.stderr);
    const { token: tok, caFingerprint } = JSON.parse(created.stdout) as {
      token: string;
      caFingerprint: string;
    };
    t.equal(caFingerprint, fp);
    const dataDir = path.join(dir, "edge-1");
    const node = serve(dataDir, tok, "edge-1");
    await waitForNode(t, orch, "edge-1", node);

    const tls = path.join(dataDir, "tls");
    t.equal((await fs.stat(path.join(tls, "node.key"))).mode & 0o777, 0o600, "key is 0600");
    t.equal((await fs.stat(tls)).mode & 0o777, 0o700);
    const verify = await runShoal(t, [
      "pki",
      "verify",
      path.join(tls, "node.crt"),
      "--ca",
      orch.ca,
      "--role",
      "compute",
      "--output",
      "json",
    ]);
    t.equal(verify.code, 0, verify.stderr);
    t.match(verify.stdout, "spiffe://shoal.local/compute/edge-1");
    const listed = await runShoal(t, ["pki", "list", "--dir", orch.pkiDir, "--output", "json"]);
    t.match(listed.stdout, /"id": ?"edge-1"/, "the enrolled identity is in the PKI inventory");

    const job = await runShoal(t, [
      "job",
      "run",
      "--wasm",
      "dist/wasm/hello.wasm",
      "--wait",
      "--output",
      "json",
      ...orch.api,
      "--",
      "enrolled",
    ]);
    t.equal(job.code, 0, job.stderr);
    const j = JSON.parse(job.stdout);
    t.equal(j.State, "Completed");
    t.equal(j.Executions[0].NodeID, "edge-1");
    t.match(j.Executions[0].Stdout, /enrolled/);

    const nodes = await runShoal(t, ["node", "describe", "edge-1", "--output", "json", ...orch.api]);
    t.same(JSON.parse(nodes.stdout).Labels, { zone: "enrolled" }, "the token's labels are the node's");

    // A restart with an identity on disk does not enroll again (the token is spent by now).
    node.child.kill("SIGTERM");
    t.equal((await node.exited).code, 0, node.stderr());
    const again = serve(dataDir, tok, "edge-1");
    await again.waitFor(/"msg":"registered"|already enrolled/);
    await waitForNode(t, orch, "edge-1", again);
    t.notMatch(again.stderr(), /SHOAL_PKI_JOIN_TOKEN_USED/);
    again.child.kill("SIGTERM");
    await again.exited;
  });

  t.test("refusals exit non-zero with their code and write nothing", async (t) => {
    const refused = async (name: string, p: ShoalProcess, code: string) => {
      const { code: exit } = await p.exited;
      t.not(exit, 0, `${name}: non-zero exit`);
      t.match(p.stderr(), code, `${name}: ${code}`);
      t.notOk(await exists(path.join(dir, name)), `${name}: nothing written`);
    };
    const wrongFp = `sha256:${"ab".repeat(32)}`;
    const used = await token();
    const first = serve(path.join(dir, "used-1"), used, "used-1");
    await waitForNode(t, orch, "used-1", first);
    const expired = await token({ ttlMs: 1000, now: new Date(Date.now() - 60_000) });
    await Promise.all([
      refused(
        "wrong-fp",
        serve(path.join(dir, "wrong-fp"), await token(), "wrong-fp", wrongFp),
        "SHOAL_COMPUTE_CA_MISMATCH",
      ),
      refused("reused", serve(path.join(dir, "reused"), used, "reused"), "SHOAL_PKI_JOIN_TOKEN_USED"),
      refused(
        "expired",
        serve(path.join(dir, "expired"), expired, "expired"),
        "SHOAL_PKI_JOIN_TOKEN_EXPIRED",
      ),
      refused("taken", serve(path.join(dir, "taken"), await token(), "used-1"), "SHOAL_ORCH_NODE_ID_TAKEN"),
      refused(
        "bad-token",
        serve(path.join(dir, "bad-token"), "shoal1.nope", "bad-token"),
        "SHOAL_PKI_JOIN_TOKEN_INVALID",
      ),
    ]);
    first.child.kill("SIGTERM");
    await first.exited;
  });

  t.test("a single-use token raced by several nodes enrolls exactly one", async (t) => {
    const shared = await token();
    const racers = ["race-a", "race-b", "race-c"].map((id) => ({
      id,
      proc: serve(path.join(dir, id), shared, id),
    }));
    const outcomes = await Promise.all(
      racers.map(({ proc }) =>
        proc.waitFor(/"msg":"enrolled"|SHOAL_PKI_JOIN_TOKEN_USED/, 60_000).then((m) => m[0]),
      ),
    );
    t.equal(outcomes.filter((o) => o.includes("enrolled")).length, 1, outcomes.join(" | "));
    for (const { id, proc } of racers) {
      if (outcomes[racers.findIndex((r) => r.id === id)]!.includes("enrolled")) {
        await waitForNode(t, orch, id, proc);
        proc.child.kill("SIGTERM");
      } else {
        t.not((await proc.exited).code, 0);
        t.notOk(await exists(path.join(dir, id)), `${id} wrote nothing`);
      }
    }
    const tokens = await runShoal(t, ["pki", "join-token", "list", "--dir", orch.pkiDir, "--output", "json"]);
    const record = (JSON.parse(tokens.stdout) as { id: string; usedBy: string[] }[]).find((r) =>
      shared.includes(r.id),
    );
    t.equal(record?.usedBy.length, 1);
  });

  t.test("join-token admin API: create, list, revoke; enroll needs no user token", async (t) => {
    const base = `https://127.0.0.1:${orch.apiPort}/api/v1`;
    const ca = await fs.readFile(orch.ca, "utf8");
    const call = (method: string, url: string, body?: unknown) =>
      fetchJson(method, `${base}/${url}`, ca, body);
    const created = await call("POST", "pki/join-tokens", { TTL: "10m", Uses: 2, Labels: { k: "v" } });
    t.equal(created.status, 201);
    t.equal(created.body.MaxUses, 2);
    t.equal(created.body.CAFingerprint, fp);
    const list = await call("GET", "pki/join-tokens");
    t.ok(list.body.Items.some((i: { id: string }) => i.id === created.body.ID));
    t.notMatch(JSON.stringify(list.body), /secret/i);
    const revoked = await call("DELETE", `pki/join-tokens/${created.body.ID}`);
    t.equal(revoked.body.Token.state, "revoked");
    const enroll = await call("POST", "enroll", { Token: created.body.Token, CSR: "x", NodeID: "api-node" });
    t.equal(enroll.status, 403);
    t.equal(enroll.body.error.code, "SHOAL_PKI_JOIN_TOKEN_REVOKED");
    const unknown = await call("DELETE", "pki/join-tokens/0123456789abcdef");
    t.equal(unknown.status, 404);
    const pem = await call("GET", "pki/ca");
    t.equal(pem.status, 200);
    t.equal(pem.text, ca, "the CA bundle is public");
  });
});

function joinArgs(
  orch: OrchestratorHandle,
  dataDir: string,
  token: string,
  id: string,
  fingerprint: string,
): string[] {
  return [
    "compute",
    "serve",
    "--data-dir",
    dataDir,
    "--orchestrators",
    `tls://127.0.0.1:${orch.natsPort}`,
    "--api",
    `https://127.0.0.1:${orch.apiPort}`,
    "--join",
    token,
    "--ca-fingerprint",
    fingerprint,
    "--id",
    id,
    "-c",
    "Logging.Level=info",
  ];
}

/** One HTTPS call trusting `ca`, without any user token. */
function fetchJson(
  method: string,
  url: string,
  ca: string,
  body?: unknown,
  // biome-ignore lint/suspicious/noExplicitAny: test-side JSON
): Promise<{ status: number; body: any; text: string }> {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = https.request(
      url,
      {
        method,
        ca,
        headers: payload ? { "content-type": "application/json" } : {},
      },
      (res) => {
        let text = "";
        res.on("data", (d: Buffer) => {
          text += d.toString();
        });
        res.on("end", () => {
          let parsed: unknown;
          try {
            parsed = JSON.parse(text);
          } catch {
            parsed = undefined;
          }
          resolve({ status: res.statusCode ?? 0, body: parsed, text });
        });
      },
    );
    req.on("error", reject);
    req.end(payload);
  });
}

async function waitForNode(t: Test, orch: OrchestratorHandle, id: string, node: ShoalProcess): Promise<void> {
  const deadline = Date.now() + 40_000;
  while (Date.now() < deadline) {
    const list = await runShoal(t, ["node", "list", "--output", "json", ...orch.api]);
    const nodes = JSON.parse(list.stdout || "[]") as { ID: string; Health: string; Approval: string }[];
    if (nodes.some((n) => n.ID === id && n.Health === "HEALTHY" && n.Approval === "APPROVED")) return;
    if (node.child.exitCode !== null) throw new Error(`compute ${id} exited:\n${node.stderr()}`);
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`compute ${id} was not HEALTHY and APPROVED within 40 s:\n${node.stderr()}`);
}
