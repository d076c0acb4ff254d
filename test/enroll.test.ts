import "reflect-metadata";
import { promises as fs } from "node:fs";
import https from "node:https";
import path from "node:path";
import t from "tap";
import { wasmJobSpec } from "../core/index.js";
import {
  createCsr,
  createJoinToken,
  generatePrivateKey,
  listCertificates,
  listJoinTokens,
  verifyCertificate,
} from "../pki/index.js";
import {
  type OrchestratorHandle,
  type ShoalProcess,
  spawnBuiltShoal,
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
  const caPem = await fs.readFile(orch.ca, "utf8");
  // As the admin, except the public routes (enroll must work without a user token).
  const api = async (method: string, url: string, body?: unknown) =>
    fetchJson(
      method,
      `https://127.0.0.1:${orch.apiPort}/api/v1/${url}`,
      caPem,
      body,
      url === "enroll" || url === "pki/ca" ? undefined : await orch.adminToken(),
    );

  const serve = (dataDir: string, token: string, id: string, fingerprint = fp): ShoalProcess =>
    spawnBuiltShoal(t, joinArgs(orch, dataDir, token, id, fingerprint));
  const token = async (opts: Parameters<typeof createJoinToken>[1] = {}) =>
    (await createJoinToken(orch.pkiDir, opts)).token;
  const spentToken = await token({ labels: { zone: "enrolled" } });
  const exists = (p: string) =>
    fs.access(p).then(
      () => true,
      () => false,
    );

  t.test("a node enrolls, connects over mTLS and runs a job", async (t) => {
    const tok = spentToken;
    const dataDir = path.join(dir, "edge-1");
    const node = serve(dataDir, tok, "edge-1");
    await waitForNode(api, "edge-1", node);

    const tls = path.join(dataDir, "tls");
    t.equal((await fs.stat(path.join(tls, "node.key"))).mode & 0o777, 0o600, "key is 0600");
    t.equal((await fs.stat(tls)).mode & 0o777, 0o700);
    const chain = await fs.readFile(path.join(tls, "node.crt"), "utf8");
    const verified = verifyCertificate(chain, { caPem: await fs.readFile(orch.ca, "utf8"), role: "compute" });
    t.ok(verified.ok);
    t.equal(verified.leaf.spiffeId, "spiffe://shoal.local/compute/edge-1");
    t.same(verified.leaf.sans, ["spiffe://shoal.local/compute/edge-1"], "the CA decided the SANs");
    t.ok(
      (await listCertificates(orch.pkiDir)).some((e) => e.id === "edge-1" && e.status === "valid"),
      "the enrolled identity is in the PKI inventory",
    );

    const spec = wasmJobSpec({ name: "enrolled", module: await fs.readFile("dist/wasm/hello.wasm") });
    const submitted = await api("PUT", "orchestrator/jobs", { Job: spec });
    t.equal(submitted.status, 201, submitted.text);
    const history = await api("GET", `orchestrator/jobs/${submitted.body.JobID}/history?follow=true`);
    const job = JSON.parse(history.text.trim().split("\n").at(-1)!).Job;
    t.equal(job.State, "Completed", history.text);
    t.equal(job.Executions[0].NodeID, "edge-1");

    const described = await api("GET", "orchestrator/nodes/edge-1");
    t.same(described.body.Node.Labels, { zone: "enrolled" }, "the token's labels are the node's");

    // A restart with an identity on disk does not enroll again (the token is spent by now).
    node.child.kill("SIGTERM");
    t.equal((await node.exited).code, 0, node.stderr());
    const again = serve(dataDir, tok, "edge-1");
    await again.waitFor(/already enrolled/, 60_000);
    await again.waitFor(/"msg":"registered"/, 60_000);
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
    const expired = await token({ ttlMs: 1000, now: new Date(Date.now() - 60_000) });
    await Promise.all([
      refused(
        "wrong-fp",
        serve(path.join(dir, "wrong-fp"), await token(), "wrong-fp", wrongFp),
        "SHOAL_COMPUTE_CA_MISMATCH",
      ),
      refused("reused", serve(path.join(dir, "reused"), spentToken, "reused"), "SHOAL_PKI_JOIN_TOKEN_USED"),
      refused(
        "expired",
        serve(path.join(dir, "expired"), expired, "expired"),
        "SHOAL_PKI_JOIN_TOKEN_EXPIRED",
      ),
    ]);
  });

  t.test("a single-use token raced by two node processes enrolls exactly one", async (t) => {
    const shared = await token();
    const racers = ["race-a", "race-b"].map((id) => ({ id, proc: serve(path.join(dir, id), shared, id) }));
    const outcomes = await Promise.all(
      racers.map(({ proc }) =>
        proc.waitFor(/"msg":"enrolled"|SHOAL_PKI_JOIN_TOKEN_USED/, 90_000).then((m) => m[0]),
      ),
    );
    t.equal(outcomes.filter((o) => o.includes("enrolled")).length, 1, outcomes.join(" | "));
    for (const [i, { id, proc }] of racers.entries()) {
      if (outcomes[i]!.includes("enrolled")) {
        await waitForNode(api, id, proc);
      } else {
        t.not((await proc.exited).code, 0);
        t.notOk(await exists(path.join(dir, id)), `${id} wrote nothing`);
      }
    }
    const record = (await listJoinTokens(orch.pkiDir)).find((r) => shared.includes(r.id));
    t.equal(record?.usedBy.length, 1);
  });

  t.test("POST /enroll: many concurrent requests on one token, a taken id, a bad token", async (t) => {
    const csr = (id: string) => createCsr(generatePrivateKey("ecdsa-p256"), id);
    const shared = await token();
    const answers = await Promise.all(
      Array.from({ length: 8 }, (_, i) =>
        api("POST", "enroll", { Token: shared, CSR: csr(`burst-${i}`), NodeID: `burst-${i}` }),
      ),
    );
    t.equal(answers.filter((a) => a.status === 201).length, 1, "exactly one wins");
    t.ok(
      answers.every((a) => a.status === 201 || a.body.error.code === "SHOAL_PKI_JOIN_TOKEN_USED"),
      "the others are told the token is used",
    );
    const fresh = await token();
    const taken = await api("POST", "enroll", { Token: fresh, CSR: csr("edge-1"), NodeID: "edge-1" });
    t.equal(taken.status, 409);
    t.equal(taken.body.error.code, "SHOAL_ORCH_NODE_ID_TAKEN");
    const stillUsable = await api("POST", "enroll", { Token: fresh, CSR: csr("other"), NodeID: "other" });
    t.equal(stillUsable.status, 201, "a refused enrollment did not spend the token");
    const bad = await api("POST", "enroll", { Token: "shoal1.nope", CSR: csr("x"), NodeID: "x" });
    t.equal(bad.status, 401);
    t.equal(bad.body.error.code, "SHOAL_PKI_JOIN_TOKEN_INVALID");
    const forged = await api("POST", "enroll", { Token: await token(), CSR: "not a csr", NodeID: "y" });
    t.equal(forged.status, 400);
    t.equal(forged.body.error.code, "SHOAL_PKI_BAD_PEM");
  });

  t.test("join-token admin API: create, list, revoke; enroll needs no user token", async (t) => {
    const created = await api("POST", "pki/join-tokens", { TTL: "10m", Uses: 2, Labels: { k: "v" } });
    t.equal(created.status, 201);
    t.equal(created.body.MaxUses, 2);
    t.equal(created.body.CAFingerprint, fp);
    const list = await api("GET", "pki/join-tokens");
    t.ok(list.body.Items.some((i: { id: string }) => i.id === created.body.ID));
    t.notMatch(JSON.stringify(list.body), /secret/i);
    const revoked = await api("DELETE", `pki/join-tokens/${created.body.ID}`);
    t.equal(revoked.body.Token.state, "revoked");
    const enroll = await api("POST", "enroll", { Token: created.body.Token, CSR: "x", NodeID: "api-node" });
    t.equal(enroll.status, 403);
    t.equal(enroll.body.error.code, "SHOAL_PKI_JOIN_TOKEN_REVOKED");
    const unknown = await api("DELETE", "pki/join-tokens/0123456789abcdef");
    t.equal(unknown.status, 404);
    const pem = await api("GET", "pki/ca");
    t.equal(pem.status, 200);
    t.equal(pem.text, caPem, "the CA bundle is public");
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

type Api = (method: string, url: string, body?: unknown) => ReturnType<typeof fetchJson>;

/** One HTTPS call trusting `ca`, without any user token. */
function fetchJson(
  method: string,
  url: string,
  ca: string,
  body?: unknown,
  token?: string,
  // biome-ignore lint/suspicious/noExplicitAny: test-side JSON
): Promise<{ status: number; body: any; text: string }> {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = https.request(
      url,
      {
        method,
        ca,
        headers: {
          ...(payload ? { "content-type": "application/json" } : {}),
          ...(token ? { authorization: `Bearer ${token}` } : {}),
        },
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

async function waitForNode(api: Api, id: string, node: ShoalProcess): Promise<void> {
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    const nodes = (await api("GET", "orchestrator/nodes")).body.Items as {
      ID: string;
      Health: string;
      Approval: string;
    }[];
    if (nodes.some((n) => n.ID === id && n.Health === "HEALTHY" && n.Approval === "APPROVED")) return;
    if (node.child.exitCode !== null) throw new Error(`compute ${id} exited:\n${node.stderr()}`);
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`compute ${id} was not HEALTHY and APPROVED within 60 s:\n${node.stderr()}`);
}
