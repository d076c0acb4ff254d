import "reflect-metadata";
import t from "tap";
import {
  createJoinToken,
  isIdentityRevoked,
  listJoinTokens,
  redeemJoinToken,
  revokeCertificate,
  revokeIdentity,
} from "../pki/index.js";
import { freshPki } from "./helpers/pki.js";

t.test("revoking an identity revokes all its certificates, bars it and its token", async (t) => {
  const { dir, pki } = await freshPki(t);
  const { token } = await createJoinToken(dir, { ttlMs: 60_000 });
  await redeemJoinToken(dir, token, { nodeId: "edge-1" });
  const a = await pki.issue({ role: "compute", id: "edge-1" });
  const b = await pki.issue({ role: "compute", id: "edge-1" });
  const other = await pki.issue({ role: "compute", id: "edge-2" });
  const id = `spiffe://${pki.trustDomain}/compute/edge-1`;

  const first = await revokeIdentity(dir, id);
  t.ok(first.known);
  t.same(first.revoked.map((e) => e.serial).sort(), [a.serial, b.serial].sort());
  const statuses = new Map((await pki.list()).map((e) => [e.serial, e.status]));
  t.equal(statuses.get(a.serial), "revoked");
  t.equal(statuses.get(b.serial), "revoked");
  t.equal(statuses.get(other.serial), "valid", "another node keeps its certificate");
  t.match(await isIdentityRevoked(dir, id), { spiffeId: id, reason: "privilegeWithdrawn" });
  t.equal(await isIdentityRevoked(dir, `spiffe://${pki.trustDomain}/compute/edge-2`), undefined);

  await t.rejects(redeemJoinToken(dir, token, { nodeId: "edge-1" }), {
    code: "SHOAL_PKI_JOIN_TOKEN_REVOKED",
  });
  t.ok((await listJoinTokens(dir))[0]?.revokedAt, "the token it enrolled with is marked revoked");
  const fresh = await createJoinToken(dir, { ttlMs: 60_000 });
  t.equal((await listJoinTokens(dir)).length, 2, "a revoked token is kept (until it expires) to say why");
  await t.rejects(redeemJoinToken(dir, fresh.token, { nodeId: "edge-1" }), {
    code: "SHOAL_PKI_IDENTITY_REVOKED",
    message: /edge-1.*may not enroll again/,
  });
  t.ok(await redeemJoinToken(dir, fresh.token, { nodeId: "edge-3" }), "the refused token was not used up");

  const again = await revokeIdentity(dir, id);
  t.same(again, { revoked: [], known: true }, "idempotent");
  t.same(await revokeIdentity(dir, `spiffe://${pki.trustDomain}/compute/ghost`), {
    revoked: [],
    known: false,
  });
  await t.rejects(revokeIdentity(dir, "spiffe://x/compute/A B"), { code: "SHOAL_PKI_BAD_ID" });
});

t.test("revoking one certificate bars its identity unless it was superseded", async (t) => {
  const { dir, pki } = await freshPki(t);
  const old = await pki.issue({ role: "compute", id: "rotating" });
  await pki.issue({ role: "compute", id: "rotating" });
  await revokeCertificate(dir, old.serial, "superseded");
  t.equal(await isIdentityRevoked(dir, `spiffe://${pki.trustDomain}/compute/rotating`), undefined);

  const stolen = await pki.issue({ role: "compute", id: "stolen" });
  await revokeCertificate(dir, stolen.certPem, "keyCompromise");
  t.match(await isIdentityRevoked(dir, `spiffe://${pki.trustDomain}/compute/stolen`), {
    reason: "keyCompromise",
  });
  const server = await pki.issue({ role: "server", dns: ["orch.example"] });
  await revokeCertificate(dir, server.serial, "keyCompromise");
  t.equal((await pki.list()).find((e) => e.serial === server.serial)?.status, "revoked");
});
