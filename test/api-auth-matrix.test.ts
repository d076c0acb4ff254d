import "reflect-metadata";
import { createPrivateKey, generateKeyPairSync } from "node:crypto";
import { promises as fs } from "node:fs";
import https from "node:https";
import path from "node:path";
import { pino } from "pino";
import t from "tap";
import { answerChallenge, clientIdOf, RevocationList, TokenService } from "../auth/index.js";
import { loadConfig } from "../core/index.js";
import { apiAudience, Orchestrator, TOKEN_KEY_FILE } from "../orchestrator/index.js";
import type { NodeRecord } from "../orchestrator/records.js";
import { initPki, openPki } from "../pki/index.js";
import { apiCaller } from "./helpers/api-call.js";
import { tempDir } from "./helpers/cluster.js";

/**
 * The API's authentication and authorization against a real orchestrator
 * (in process: real nats-server, JetStream KV, HTTPS): every method × role ×
 * endpoint answers 2xx, 401 or 403 with its code; expired, revoked and
 * forged tokens; a replayed client-key signature; bad policy files.
 */

const WASM = Buffer.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]).toString("base64");
const SPEC = {
  Name: "hello",
  Type: "batch",
  Tasks: [
    {
      Name: "main",
      Engine: { Type: "wasm", Params: { EntryModule: { Type: "inline", Params: { Content: WASM } } } },
    },
  ],
};
const ADMIN_PASSWORD = "admin-password-for-tests";
const SHARED_SECRET = "a-shared-secret-for-tests";
const PASSWORD = "user-password-for-tests";

async function startOrchestrator(dataDir: string, overrides: string[] = [], env: NodeJS.ProcessEnv = {}) {
  const config = await loadConfig({
    env: {},
    overrides: [
      `DataDir=${dataDir}`,
      "API.Host=127.0.0.1",
      "API.Port=0",
      "Orchestrator.Host=127.0.0.1",
      "Orchestrator.Port=0",
      ...overrides,
    ],
  });
  const printed: string[] = [];
  /** Warnings and errors the orchestrator logged, by message. */
  const logged: string[] = [];
  const orch = new Orchestrator({
    config,
    logger: pino({ level: "warn" }, { write: (line: string) => logged.push(JSON.parse(line).msg) }),
    version: "test",
    print: (l) => printed.push(l),
    env,
  });
  return { orch, printed, logged, start: () => orch.start() };
}

