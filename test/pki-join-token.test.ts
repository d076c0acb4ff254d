import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import { createJoinToken, listJoinTokens, redeemJoinToken, revokeJoinToken } from "../pki/index.js";
import { freshPki, shoalInProcess, tempDir } from "./helpers/pki.js";

t.test("a join token is redeemed once, with its labels", async (t) => {
  const { dir } = await freshPki(t);
  const created = await createJoinToken(dir, { ttlMs: 60_000, labels: { region: "eu" } });
  t.match(created.token, /^shoal1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}$/);
  const stored = await fs.readFile(path.join(dir, "join-tokens.json"), "utf8");
  t.notOk(stored.includes(created.token.split(".")[2]!), "the secret is not stored");
  t.equal((await fs.stat(path.join(dir, "join-tokens.json"))).mode & 0o777, 0o600);
  t.same(await redeemJoinToken(dir, created.token, { nodeId: "edge-1" }), {
    id: created.id,
    labels: { region: "eu" },
    result: undefined,
  });
  await t.rejects(redeemJoinToken(dir, created.token, { nodeId: "edge-2" }), {
    code: "SHOAL_PKI_JOIN_TOKEN_USED",
    message: /edge-1/,
  });
  t.match(await listJoinTokens(dir), [{ id: created.id, usedBy: ["edge-1"], maxUses: 1, state: "used" }]);
});

t.test("wrong, malformed and expired tokens are refused with their codes", async (t) => {
  const { dir } = await freshPki(t);
  const now = new Date("2030-01-01T00:00:00Z");
  const created = await createJoinToken(dir, { ttlMs: 60_000, now });
  const [prefix, id] = created.token.split(".");
  await t.rejects(redeemJoinToken(dir, `${prefix}.${id}.${"A".repeat(43)}`, { nodeId: "n", now }), {
    code: "SHOAL_PKI_JOIN_TOKEN_INVALID",
  });
  await t.rejects(redeemJoinToken(dir, "not-a-token", { nodeId: "n", now }), {
    code: "SHOAL_PKI_JOIN_TOKEN_INVALID",
  });
  await t.rejects(
    redeemJoinToken(dir, created.token, { nodeId: "n", now: new Date("2030-01-01T00:01:01Z") }),
    {
      code: "SHOAL_PKI_JOIN_TOKEN_EXPIRED",
    },
  );
  t.ok(await redeemJoinToken(dir, created.token, { nodeId: "n", now }), "still usable inside its TTL");
  await t.rejects(createJoinToken(await tempDir(t)), { code: "SHOAL_PKI_NOT_FOUND" });
});

t.test("concurrent redemptions of one token: exactly one wins", async (t) => {
  const { dir } = await freshPki(t);
  const { token } = await createJoinToken(dir);
  const results = await Promise.allSettled(
    Array.from({ length: 8 }, (_, i) => redeemJoinToken(dir, token, { nodeId: `n${i}` })),
  );
  t.equal(results.filter((r) => r.status === "fulfilled").length, 1);
});

t.test("the CLI prints the token and the join command with the CA fingerprint", async (t) => {
  const { dir, pki } = await freshPki(t);
  const r = await shoalInProcess([
    "pki",
    "join-token",
    "create",
    "--dir",
    dir,
    "--ttl",
    "30m",
    "--label",
    "zone=a",
  ]);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, `--ca-fingerprint ${pki.rootFingerprint}`);
  const token = /--join (\S+)/.exec(r.stdout)?.[1];
  t.same((await redeemJoinToken(dir, token!, { nodeId: "n1" })).labels, { zone: "a" });
  const bad = await shoalInProcess(["pki", "join-token", "create", "--dir", dir, "--ttl", "soon"]);
  t.equal(bad.code, 1);
  t.match(bad.stderr, /SHOAL_USAGE/);
});

