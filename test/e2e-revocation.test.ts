import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t, { type Test } from "tap";
import { broadcastAudience, connectFabric, EnvelopeSigner, subjects } from "../fabric/index.js";
import {
  createJoinToken,
  type IssuedCertificate,
  isIdentityRevoked,
  parseCrl,
  redeemJoinToken,
  revokeCertificate,
} from "../pki/index.js";
import {
  computeServeArgs,
  spawnBuiltShoal,
  startComputeNode,
  startOrchestrator,
  tempDir,
} from "./helpers/cluster.js";

/**
 * Revocation with real processes: `shoal node delete` and `shoal pki revoke`
 * against a running orchestrator close the node's broker connection (the
 * compute process stops with SHOAL_NATS_AUTHORIZATION), the orchestrator
 * refuses envelopes signed with a revoked certificate, the CRL is rewritten,
 * and the node can neither reconnect nor enroll again.
 */
const dir = await tempDir(t);
// The compiled CLI (npm run build): six processes through the TypeScript loader take minutes on a loaded machine.
const orch = await startOrchestrator(
  t,
  path.join(dir, "orch"),
  ["-c", "Logging.Level=info"],
  {},
  spawnBuiltShoal,
);
const td = orch.pki.trustDomain;
const crlFile = path.join(orch.pkiDir, "crl.pem");

/** `shoal ARGS` (compiled) to completion. */
async function cli(t: Test, args: string[]): Promise<{ code: number | null; stderr: string }> {
  const p = spawnBuiltShoal(t, args, { SHOAL_TOKEN: await orch.adminToken() });
  const { code } = await p.exited;
  return { code, stderr: p.stderr() };
}
const api = orch.client;
// Every `shoal` child process costs seconds on a loaded 2-core machine.
t.setTimeout(240_000);

/** Serials in the orchestrator's CRL file, once it lists `serial` (it is rewritten after each revocation). */
async function crlListing(serial: string): Promise<string[]> {
  for (let i = 0; i < 200; i++) {
    const pem = await fs.readFile(crlFile, "utf8").catch(() => "");
    const serials = pem ? parseCrl(pem).entries.map((e) => e.serial) : [];
    if (serials.includes(serial)) return serials;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`the CRL never listed ${serial}`);
}

t.test("shoal node delete closes the node's connection and keeps it out", async (t) => {
  const n1 = await startComputeNode(t, orch, path.join(dir, "n1"), "n1", [], spawnBuiltShoal);
  const n2 = await startComputeNode(t, orch, path.join(dir, "n2"), "n2", [], spawnBuiltShoal);
  const del = await cli(t, ["node", "delete", "n1", ...orch.api]);
  t.equal(del.code, 0, del.stderr);
  const exit = await n1.exited;
  t.not(exit.code, 0, "the compute process stops");
  t.match(n1.stderr(), /SHOAL_NATS_AUTHORIZATION/, "with the broker's reason");
  t.equal(n2.child.exitCode, null, "another node stays connected");
  t.same(
    (orch.proc.stdout() + orch.proc.stderr()).match(/"node identity revoked"/g)?.length,
    1,
    "the orchestrator logged the revocation",
  );
  t.match(await isIdentityRevoked(orch.pkiDir, `spiffe://${td}/compute/n1`), {
    reason: "privilegeWithdrawn",
  });
  const serial = (await orch.pki.list()).find((e) => e.id === "n1")!.serial;
  t.ok((await crlListing(serial)).includes(serial), "the CRL lists n1's certificate");

  // The node can't come back: not by reconnecting, not by enrolling again.
  const again = spawnBuiltShoal(
    t,
    computeServeArgs({
      dataDir: path.join(dir, "n1"),
      servers: `tls://127.0.0.1:${orch.natsPort}`,
      caFile: orch.ca,
    }),
  );
  t.not((await again.exited).code, 0, "the revoked node cannot reconnect");
  t.match(again.stderr(), /SHOAL_NATS_AUTHORIZATION/);
  const { token } = await createJoinToken(orch.pkiDir);
  await t.rejects(redeemJoinToken(orch.pkiDir, token, { nodeId: "n1" }), {
    code: "SHOAL_PKI_IDENTITY_REVOKED",
  });
  const { Items } = await api.get<{ Items: { ID: string }[] }>("/api/v1/orchestrator/nodes");
  t.same(
    Items.map((n) => n.ID),
    ["n2"],
    "n1 is gone and stays gone",
  );

  // `shoal pki revoke` from another process, against the running orchestrator's PKI.
  const n2Serial = (await orch.pki.list()).find((e) => e.id === "n2")!.serial;
  const r = await cli(t, ["pki", "revoke", n2Serial, "--dir", orch.pkiDir, "--reason", "keyCompromise"]);
  t.equal(r.code, 0, r.stderr);
  t.not((await n2.exited).code, 0);
  t.match(n2.stderr(), /SHOAL_NATS_AUTHORIZATION/);
  t.ok((await crlListing(n2Serial)).includes(n2Serial));
  t.match(await isIdentityRevoked(orch.pkiDir, `spiffe://${td}/compute/n2`), { reason: "keyCompromise" });

  await t.rejects(api.request("DELETE", "/api/v1/orchestrator/nodes/nobody"), {
    code: "SHOAL_ORCH_NODE_NOT_FOUND",
  });
});

