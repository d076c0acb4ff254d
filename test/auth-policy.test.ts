import "reflect-metadata";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { Writable } from "node:stream";
import * as cedar from "@cedar-policy/cedar-wasm/nodejs";
import fc from "fast-check";
import t from "tap";
import {
  ACTIONS,
  type Action,
  AUTH_CODES,
  Authorizer,
  BUILTIN_ROLES,
  compilePolicies,
  DEFAULT_SCHEMA_FILE,
  defaultPolicyDir,
  loadPolicies,
  PolicyFileError,
  type Principal,
  parsePolicyCases,
  type Resource,
  runPolicyCases,
} from "../auth/index.js";
import { main } from "../cli/main.js";
import { createLogger } from "../core/index.js";

const schemaFile = path.join(defaultPolicyDir(), DEFAULT_SCHEMA_FILE);
const schemaText = await readFile(schemaFile, "utf8");
const policies = await loadPolicies();

const user = (id: string, roles: string[], namespace = "team-a"): Principal => ({
  id,
  kind: "user",
  roles,
  namespace,
  method: "password",
});
const SUBJECTS: Record<string, Principal> = {
  admin: user("root", ["admin"]),
  operator: user("olga", ["operator"]),
  submitter: user("alice", ["submitter"]),
  reader: user("rita", ["reader"]),
  "no-role user": user("nora", []),
  "client key (anonymous mode)": {
    id: "client:ab12",
    kind: "client",
    roles: [],
    namespace: "default",
    method: "clientKey",
  },
  anonymous: { id: "anonymous", kind: "anonymous", roles: [], namespace: "default", method: "anonymous" },
};

/** The resource an action is asked on: the subject's own (own job, own namespace, own token) or someone else's. */
function resourceFor(action: Action, p: Principal, whose: "own" | "other"): Resource {
  const own = whose === "own";
  const ns = own ? p.namespace : "team-b";
  const owner = own ? p.id : "bob";
  if (action === "job:list") return { type: "Namespace", id: ns };
  if (action.startsWith("job:")) return { type: "Job", id: `job-${whose}`, owner, namespace: ns };
  if (action === "node:list") return { type: "Api" };
  if (action.startsWith("node:")) return { type: "Node", id: "node-1" };
  if (action === "token:revoke") return { type: "Token", id: `jti-${whose}`, owner };
  return { type: "Api" };
}

type Grant = "both" | "own";
const JOB_READ = { "job:list": "both", "job:read": "both" } as const;
const NODE_READ = { "node:list": "both", "node:read": "both" } as const;
const ALWAYS = { "agent:read": "both", "token:revoke": "own" } as const;

/** Expected decisions, written out per subject: `both` = own and other resource allowed; `own` = only own; absent = denied. */
const EXPECTED: Record<string, Partial<Record<Action, Grant>>> = {
  admin: Object.fromEntries(ACTIONS.map((a) => [a, "both"])),
  operator: {
    ...ALWAYS,
    "agent:metrics": "both",
    ...JOB_READ,
    ...NODE_READ,
    "job:logs": "both",
    "node:approve": "both",
    "node:reject": "both",
    "node:delete": "both",
  },
  submitter: {
    ...ALWAYS,
    "job:submit": "own",
    "job:list": "own",
    "job:read": "own",
    "job:logs": "own",
    "job:results": "own",
    "job:stop": "own",
  },
  reader: { ...ALWAYS, ...JOB_READ, ...NODE_READ, "job:logs": "both", "job:results": "both" },
  "no-role user": { ...ALWAYS },
  "client key (anonymous mode)": {
    ...ALWAYS,
    ...JOB_READ,
    ...NODE_READ,
    "job:submit": "own",
    "job:logs": "own",
    "job:results": "own",
    "job:stop": "own",
  },
  anonymous: { "agent:read": "both", ...JOB_READ, ...NODE_READ },
};

t.test("the default policy set validates and names every policy by its @id", async (t) => {
  t.same(policies.ids, [
    "agent-read",
    "revoke-own-token",
    "anonymous-read",
    "client-key-read",
    "client-key-own-jobs",
    "only-admin-manages-access",
  ]);
  t.same(policies.warnings, []);
});

t.test("ACTIONS lists exactly the schema's actions", async (t) => {
  const json = cedar.schemaToJson(schemaText);
  if (json.type !== "success") throw new Error("schema");
  t.same(Object.keys(json.json.Shoal!.actions).sort(), [...ACTIONS].sort());
});

