import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import { TOKEN_EXPIRY_SKEW_MS, TokenStore, tokenStoreKey } from "../cli/token-store.js";
import { tempDir } from "./helpers/pki.js";

const HOUR = 3_600_000;
const later = (ms = HOUR) => new Date(Date.now() + ms).toISOString();

t.test("tokens are kept 0600 in a 0700 directory, keyed by API URL", async (t) => {
  const home = await tempDir(t, "shoal-home-");
  const file = path.join(home, ".shoal", "tokens.json");
  const store = new TokenStore({ file, env: {} });
  t.equal(await store.get("https://orch:1234"), undefined, "no file: no token");

  await store.set("https://Orch:1234/", {
    token: "t1",
    expiresAt: later(),
    method: "password",
    user: "alice",
  });
  await store.set("https://other:1234", { token: "t2", expiresAt: later(), method: "clientKey" });
  t.equal((await fs.stat(file)).mode & 0o777, 0o600, "file 0600");
  t.equal((await fs.stat(path.dirname(file))).mode & 0o777, 0o700, "directory 0700");
  t.equal((await store.get("https://orch:1234"))?.token, "t1", "the URL is normalised");
  t.equal((await store.get("https://other:1234"))?.user, undefined);
  t.same(Object.keys(await store.list()).sort(), ["https://orch:1234", "https://other:1234"]);
  t.equal(tokenStoreKey("https://ORCH:1234/api/"), "https://orch:1234/api");

  const leftovers = (await fs.readdir(path.dirname(file))).filter((f) => f !== "tokens.json");
  t.same(leftovers, [], "atomic writes leave no temporary or lock files");

  t.ok(await store.delete("https://orch:1234"));
  t.notOk(await store.delete("https://orch:1234"), "deleting twice reports nothing deleted");
  t.equal(await store.get("https://orch:1234"), undefined);

  await store.set("https://orch:1234", {
    token: "old",
    expiresAt: later(TOKEN_EXPIRY_SKEW_MS / 2),
    method: "password",
  });
  t.equal(await store.get("https://orch:1234"), undefined, "a token about to expire is not offered");
  t.equal((await store.list())["https://orch:1234"]?.token, "old", "but stays listed");

  const provider = store.provider("https://other:1234");
  t.equal(await provider(), "t2");
});

t.test("concurrent writers do not lose each other's tokens", async (t) => {
  const home = await tempDir(t, "shoal-home-");
  const file = path.join(home, ".shoal", "tokens.json");
  const stores = [0, 1, 2, 3].map(() => new TokenStore({ file, env: {} }));
  await Promise.all(
    stores.map((s, i) =>
      s.set(`https://orch-${i}:1234`, { token: `t${i}`, expiresAt: later(), method: "password" }),
    ),
  );
  t.equal(Object.keys(await stores[0]!.list()).length, 4);
});

t.test("SHOAL_TOKEN and SHOAL_TOKEN_FILE override the store", async (t) => {
  const home = await tempDir(t, "shoal-home-");
  const file = path.join(home, "tokens.json");
  await new TokenStore({ file, env: {} }).set("https://orch:1234", {
    token: "stored",
    expiresAt: later(),
    method: "password",
  });
  const env = new TokenStore({ file, env: { SHOAL_TOKEN: "from-env" } });
  t.same(await env.get("https://orch:1234"), {
    token: "from-env",
    expiresAt: new Date(8_640_000_000_000_000).toISOString(),
    method: "env",
  });
  const tokenFile = path.join(home, "token");
  await fs.writeFile(tokenFile, "from-file\n", { mode: 0o600 });
  t.equal(
    (await new TokenStore({ file, env: { SHOAL_TOKEN_FILE: tokenFile } }).get("https://x:1"))?.token,
    "from-file",
  );

  await fs.writeFile(tokenFile, "  \n");
  await t.rejects(new TokenStore({ file, env: { SHOAL_TOKEN_FILE: tokenFile } }).get("https://x:1"), {
    code: "SHOAL_TOKEN_FILE_INVALID",
  });
  await t.rejects(
    new TokenStore({ file, env: { SHOAL_TOKEN_FILE: path.join(home, "missing") } }).get("https://x:1"),
    {
      code: "SHOAL_TOKEN_FILE_INVALID",
    },
  );
});

t.test("a corrupt or over-readable store is an error with a code and is left as it was", async (t) => {
  const home = await tempDir(t, "shoal-home-");
  const file = path.join(home, "tokens.json");
  const store = new TokenStore({ file, env: {} });
  const bad: [string, string][] = [
    ["not JSON", "{ this is not json"],
    ["wrong version", JSON.stringify({ version: 2, tokens: {} })],
    [
      "entry without token",
      JSON.stringify({ version: 1, tokens: { "https://a:1": { expiresAt: later(), method: "x" } } }),
    ],
    [
      "bad date",
      JSON.stringify({
        version: 1,
        tokens: { "https://a:1": { token: "t", expiresAt: "soon", method: "x" } },
      }),
    ],
  ];
  for (const [name, text] of bad) {
    await fs.writeFile(file, text, { mode: 0o600 });
    await t.rejects(store.get("https://a:1"), { code: "SHOAL_TOKEN_STORE_CORRUPT" }, `${name}: get`);
    await t.rejects(
      store.set("https://a:1", { token: "new", expiresAt: later(), method: "password" }),
      { code: "SHOAL_TOKEN_STORE_CORRUPT" },
      `${name}: set refuses to overwrite`,
    );
    t.equal(await fs.readFile(file, "utf8"), text, `${name}: file untouched`);
  }

  await fs.writeFile(file, JSON.stringify({ version: 1, tokens: {} }));
  await fs.chmod(file, 0o644);
  const e = await store.get("https://a:1").catch((err: unknown) => err);
  t.match(e, { code: "SHOAL_TOKEN_STORE_INSECURE", fix: /chmod 600/ });
});
