import "reflect-metadata";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import t from "tap";
import { silentLogger } from "../core/index.js";
import { ExternalAuthorization, renderExternalAuthorization } from "../fabric/index.js";

const N1 = "spiffe://ext.local/compute/n1";
const N2 = "spiffe://ext.local/compute/n2";
const ORCH = "spiffe://ext.local/orchestrator/orchestrator";
const FAR = new Date("2999-01-01T00:00:00Z");

/**
 * The users block for operator-run NATS servers follows the identities as the
 * supervised server's users do: written 0600, rewritten on every change and at
 * a certificate's expiry, left alone when nothing changed (an operator's file
 * watcher reloads only on real changes).
 */
t.test("the users block follows identity changes and expiry", async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-ext-auth-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, "nats-external-authorization.conf");
  const soon = new Date(Date.now() + 400);
  const users = new ExternalAuthorization({
    file,
    servers: ["tls://nats.example:4222"],
    identities: [
      { spiffeId: ORCH, notAfter: FAR },
      { spiffeId: N1, notAfter: soon },
    ],
    logger: silentLogger,
  });
  t.teardown(() => users.close());

  const text = await users.start();
  t.equal(text, await fs.readFile(file, "utf8"), "start returns what it wrote");
  t.equal((await fs.stat(file)).mode & 0o777, 0o600);
  t.equal(text, renderExternalAuthorization(users.users), "the same block the supervised server gets");
  t.match(text, /user: "spiffe:\/\/ext\.local\/compute\/n1"/);
  t.match(text, /"shoal\.compute\.n1\.out\.>"/, "with the node's grants");

  const before = (await fs.stat(file)).mtimeMs;
  await users.setIdentities([
    { spiffeId: ORCH, notAfter: FAR },
    { spiffeId: N1, notAfter: soon },
  ]);
  t.equal((await fs.stat(file)).mtimeMs, before, "unchanged users: the file is not touched");

  await users.setIdentities([
    { spiffeId: ORCH, notAfter: FAR },
    { spiffeId: N1, notAfter: soon },
    { spiffeId: N2, notAfter: FAR, revoked: true },
  ]);
  t.notMatch(await fs.readFile(file, "utf8"), /compute\/n2/, "a revoked identity is not a user");

  // n1's certificate expires: the block is rewritten without it, with no call.
  for (let i = 0; i < 100 && (await fs.readFile(file, "utf8")).includes(N1); i++) {
    await new Promise((r) => setTimeout(r, 50));
  }
  const after = await fs.readFile(file, "utf8");
  t.notMatch(after, /compute\/n1/, "the expired identity left the block");
  t.match(after, /orchestrator\/orchestrator/);
});