t.test("Cedar matrix: subject × action × own/other resource", async (t) => {
  const authorizer = new Authorizer({ policies, roles: BUILTIN_ROLES, cacheSize: 0 });
  for (const [name, principal] of Object.entries(SUBJECTS)) {
    for (const action of ACTIONS) {
      for (const whose of ["own", "other"] as const) {
        const grant = EXPECTED[name]![action];
        const want = grant === "both" || (grant === "own" && whose === "own") ? "allow" : "deny";
        const got = authorizer.authorize({
          principal,
          action,
          resource: resourceFor(action, principal, whose),
        });
        t.equal(got.decision, want, `${name} ${action} on ${whose}`);
        t.same(got.errors, [], `${name} ${action} on ${whose}: no evaluation errors`);
      }
    }
  }
});

t.test("job stop and node approve are allowed to the right roles, with readable reasons", async (t) => {
  const a = new Authorizer({ policies, roles: BUILTIN_ROLES });
  const alice = SUBJECTS.submitter!;
  const stop = a.authorize({
    principal: alice,
    action: "job:stop",
    resource: resourceFor("job:stop", alice, "own"),
  });
  t.same(stop, { decision: "allow", reasons: ["role:submitter"], errors: [] });
  const olga = SUBJECTS.operator!;
  const approve = a.authorize({
    principal: olga,
    action: "node:approve",
    resource: { type: "Node", id: "n1" },
  });
  t.same(approve, { decision: "allow", reasons: ["role:operator"], errors: [] });
  const client = SUBJECTS["client key (anonymous mode)"]!;
  const clientStop = a.authorize({
    principal: client,
    action: "job:stop",
    resource: resourceFor("job:stop", client, "own"),
  });
  t.same(clientStop.reasons, ["client-key-own-jobs"]);
  // A submitter's own job moved to another namespace is not its to stop.
  const elsewhere = a.authorize({
    principal: alice,
    action: "job:stop",
    resource: { type: "Job", id: "j", owner: alice.id, namespace: "team-b" },
  });
  t.equal(elsewhere.decision, "deny");
  t.throws(
    () => a.assertAllowed({ principal: alice, action: "node:approve", resource: { type: "Node", id: "n1" } }),
    { code: AUTH_CODES.SHOAL_AUTH_DENIED, status: 403 },
  );
});

t.test(
  "a custom role grants its actions at its scope, and the guard rail keeps access management for admins",
  async (t) => {
    const roles = [
      ...BUILTIN_ROLES,
      {
        name: "team-lead",
        description: "",
        actions: ["job:read", "job:stop", "user:manage"],
        scope: "namespace" as const,
      },
    ];
    const a = new Authorizer({ policies, roles });
    const lead = user("lee", ["team-lead"]);
    const colleagueJob: Resource = { type: "Job", id: "j", owner: "bob", namespace: "team-a" };
    t.equal(a.authorize({ principal: lead, action: "job:stop", resource: colleagueJob }).decision, "allow");
    t.equal(
      a.authorize({ principal: lead, action: "job:stop", resource: { ...colleagueJob, namespace: "team-b" } })
        .decision,
      "deny",
    );
    const manage = a.authorize({ principal: lead, action: "user:manage", resource: { type: "Api" } });
    t.same(manage, { decision: "deny", reasons: ["only-admin-manages-access"], errors: [] });
    // Removing the role takes effect at once (the cache is cleared).
    a.setRoles(BUILTIN_ROLES);
    t.equal(a.authorize({ principal: lead, action: "job:stop", resource: colleagueJob }).decision, "deny");
    t.same(a.setRoles([...BUILTIN_ROLES, { name: "Bad Name", description: "", actions: ["job:read"] }]), [
      "Bad Name",
    ]);
  },
);

t.test("the relation-keyed decision cache decides exactly as Cedar does without it", async (t) => {
  const cached = new Authorizer({ policies, roles: BUILTIN_ROLES });
  const uncached = new Authorizer({ policies, roles: BUILTIN_ROLES, cacheSize: 0 });
  const ids = fc.constantFrom("alice", "bob", "client:ab", "anonymous");
  const nss = fc.constantFrom("default", "team-a", "team-b");
  const principal = fc.record({
    id: ids,
    kind: fc.constantFrom("user", "client", "anonymous") as fc.Arbitrary<Principal["kind"]>,
    roles: fc.subarray(["admin", "operator", "submitter", "reader", "ghost"]),
    namespace: nss,
    method: fc.constantFrom("password", "clientKey", "mtls") as fc.Arbitrary<Principal["method"]>,
  });
  const resource: fc.Arbitrary<Resource> = fc.oneof(
    fc.record({
      type: fc.constant("Job" as const),
      id: fc.constantFrom("j1", "j2"),
      owner: ids,
      namespace: nss,
    }),
    fc.record({ type: fc.constant("Token" as const), id: fc.constantFrom("t1", "t2"), owner: ids }),
    fc.record({ type: fc.constant("Namespace" as const), id: nss }),
    fc.record({ type: fc.constant("Node" as const), id: fc.constantFrom("n1", "n2") }),
    fc.constant({ type: "Api" as const }),
  );
  fc.assert(
    fc.property(principal, fc.constantFrom(...ACTIONS), resource, (p, action, r) => {
      const req = { principal: p, action, resource: r };
      const a = cached.authorize(req);
      const b = uncached.authorize(req);
      return a.decision === b.decision && JSON.stringify(a.reasons) === JSON.stringify(b.reasons);
    }),
    { numRuns: 400 },
  );
  t.pass("400 random requests decided alike");
});

