import { generateKeyPairSync } from "node:crypto";
import { jetstream } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import t from "tap";
import { RevocationList, TokenService, UserDirectory } from "../auth/index.js";
import { silentLogger } from "../core/index.js";
import { KvAuthStore } from "../orchestrator/auth-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";

/**
 * Two orchestrators' auth stores on one real JetStream: a token revoked on
 * one is refused by the other on its next check, a role added on one reaches
 * the other, a nonce is taken once, and `create` does not overwrite.
 */
t.test("the KV auth store is shared by every orchestrator on the JetStream", async (t) => {
  const url = await startJetStream(t, await tempDir(t, "shoal-authkv-"));
  const open = async () => {
    const nc = await connect({ servers: url });
    t.teardown(() => nc.close());
    const store = await KvAuthStore.open(jetstream(nc), silentLogger);
    t.teardown(() => store.close());
    return store;
  };
  const [a, b] = [await open(), await open()];

  const revA = new RevocationList(a);
  const revB = new RevocationList(b);
  const roleUpdates: string[][] = [];
  await a.watch({ revocation: (e) => revA.apply(e), roles: () => {} });
  await b.watch({
    revocation: (e) => revB.apply(e),
    roles: (roles) => roleUpdates.push(roles.map((r) => r.name)),
  });

  // Both accept tokens of A's key (B lists it as a verification key).
  const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const common = { issuer: "spiffe://td/orchestrator/a", audience: "shoal-api://td" };
  const tokA = await TokenService.create({ ...common, signingKey: privateKey, revocations: revA });
  const { privateKey: keyB } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const tokB = await TokenService.create({
    ...common,
    signingKey: keyB,
    verificationKeys: [privateKey],
    revocations: revB,
  });
  const issued = await tokA.issue({
    id: "alice",
    kind: "user",
    roles: ["reader"],
    namespace: "default",
    method: "password",
  });
  t.equal((await tokB.verify(issued.token)).principal.id, "alice", "B accepts A's token");

  await tokA.revokeToken(issued.token);
  await t.rejects(tokA.verify(issued.token), { code: "SHOAL_AUTH_TOKEN_REVOKED" }, "A at once");
  const deadline = Date.now() + 5000;
  while (!revB.isRevoked(issued.claims.jti) && Date.now() < deadline)
    await new Promise((r) => setTimeout(r, 10));
  await t.rejects(tokB.verify(issued.token), { code: "SHOAL_AUTH_TOKEN_REVOKED" }, "B on its next check");

  // A fresh orchestrator loads the revocations at start.
  const revC = new RevocationList(await open());
  await revC.refresh();
  t.ok(revC.isRevoked(issued.claims.jti), "a later orchestrator sees it too");

  // Roles added on A reach B's authorizer through the watcher.
  await new UserDirectory(a).addRole({ name: "auditor", description: "", actions: ["job:read"] });
  while (!roleUpdates.some((r) => r.includes("auditor")) && Date.now() < deadline + 5000) {
    await new Promise((r) => setTimeout(r, 10));
  }
  t.ok(
    roleUpdates.some((r) => r.includes("auditor")),
    "B is told of A's new role",
  );

  // A nonce is taken by exactly one of two racing orchestrators.
  await a.nonces.put("n1", { expiresAt: Date.now() + 60_000, audience: "shoal-api://td" });
  const taken = await Promise.all([a.nonces.take("n1"), b.nonces.take("n1")]);
  t.equal(taken.filter(Boolean).length, 1, "one take wins");
  t.equal(await a.nonces.take("n1"), undefined, "and it is gone");

  t.equal(
    await a.users.create("bob", {
      name: "bob",
      roles: [],
      namespace: "default",
      createdAt: "",
      disabled: false,
    }),
    true,
  );
  t.equal(
    await b.users.create("bob", {
      name: "bob",
      roles: ["admin"],
      namespace: "default",
      createdAt: "",
      disabled: false,
    }),
    false,
    "create never overwrites",
  );
  t.same((await b.users.get("bob"))?.roles, []);
  await b.users.delete("bob");
  t.equal(await a.users.get("bob"), undefined);
  t.equal(
    await a.users.create("bob", {
      name: "bob",
      roles: [],
      namespace: "default",
      createdAt: "",
      disabled: false,
    }),
    true,
    "a deleted key can be created again",
  );
});