t.test("envelopes signed with a revoked certificate are refused by the orchestrator", async (t) => {
  // n9 holds two certificates; the first is revoked (superseded), so n9 stays a
  // broker user through the second — but whatever the first key signs is refused.
  const [oldCert, newCert] = [
    await orch.pki.issue({ role: "compute", id: "n9" }),
    await orch.pki.issue({ role: "compute", id: "n9" }),
  ];
  const files = async (name: string, c: IssuedCertificate) => {
    const prefix = path.join(dir, name);
    await fs.writeFile(`${prefix}.crt`, c.certPem);
    await fs.writeFile(`${prefix}.key`, c.keyPem!, { mode: 0o600 });
    return prefix;
  };
  const prefix = await files("n9-new", newCert);
  const identity = `spiffe://${td}/compute/n9`;
  let conn: Awaited<ReturnType<typeof connectFabric>> | undefined;
  for (let i = 0; i < 100 && !conn; i++) {
    // The broker learns n9 when the orchestrator sees the inventory change.
    conn = await connectFabric({
      servers: `tls://127.0.0.1:${orch.natsPort}`,
      caFile: orch.ca,
      certFile: `${prefix}.crt`,
      keyFile: `${prefix}.key`,
      identity,
    }).catch(() => undefined);
    if (!conn) await new Promise((r) => setTimeout(r, 200));
  }
  if (!conn) throw new Error("n9 never became a broker user");
  t.teardown(() => conn.close());
  await revokeCertificate(orch.pkiDir, oldCert.serial, "superseded");
  await crlListing(oldCert.serial);

  const register = (c: IssuedCertificate) =>
    new EnvelopeSigner({ certPem: c.certPem, keyPem: c.keyPem! }).sign("register", broadcastAudience(td), {
      nodeId: "n9",
      chainPem: c.certPem,
      labels: {},
      capacity: { cpu: 1, memory: 1 << 20 },
      engines: ["wasm"],
      version: "test",
      executions: [],
    });
  const subject = subjects.computeOut("n9", "register");
  await t.rejects(conn.request(subject, register(oldCert), 1500), "no reply to the revoked key's register");
  t.match(
    orch.proc.stdout() + orch.proc.stderr(),
    /"node":"n9","kind":"register","code":"SHOAL_ENVELOPE_REVOKED"/,
    "the orchestrator logged the refusal with its code",
  );
  const reply = await conn.request(subject, register(newCert), 10_000);
  t.match(reply.string(), /^ey/, "the same connection's valid key is answered");
});