t.test("a policy naming a specific namespace makes the cache key exact", async (t) => {
  const compiled = compilePolicies(
    {
      file: "public.cedar",
      text: `@id("public-jobs") permit(principal, action == Shoal::Action::"job:read", resource is Shoal::Job)
             when { resource.namespace == Shoal::Namespace::"public" };`,
    },
    { file: schemaFile, text: schemaText },
  );
  const a = new Authorizer({ policies: compiled, roles: BUILTIN_ROLES });
  const p = user("nora", []);
  const job = (namespace: string): Resource => ({ type: "Job", id: "j", owner: "bob", namespace });
  t.equal(a.authorize({ principal: p, action: "job:read", resource: job("public") }).decision, "allow");
  t.equal(a.authorize({ principal: p, action: "job:read", resource: job("private") }).decision, "deny");
  t.equal(a.authorize({ principal: p, action: "job:read", resource: job("public") }).decision, "allow");
});

t.test("every decision is audited with principal, action, resource, decision and reasons", async (t) => {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk, _enc, cb) {
      lines.push(String(chunk));
      cb();
    },
  });
  const a = new Authorizer({ policies, roles: BUILTIN_ROLES, logger: createLogger({ destination: sink }) });
  const alice = SUBJECTS.submitter!;
  for (let i = 0; i < 2; i++) {
    a.authorize({ principal: alice, action: "job:stop", resource: resourceFor("job:stop", alice, "own") });
  }
  a.authorize({ principal: alice, action: "node:delete", resource: { type: "Node", id: "n9" } });
  const events = lines.map((l) => JSON.parse(l));
  t.equal(events.length, 3, "cached decisions are audited too");
  t.match(events[0], {
    component: "audit",
    principal: "alice",
    action: "job:stop",
    resource: "Job::job-own",
    decision: "allow",
    reasons: ["role:submitter"],
  });
  t.match(events[2], {
    component: "audit",
    action: "node:delete",
    resource: "Node::n9",
    decision: "deny",
    reasons: [],
  });
});

async function tempDir(t: { teardown(fn: () => unknown): void }): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), "shoal-auth-policy-"));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

t.test("a policy file with a syntax error is refused with file:line:column", async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, "bad-syntax.cedar");
  await writeFile(
    file,
    `@id("ok")\npermit(principal, action, resource);\n\npermit(principal, action, resource)\n  when { principal.namespace == };\n`,
  );
  const err = await loadPolicies({ policyPath: file }).catch((e) => e);
  t.ok(err instanceof PolicyFileError);
  t.equal(err.code, AUTH_CODES.SHOAL_AUTH_POLICY_SYNTAX);
  t.match(err.message, `${file}:5:33:`);
  t.match(err.problems[0], { file, line: 5, column: 33 });
});

t.test(
  "a policy file that does not fit the schema is refused with file:line:column and the policy id",
  async (t) => {
    const dir = await tempDir(t);
    const file = path.join(dir, "bad-schema.cedar");
    await writeFile(
      file,
      `// café: a non-ASCII comment shifts byte offsets\n@id("ok")\npermit(principal, action, resource);\n@id("wrong-attr")\npermit(principal is Shoal::User, action, resource is Shoal::Job)\n  when { resource.colour == "red" };\n`,
    );
    const err = await loadPolicies({ policyPath: file }).catch((e) => e);
    t.equal(err.code, AUTH_CODES.SHOAL_AUTH_POLICY_SCHEMA);
    t.match(err.problems[0], { file, line: 6, column: 10, policyId: "wrong-attr" });
    t.match(err.message, `${file}:6:10:`);
    t.match(err.message, /colour/);
  },
);

