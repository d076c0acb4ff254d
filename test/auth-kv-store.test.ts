import { generateKeyPairSync } from "node:crypto";
import { jetstream } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import t from "tap";
import { type Principal, RevocationList, TokenService, UserDirectory } from "../auth/index.js";
import { silentLogger } from "../core/index.js";
import { KvAuthStore } from "../orchestrator/auth-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";

/**
 * Two orchestrators' auth stores on one real JetStream: a token revoked on
 * one is refused by the other on its next check, a role added on one reaches
 * the other, users added and deleted reach the other, a nonce is taken once,
 * and `create` does not overwrite.
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
  const userUpdates: [string, string[] | undefined][] = [];
  await a.watch({ revocation: (e) => revA.apply(e), roles: () => {}, user: () => {} });
  await b.watch({
    revocation: (e) => revB.apply(e),
    roles: (roles) => roleUpdates.push(roles.map((r) => r.name)),
    user: (name, user) => userUpdates.push([name, user?.roles]),
  });

  // Each publishes its verification key in the store; B accepts A's tokens by looking A's kid up there.
  const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const common = { audience: "shoal-api://td" };
  const tokA = await TokenService.create({
    ...common,
    issuer: "spiffe://td/orchestrator/a",
    signingKey: privateKey,
    publishedKeys: a.tokenKeys,
    revocations: revA,
  });
  const { privateKey: keyB } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const tokB = await TokenService.create({
    ...common,
    issuer: "spiffe://td/orchestrator/b",
    signingKey: keyB,
    publishedKeys: b.tokenKeys,
    revocations: revB,
  });
  t.same(
    (await a.tokenKeys.list()).map(([kid, r]) => [kid, r.issuer]).sort(),
    [
      [tokA.kid, "spiffe://td/orchestrator/a"],
      [tokB.kid, "spiffe://td/orchestrator/b"],
    ].sort(),
    "both keys are in the shared store with their issuers",
  );
  const alice: Principal = {
    id: "alice",
    kind: "user",
    roles: ["reader"],
    namespace: "default",
    method: "password",
  };
  const issued = await tokA.issue(alice);
  t.equal((await tokB.verify(issued.token)).principal.id, "alice", "B accepts A's token");
  t.equal((await tokA.verify((await tokB.issue(alice)).token)).claims.iss, "spiffe://td/orchestrator/b");

  // A key nobody published: refused with its code, by both.
  const { privateKey: stranger } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const rogue = await TokenService.create({
    ...common,
    issuer: "spiffe://td/orchestrator/a",
    signingKey: stranger,
    revocations: revA,
  });
  const forged = (await rogue.issue(alice)).token;
  await t.rejects(tokB.verify(forged), { code: "SHOAL_AUTH_TOKEN_UNKNOWN_KEY" }, "unpublished key at B");
  await t.rejects(tokA.verify(forged), { code: "SHOAL_AUTH_TOKEN_UNKNOWN_KEY" }, "unpublished key at A");
  // A record that files another key under the rogue's kid does not make the rogue's tokens verify.
  const real = await a.tokenKeys.get(tokA.kid);
  if (real) await a.tokenKeys.put(rogue.kid, { ...real, kid: rogue.kid });
  await t.rejects(
    tokB.verify(forged),
    { code: "SHOAL_AUTH_TOKEN_UNKNOWN_KEY" },
    "kid must be the key's thumbprint",
  );
  // A's key with A's issuer only: a token of A's key claiming B as issuer is refused.
  const impostor = await TokenService.create({
    ...common,
    issuer: "spiffe://td/orchestrator/b",
    signingKey: privateKey,
    revocations: revA,
  });
  await t.rejects(tokB.verify((await impostor.issue(alice)).token), { code: "SHOAL_AUTH_TOKEN_AUDIENCE" });

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
  // Users added and deleted anywhere reach B's watcher, in order.
  for (let i = 0; i < 250 && userUpdates.length < 3; i++) await new Promise((r) => setTimeout(r, 20));
  t.same(
    userUpdates,
    [
      ["bob", []],
      ["bob", undefined],
      ["bob", []],
    ],
    "B is told of each user change",
  );
});

t.test(
  "create loses to a concurrent create even when the value is not readable yet (a replica behind)",
  async (t) => {
    const url = await startJetStream(t, await tempDir(t, "shoal-authkv-"));
    const nc = await connect({ servers: url });
    t.teardown(() => nc.close());
    const [a, b] = [
      await KvAuthStore.open(jetstream(nc), silentLogger),
      await KvAuthStore.open(jetstream(nc), silentLogger),
    ];
    t.teardown(() => a.close());
    t.teardown(() => b.close());
    const user = { name: "admin", roles: [], namespace: "default", createdAt: "", disabled: false };
    t.equal(await a.users.create("admin", user), true);
    // B reads from a replica that has not caught up: the leader's refusal is the answer.
    const kv = (b.users as unknown as { kv: { get: (key: string) => Promise<null> } }).kv;
    kv.get = async () => null;
    t.equal(await b.users.create("admin", user), false, "not stored, and no error");
  },
);