t.test("method × role × endpoint", async (t) => {
  const dir = await tempDir(t, "shoal-authz-");
  const dataDir = path.join(dir, "orch");
  const { orch, logged } = await startOrchestrator(
    dataDir,
    ["API.Auth.Methods=anonymous,clientKey,password,sharedSecret,mtls"],
    { SHOAL_ADMIN_PASSWORD: ADMIN_PASSWORD, SHOAL_SHARED_SECRET: SHARED_SECRET },
  );
  t.teardown(() => orch.close());
  const ep = await orch.start();
  const caPem = await fs.readFile(ep.caFile, "utf8");
  const api = apiCaller(ep.apiUrl, caPem);
  t.teardown(api.close);
  const { call } = api;

  const methods = await call("GET", "/api/v1/auth");
  t.equal(methods.status, 200);
  t.same(
    methods.json.Methods.map((m: { name: string }) => m.name),
    ["anonymous", "clientKey", "password", "sharedSecret", "mtls"],
  );

  // Before any credential is checked, a public route reads no large body.
  const huge = { username: "admin", password: "x".repeat(100 * 1024) };
  for (const route of ["/api/v1/auth/password", "/api/v1/enroll"]) {
    const r = await call("POST", route, { body: huge });
    t.equal(r.status, 413, `${route}: a 100 KiB body is refused unread`);
    t.equal(r.json.error?.code, "SHOAL_ORCH_REQUEST_INVALID");
  }

  const login = async (method: string, body: unknown, caller = call) => {
    const r = await caller("POST", `/api/v1/auth/${method}`, { body });
    t.equal(r.status, 201, `${method} login${r.status === 201 ? "" : `: ${r.text}`}`);
    return r.json.Token as string;
  };
  const admin = await login("password", { username: "admin", password: ADMIN_PASSWORD });

  // Without a credential no route reads a large body (authorization needs the parsed body,
  // so it comes after): declared, or sent in chunks; a caller with a token may send one.
  const bigJob = { Job: { Name: "big", Tasks: [], Padding: "x".repeat(100 * 1024) } };
  const anonymousBig = await call("PUT", "/api/v1/orchestrator/jobs", { body: bigJob });
  t.equal(anonymousBig.status, 413, "an anonymous 100 KiB body is refused unread");
  t.match(anonymousBig.json.error?.message, /without credentials/);
  const chunked = await new Promise<number>((resolve, reject) => {
    const req = https.request(
      new URL("/api/v1/orchestrator/jobs", ep.apiUrl),
      { method: "PUT", ca: caPem, headers: { "content-type": "application/json" } },
      (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      },
    );
    req.on("error", reject);
    const text = JSON.stringify(bigJob);
    req.write(text.slice(0, 1000));
    req.end(text.slice(1000));
  });
  t.equal(chunked, 413, "and so is one sent in chunks, as it arrives");
  const adminBig = await call("PUT", "/api/v1/orchestrator/jobs", { token: admin, body: bigJob });
  t.equal(adminBig.status, 400, "a caller with a token has it read (and validated)");
  t.match(adminBig.json.error?.field, /Padding/);

  const clientKeyLogin = async (
    privateKey = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey,
  ) => {
    const ch = await call("POST", "/api/v1/auth/clientKey", { body: {} });
    t.equal(ch.status, 200, "a client-key challenge");
    const answer = answerChallenge(ch.json.Challenge, privateKey);
    const r = await call("POST", "/api/v1/auth/clientKey", { body: answer });
    return { r, answer };
  };

  // Users of each role, made by the admin over the API. Most log in by a
  // registered client key (a scrypt per password login would make this slow).
  const addUser = async (name: string, roles: string[], namespace = "default", password?: string) => {
    const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
    const r = await call("POST", "/api/v1/auth/users", {
      token: admin,
      body: {
        Name: name,
        Roles: roles,
        Namespace: namespace,
        ClientKeys: [clientIdOf(privateKey)],
        ...(password ? { Password: password } : {}),
      },
    });
    t.equal(r.status, 201, `user ${name} added${r.status === 201 ? "" : `: ${r.text}`}`);
    return async () => {
      const { r } = await clientKeyLogin(privateKey);
      t.equal(r.json.Subject, name, `${name}'s registered key logs in as ${name}`);
      return r.json.Token as string;
    };
  };
  const ops = await addUser("ops", ["operator"]);
  const sub1 = await addUser("sub1", ["submitter"], "team-a");
  const sub2 = await addUser("sub2", ["submitter"], "team-a");
  const rdr = await addUser("rdr", ["reader"], "default", PASSWORD);
  await addUser("carol", ["reader"]);
  const pki = await openPki(ep.pkiDir);
  const carolCert = await pki.issue({ role: "user", id: "carol" });
  const mtlsApi = apiCaller(ep.apiUrl, caPem, { cert: carolCert.certPem, key: carolCert.keyPem! });
  t.teardown(mtlsApi.close);

  const ck = await clientKeyLogin();
  t.equal(ck.r.status, 201, ck.r.text);
  t.match(ck.r.json.Subject, /^client:[0-9a-f]{64}$/, "an unregistered key is a client of anonymous mode");

  const tokens: Record<string, string | undefined> = {
    anonymous: undefined,
    client: ck.r.json.Token,
    admin,
    operator: await ops(),
    submitter: await sub1(),
    otherSubmitter: await sub2(),
    reader: await login("password", { username: "rdr", password: PASSWORD }),
    shared: await login("sharedSecret", { secret: SHARED_SECRET }),
    mtlsReader: await login("mtls", {}, mtlsApi.call),
  };
  const who = Object.keys(tokens);

  // Nodes waiting for approval (records as a registering node leaves them).
  const { store } = orch.services;
  const pending = (id: string): NodeRecord => ({
    ID: id,
    Labels: {},
    Capacity: { cpu: 1, memory: 1 << 30 },
    Engines: ["wasm"],
    Version: "test",
    Approval: "PENDING",
    Health: "HEALTHY",
    LastSeen: Date.now(),
    FirstSeen: Date.now(),
    ChainPem: "",
  });
  for (const w of who) store.putNode(pending(`node-${w.toLowerCase()}`));

  const submit = async (token: string | undefined) =>
    call("PUT", "/api/v1/orchestrator/jobs", { token, body: { Job: SPEC } });
  const job1 = (await submit(tokens.submitter)).json.JobID as string;
  t.match(job1, /^j-/);
  t.equal(store.jobs.get(job1)?.Submitter.sub, "sub1", "the job records who submitted it");
  t.equal(store.jobs.get(job1)?.Namespace, "team-a", "in the submitter's namespace");

  /** Expected status per principal; `deny` is 403 SHOAL_AUTH_DENIED. */
  const expect = async (
    what: string,
    request: (
      token: string | undefined,
      w: string,
    ) => Promise<{ status: number; json: Record<string, unknown> }>,
    allowed: string[],
    okStatus = 200,
  ) => {
    for (const w of who) {
      const r = await request(tokens[w], w);
      if (allowed.includes(w)) {
        t.equal(
          r.status,
          okStatus,
          `${what}: ${w} allowed${r.status === okStatus ? "" : ` ${JSON.stringify(r.json)}`}`,
        );
      } else {
        t.equal(r.status, 403, `${what}: ${w} denied`);
        t.equal((r.json.error as { code?: string })?.code, "SHOAL_AUTH_DENIED", `${what}: ${w} code`);
      }
    }
  };

  await expect("alive", (token) => call("GET", "/api/v1/agent/alive", { token }), who);
  await expect("version", (token) => call("GET", "/api/v1/agent/version", { token }), who);
  await expect("list jobs", (token) => call("GET", "/api/v1/orchestrator/jobs", { token }), who);
  await expect(
    "describe sub1's job",
    (token) => call("GET", `/api/v1/orchestrator/jobs/${job1}`, { token }),
    who.filter((w) => w !== "otherSubmitter"),
  );
  await expect(
    "logs of sub1's job",
    (token) => call("GET", `/api/v1/orchestrator/jobs/${job1}/logs`, { token }),
    ["admin", "operator", "submitter", "reader", "shared", "mtlsReader"],
  );
  await expect("submit", submit, ["client", "admin", "submitter", "otherSubmitter"], 201);
  await expect(
    "list nodes",
    (token) => call("GET", "/api/v1/orchestrator/nodes", { token }),
    who.filter((w) => !w.toLowerCase().includes("submitter")),
  );
  await expect(
    "approve a node",
    (token, w) => call("POST", `/api/v1/orchestrator/nodes/node-${w.toLowerCase()}/approve`, { token }),
    ["admin", "operator", "shared"],
  );
  t.equal(store.nodes.get("node-operator")?.Approval, "APPROVED", "the operator approved its node");
  t.equal(store.nodes.get("node-reader")?.Approval, "PENDING", "the reader did not");
  await expect("list users", (token) => call("GET", "/api/v1/auth/users", { token }), ["admin"]);
  await expect("list roles", (token) => call("GET", "/api/v1/auth/roles", { token }), ["admin"]);

  // Stop: everyone but the owner and the admin is refused first; then the owner stops it.
  const stopJob = (id: string) => (token: string | undefined) =>
    call("DELETE", `/api/v1/orchestrator/jobs/${id}`, { token });
  for (const w of ["anonymous", "client", "otherSubmitter", "operator", "reader", "shared", "mtlsReader"]) {
    const r = await stopJob(job1)(tokens[w]);
    t.equal(r.status, 403, `stop sub1's job: ${w} denied`);
    t.equal(r.json.error?.code, "SHOAL_AUTH_DENIED");
  }
  const stopped = await stopJob(job1)(tokens.submitter);
  t.equal(stopped.status, 200, `the submitter stops its own job: ${stopped.text}`);
  t.equal(stopped.json.State, "Stopped");
  const job2 = (await submit(tokens.otherSubmitter)).json.JobID as string;
  t.equal((await stopJob(job2)(tokens.admin)).status, 200, "the admin stops anyone's job");
  const clientJob = (await submit(tokens.client)).json.JobID as string;
  t.equal((await stopJob(clientJob)(tokens.client)).status, 200, "a client key stops its own job");

  // A submitter's listing shows its own jobs only; a reader's every job.
  const listed = async (token: string | undefined) =>
    (await call("GET", "/api/v1/orchestrator/jobs", { token })).json.Items.map((j: { ID: string }) => j.ID);
  t.ok((await listed(tokens.submitter)).includes(job1));
  t.notOk((await listed(tokens.submitter)).includes(job2), "sub1 does not see sub2's job");
  t.ok((await listed(tokens.reader)).includes(job2));

  t.test("tokens that are bad, expired, revoked or from elsewhere get 401 with their code", async (t) => {
    const bad = async (token: string, code: string, why: string) => {
      const r = await call("GET", "/api/v1/orchestrator/jobs", { token });
      t.equal(r.status, 401, why);
      t.equal(r.json.error?.code, code, why);
    };
    await bad("not-a-jwt", "SHOAL_AUTH_TOKEN_INVALID", "garbage");
    const [h, p] = admin.split(".");
    const none = `${Buffer.from(JSON.stringify({ alg: "none", typ: "at+jwt" })).toString("base64url")}.${p}.`;
    await bad(none, "SHOAL_AUTH_TOKEN_ALGORITHM", "alg none");
    await bad(`${h}.${p}.${"A".repeat(86)}`, "SHOAL_AUTH_TOKEN_INVALID", "forged signature");

    // A genuine token of this orchestrator's key, expired a day ago.
    const keyPem = await fs.readFile(path.join(dataDir, TOKEN_KEY_FILE), "utf8");
    const claims = JSON.parse(Buffer.from(p!, "base64url").toString());
    const past = await TokenService.create({
      signingKey: createPrivateKey(keyPem),
      issuer: claims.iss,
      audience: apiAudience(pki.trustDomain),
      ttlSeconds: 60,
      revocations: new RevocationList({} as never),
      now: () => Date.now() - 86_400_000,
    });
    const expired = await past.issue({
      id: "admin",
      kind: "user",
      roles: ["admin"],
      namespace: "default",
      method: "password",
    });
    await bad(expired.token, "SHOAL_AUTH_TOKEN_EXPIRED", "expired a day ago");

    // Revocation takes effect on the next request.
    const victim = await rdr();
    t.equal((await call("GET", "/api/v1/orchestrator/jobs", { token: victim })).status, 200);
    const rv = await call("DELETE", "/api/v1/auth/tokens", { token: victim });
    t.equal(rv.status, 200, `a user revokes its own token (logout): ${rv.text}`);
    await bad(victim, "SHOAL_AUTH_TOKEN_REVOKED", "revoked by its owner");
    const other = await rdr();
    const jti = JSON.parse(Buffer.from(other.split(".")[1]!, "base64url").toString()).jti;
    const byReader = await call("DELETE", "/api/v1/auth/tokens", {
      token: tokens.reader,
      body: { JTI: jti },
    });
    t.equal(byReader.status, 403, `a reader cannot revoke by jti: ${byReader.text}`);
    const byAdmin = await call("DELETE", "/api/v1/auth/tokens", { token: admin, body: { JTI: jti } });
    t.equal(byAdmin.status, 200, byAdmin.text);
    await bad(other, "SHOAL_AUTH_TOKEN_REVOKED", "revoked by the admin by jti");
  });

  t.test("a client-key signature cannot be replayed", async (t) => {
    const { r, answer } = await clientKeyLogin();
    t.equal(r.status, 201);
    const again = await call("POST", "/api/v1/auth/clientKey", { body: answer });
    t.equal(again.status, 401);
    t.equal(again.json.error?.code, "SHOAL_AUTH_CHALLENGE_INVALID");
  });

  t.test("without a token, a connection's user certificate is its user, on every request", async (t) => {
    // A scraper with a certificate of an operator: no login first.
    await addUser("scraper", ["operator"]);
    const cert = await pki.issue({ role: "user", id: "scraper" });
    const scraper = apiCaller(ep.apiUrl, caPem, { cert: cert.certPem, key: cert.keyPem! });
    t.teardown(scraper.close);
    t.equal((await call("GET", "/api/v1/agent/metrics")).status, 403, "anonymous callers may not");
    const scraped = await scraper.call("GET", "/api/v1/agent/metrics");
    t.equal(scraped.status, 200, scraped.text.slice(0, 200));
    t.match(scraped.text, /shoal_nodes\{/);
    const reader = await mtlsApi.call("GET", "/api/v1/agent/metrics");
    t.equal(reader.status, 403, "a reader's certificate is the reader, who may not either");
    t.equal(reader.json.error?.code, "SHOAL_AUTH_DENIED");
    t.equal(
      (await scraper.call("GET", "/api/v1/agent/metrics", { token: await login("mtls", {}, mtlsApi.call) }))
        .status,
      403,
      "a token wins over the certificate",
    );

    // Checked on every request: a deleted user's certificate stops at once.
    t.equal((await call("DELETE", "/api/v1/auth/users/scraper", { token: admin })).status, 200);
    const gone = await scraper.call("GET", "/api/v1/agent/metrics");
    t.equal(gone.status, 401);
    t.equal(gone.json.error?.code, "SHOAL_AUTH_BAD_CREDENTIALS");

    // A certificate of another CA is refused, and stays refused on its connection.
    const otherDir = await tempDir(t, "shoal-other-ca-");
    await initPki(otherDir, { trustDomain: pki.trustDomain });
    const forged = await (await openPki(otherDir)).issue({ role: "user", id: "admin" });
    const forger = apiCaller(ep.apiUrl, caPem, { cert: forged.certPem, key: forged.keyPem! });
    t.teardown(forger.close);
    const warned = () => logged.filter((m) => m === "client certificate refused").length;
    const before = warned();
    for (let i = 0; i < 3; i++) {
      const r = await forger.call("GET", "/api/v1/orchestrator/nodes");
      t.equal(r.status, 401, "another CA's certificate, even for admin");
      t.equal(r.json.error?.code, "SHOAL_AUTH_CERT_REJECTED");
    }
    t.equal(warned() - before, 1, "checked and logged once for its connection");
  });

  t.test("logins that fail say why", async (t) => {
    const wrong = await call("POST", "/api/v1/auth/password", {
      body: { username: "ops", password: "wrong-password-here" },
    });
    t.equal(wrong.status, 401);
    t.equal(wrong.json.error?.code, "SHOAL_AUTH_BAD_CREDENTIALS");
    const nope = await call("POST", "/api/v1/auth/kerberos", { body: {} });
    t.equal(nope.status, 400);
    t.equal(nope.json.error?.code, "SHOAL_AUTH_METHOD_DISABLED");
    const noCert = await call("POST", "/api/v1/auth/mtls", { body: {} });
    t.equal(noCert.status, 401);
    t.equal(noCert.json.error?.code, "SHOAL_AUTH_CERT_REJECTED");
  });

  t.test(
    "a deleted user's tokens are refused at once, and not revived by a new user of the name",
    async (t) => {
      const token = await (await addUser("gone", ["operator"]))();
      t.equal(
        (await call("GET", "/api/v1/orchestrator/nodes", { token })).status,
        200,
        "works while the user exists",
      );
      t.equal((await call("DELETE", "/api/v1/auth/users/gone", { token: admin })).status, 200);
      const refused = await call("GET", "/api/v1/orchestrator/nodes", { token });
      t.equal(refused.status, 401);
      t.equal(refused.json.error?.code, "SHOAL_AUTH_TOKEN_REVOKED");
      // Added again at once (within the second the token was issued in), with another role:
      // the token names the user's random id, which the new user does not have.
      const fresh = await (await addUser("gone", ["reader"]))();
      const old = await call("GET", "/api/v1/orchestrator/nodes", { token });
      t.equal(old.json.error?.code, "SHOAL_AUTH_TOKEN_REVOKED", "the old operator token stays void");
      t.equal(
        (await call("GET", "/api/v1/orchestrator/nodes", { token: fresh })).status,
        200,
        "the new user's works",
      );
    },
  );

  t.test("roles added at run time take effect", async (t) => {
    const role = await call("POST", "/api/v1/auth/roles", {
      token: admin,
      body: { Name: "approver", Actions: ["node:approve", "node:read"] },
    });
    t.equal(role.status, 201, role.text);
    const token = await (await addUser("appr", ["approver"]))();
    store.putNode(pending("node-appr"));
    t.equal((await call("POST", "/api/v1/orchestrator/nodes/node-appr/approve", { token })).status, 200);
    t.equal((await call("POST", "/api/v1/auth/users", { token, body: {} })).status, 403);
  });

  t.test("one address gets client-key challenges (a KV write each) at a bounded rate", async (t) => {
    const statuses: number[] = [];
    let refused: Awaited<ReturnType<typeof call>> | undefined;
    for (let i = 0; i < 160; i++) {
      const r = await call("POST", "/api/v1/auth/clientKey", { body: {} });
      statuses.push(r.status);
      if (r.status !== 200) refused ??= r;
    }
    t.ok(
      statuses.slice(0, 90).every((s) => s === 200),
      "a burst is served",
    );
    t.ok(refused, `then refused (${statuses.filter((s) => s !== 200).length} of 160)`);
    t.equal(refused?.status, 429);
    t.equal(refused?.json.error?.code, "SHOAL_AUTH_RATE_LIMITED");
    t.equal(refused?.headers["retry-after"], "1");
  });
});

t.test("without anonymous mode a request without a token is 401", async (t) => {
  const dir = await tempDir(t, "shoal-authz-");
  const { orch, printed } = await startOrchestrator(path.join(dir, "orch"), ["API.Auth.Methods=password"]);
  t.teardown(() => orch.close());
  const ep = await orch.start();
  const generated = printed.join("\n").match(/First admin created: user admin, password (\S+)/);
  t.ok(generated, "the generated admin password is printed once");
  const file = path.join(dir, "orch", "admin-password");
  t.equal((await fs.stat(file)).mode & 0o777, 0o600, "and written 0600");
  t.equal((await fs.readFile(file, "utf8")).trim(), generated?.[1]);

  const api = apiCaller(ep.apiUrl, await fs.readFile(ep.caFile, "utf8"));
  t.teardown(api.close);
  const r = await api.call("GET", "/api/v1/orchestrator/jobs");
  t.equal(r.status, 401);
  t.equal(r.json.error?.code, "SHOAL_AUTH_UNAUTHENTICATED");
  t.equal((await api.call("GET", "/api/v1/agent/alive")).status, 200, "public routes stay public");
  t.equal((await api.call("GET", "/api/v1/pki/ca")).status, 200);
  const ck = await api.call("POST", "/api/v1/auth/clientKey", { body: {} });
  t.equal(ck.json.error?.code, "SHOAL_AUTH_METHOD_DISABLED", "methods not listed are off");
  const login = await api.call("POST", "/api/v1/auth/password", {
    body: { username: "admin", password: generated?.[1] },
  });
  t.equal(login.status, 201);
  const ok = await api.call("GET", "/api/v1/orchestrator/jobs", { token: login.json.Token });
  t.equal(ok.status, 200);
});

t.test("a bad policy file refuses the start with its location", async (t) => {
  const dir = await tempDir(t, "shoal-authz-");
  const cases = [
    [
      "syntax.cedar",
      "permit (principal, action, resource)\nwhen { principal.x == };\n",
      "SHOAL_AUTH_POLICY_SYNTAX",
    ],
    [
      "schema.cedar",
      '@id("bad")\npermit (principal, action == Shoal::Action::"job:fly", resource);\n',
      "SHOAL_AUTH_POLICY_SCHEMA",
    ],
  ] as const;
  for (const [name, text, code] of cases) {
    const file = path.join(dir, name);
    await fs.writeFile(file, text);
    const { orch } = await startOrchestrator(path.join(dir, `orch-${name}`), [
      `API.Auth.AccessPolicyPath=${file}`,
    ]);
    await t.rejects(
      orch.start(),
      { code, message: new RegExp(`${name.replace(".", "\\.")}:\\d+:\\d+`) },
      name,
    );
    await orch.close();
  }
});