t.test("duplicate and reserved policy ids are refused", async (t) => {
  const schema = { file: schemaFile, text: schemaText };
  t.throws(
    () =>
      compilePolicies(
        {
          file: "dup.cedar",
          text: `@id("a") permit(principal, action, resource);\n@id("a") forbid(principal, action, resource);`,
        },
        schema,
      ),
    { code: AUTH_CODES.SHOAL_AUTH_POLICY_DUPLICATE_ID, problems: [{ line: 2, column: 1 }] },
  );
  t.throws(
    () =>
      compilePolicies(
        { file: "r.cedar", text: `@id("role:admin") permit(principal, action, resource);` },
        schema,
      ),
    { code: AUTH_CODES.SHOAL_AUTH_POLICY_DUPLICATE_ID },
  );
  t.throws(
    () =>
      compilePolicies(
        { file: "ok.cedar", text: "" },
        { file: "bad.cedarschema", text: "namespace X { entity ; }" },
      ),
    { code: AUTH_CODES.SHOAL_AUTH_SCHEMA_INVALID, problems: [{ file: "bad.cedarschema", line: 1 }] },
  );
});

const CASES = `
roles:
  - name: auditor
    actions: [job:read, job:logs]
cases:
  - name: submitter stops its own job
    principal: { id: alice, roles: [submitter], namespace: team-a }
    action: job:stop
    resource: { type: Job, id: j1, owner: alice, namespace: team-a }
    expected: allow
  - name: submitter cannot stop bob's job
    principal: { id: alice, roles: [submitter], namespace: team-a }
    action: job:stop
    resource: { type: Job, id: j2, owner: bob, namespace: team-a }
    expected: deny
  - name: operator approves a node
    principal: { id: olga, roles: [operator] }
    action: node:approve
    resource: { type: Node, id: n1 }
    expected: allow
  - name: auditor reads logs
    principal: { id: ada, roles: [auditor] }
    action: job:logs
    resource: { type: Job, id: j2, owner: bob, namespace: team-b }
    context: { sourceIp: 10.1.2.3 }
    expected: allow
  - name: anonymous cannot submit
    principal: { kind: anonymous }
    action: job:submit
    resource: { type: Job, id: j3, owner: anonymous, namespace: default }
    expected: deny
`;

t.test("policy test cases decide as expected", async (t) => {
  const results = runPolicyCases(policies, parsePolicyCases(CASES, "cases.yaml"));
  t.same(
    results.map((r) => [r.name, r.passed]),
    [
      ["submitter stops its own job", true],
      ["submitter cannot stop bob's job", true],
      ["operator approves a node", true],
      ["auditor reads logs", true],
      ["anonymous cannot submit", true],
    ],
  );
  t.throws(() => parsePolicyCases("cases:\n  - action: job:fly\n", "c.yaml"), {
    code: AUTH_CODES.SHOAL_AUTH_POLICY_CASES,
  });
});

/** Runs the CLI in-process, capturing standard output. */
async function runCli(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const origOut = process.stdout.write.bind(process.stdout);
  const origErr = process.stderr.write.bind(process.stderr);
  process.stdout.write = ((s: string) => out.push(String(s)) > 0) as typeof process.stdout.write;
  process.stderr.write = ((s: string) => err.push(String(s)) > 0) as typeof process.stderr.write;
  try {
    const code = await main(args);
    return { code, out: out.join(""), err: err.join("") };
  } finally {
    process.stdout.write = origOut;
    process.stderr.write = origErr;
    process.exitCode = undefined;
  }
}

t.test("shoal policy check and shoal policy test", async (t) => {
  const dir = await tempDir(t);
  const good = path.join(defaultPolicyDir(), "default.cedar");
  const casesFile = path.join(dir, "cases.yaml");
  await writeFile(casesFile, CASES);
  const checked = await runCli(["policy", "check", good]);
  t.equal(checked.code, 0);
  t.match(checked.out, /ok, 6 policies/);

  const bad = path.join(dir, "bad.cedar");
  await writeFile(bad, "permit(principal, action, resource) when { nope };\n");
  const refused = await runCli(["policy", "check", bad]);
  t.equal(refused.code, 1);
  t.match(refused.err, `SHOAL_AUTH_POLICY_SYNTAX: ${bad}:1:44:`);

  const passed = await runCli(["policy", "test", good, casesFile]);
  t.equal(passed.code, 0, passed.err);
  t.match(passed.out, /5 passed, 0 failed/);

  // A policy set without the client-key rules fails the anonymous-mode expectation.
  const strict = path.join(dir, "strict.cedar");
  await writeFile(strict, `@id("nothing") forbid(principal, action, resource);\n`);
  const failed = await runCli(["policy", "test", strict, casesFile]);
  t.equal(failed.code, 1);
  t.match(failed.out, /FAIL submitter stops its own job: expected allow, got deny \(nothing\)/);
  t.match(failed.err, /SHOAL_AUTH_POLICY_TEST_FAILED/);
});