t.test("a token with --uses N enrolls N different ids, each once", async (t) => {
  const { dir } = await freshPki(t);
  const { token } = await createJoinToken(dir, { uses: 2 });
  await redeemJoinToken(dir, token, { nodeId: "a" });
  await t.rejects(redeemJoinToken(dir, token, { nodeId: "a" }), {
    code: "SHOAL_PKI_JOIN_TOKEN_USED",
    message: /already enrolled node a/,
  });
  await redeemJoinToken(dir, token, { nodeId: "b" });
  await t.rejects(redeemJoinToken(dir, token, { nodeId: "c" }), { code: "SHOAL_PKI_JOIN_TOKEN_USED" });
  await t.rejects(createJoinToken(dir, { uses: 0 }), { code: "SHOAL_PKI_JOIN_TOKEN_USES" });
});

t.test("a token made on the PKI directory refuses the labels the API refuses", async (t) => {
  const { dir } = await freshPki(t);
  const many = Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, "v"]));
  for (const labels of [
    { "": "x" },
    { ["k".repeat(129)]: "x" },
    { "zone name": "x" },
    { "-zone": "x" },
    { zone: "v".repeat(257) },
    many,
  ]) {
    await t.rejects(
      createJoinToken(dir, { labels }),
      { code: "SHOAL_PKI_JOIN_TOKEN_LABELS" },
      JSON.stringify(labels).slice(0, 40),
    );
  }
  const ok = await createJoinToken(dir, { labels: { "topology.io/zone": "eu-1", tier_2: "gold" } });
  t.same(ok.labels, { "topology.io/zone": "eu-1", tier_2: "gold" });
});

t.test("a use is spent only when the enrollment it guards succeeds", async (t) => {
  const { dir } = await freshPki(t);
  const { token } = await createJoinToken(dir);
  await t.rejects(
    redeemJoinToken(dir, token, {
      nodeId: "a",
      use: async () => {
        throw new Error("signing failed");
      },
    }),
    { message: "signing failed" },
  );
  const ok = await redeemJoinToken(dir, token, { nodeId: "a", use: async () => 42 });
  t.equal(ok.result, 42);
});

t.test("a revoked token enrolls nobody; revoke by id or whole token, from the CLI too", async (t) => {
  const { dir } = await freshPki(t);
  const one = await createJoinToken(dir, { uses: 5 });
  const revoked = await revokeJoinToken(dir, one.token);
  t.equal(revoked.state, "revoked");
  t.notOk("secretSha256" in revoked, "no secret hash in views");
  await t.rejects(redeemJoinToken(dir, one.token, { nodeId: "a" }), { code: "SHOAL_PKI_JOIN_TOKEN_REVOKED" });
  await t.rejects(revokeJoinToken(dir, "0123456789abcdef"), { code: "SHOAL_PKI_JOIN_TOKEN_INVALID" });

  const two = await createJoinToken(dir);
  const r = await shoalInProcess(["pki", "join-token", "revoke", two.id, "--dir", dir]);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, `revoked join token ${two.id}`);
  await t.rejects(redeemJoinToken(dir, two.token, { nodeId: "a" }), { code: "SHOAL_PKI_JOIN_TOKEN_REVOKED" });
  const list = await shoalInProcess(["pki", "join-token", "list", "--dir", dir]);
  t.match(list.stdout, new RegExp(`${two.id}\\s+revoked`));
});

t.test("records written before multi-use tokens still read as single-use", async (t) => {
  const { dir } = await freshPki(t);
  const { token, id } = await createJoinToken(dir);
  const file = path.join(dir, "join-tokens.json");
  const data = JSON.parse(await fs.readFile(file, "utf8"));
  data.tokens[0].usedBy = "old-node";
  data.tokens[0].usedAt = new Date().toISOString();
  delete data.tokens[0].maxUses;
  await fs.writeFile(file, JSON.stringify(data));
  t.match(await listJoinTokens(dir), [{ id, usedBy: ["old-node"], maxUses: 1, state: "used" }]);
  await t.rejects(redeemJoinToken(dir, token, { nodeId: "n" }), { code: "SHOAL_PKI_JOIN_TOKEN_USED" });
});
