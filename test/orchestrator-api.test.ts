import "reflect-metadata";
import https from "node:https";
import net from "node:net";
import tls from "node:tls";
import { jetstream } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { ApiClient } from "../cli/api-client.js";
import { listJobs } from "../cli/job-list.js";
import { submitJob } from "../cli/job-submit.js";
import { moduleDigest, silentLogger, wasmJobSpec } from "../core/index.js";
import { type ApiOptions, buildApi } from "../orchestrator/api.js";
import { parseSubmittedJob } from "../orchestrator/job-requirements.js";
import { type JobDispatch, JobService } from "../orchestrator/job-service.js";
import { type LogEntry, LogStore } from "../orchestrator/log-store.js";
import { ModuleStore } from "../orchestrator/module-store.js";
import { NodeService } from "../orchestrator/node-service.js";
import { ResultsStore } from "../orchestrator/results-store.js";
import { StateStore } from "../orchestrator/state-store.js";
import { apiCaller } from "./helpers/api-call.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";
import { withFailingPublish } from "./helpers/failing-js.js";
import { testNodeService } from "./helpers/node-service.js";
import { freshPki } from "./helpers/pki.js";
import { eventually, jobRecord } from "./helpers/records.js";

/** A minimal valid WASM module (magic + version): enough for the spec check. */
const WASM = Buffer.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]).toString("base64");

function spec(overrides: Record<string, unknown> = {}, task: Record<string, unknown> = {}) {
  return {
    Name: "hello",
    Type: "batch",
    Tasks: [
      {
        Name: "main",
        Engine: { Type: "wasm", Params: { EntryModule: { Type: "inline", Params: { Content: WASM } } } },
        ...task,
      },
    ],
    ...overrides,
  };
}

const storedModule = (digest: string) => ({ Type: "stored", Params: { Digest: digest } });

/**
 * The API on a real JetStream state store, with the dispatcher's side of the
 * contract recorded (placement is tested end to end); `makeNodes` builds the
 * node registry on that store.
 */
async function startApi(
  t: Test,
  {
    makeNodes = (s) => testNodeService(t, s),
    api: more = {},
    listScanLimit,
    failPublish = () => undefined,
    storeTimeoutMs,
    maxUnfinished,
    makeLogs = (dir) => new LogStore(dir),
  }: {
    makeNodes?: (store: StateStore) => NodeService;
    makeLogs?: (dir: string) => LogStore;
    api?: Pick<ApiOptions, "timeouts" | "maxConnsPerClient">;
    listScanLimit?: number;
    /** After how long (ms) the state store's write to `subject` fails, as to a JetStream that does not answer; undefined: it goes through. */
    failPublish?: (subject: string) => number | undefined;
    storeTimeoutMs?: number;
    maxUnfinished?: { all: number; perSubmitter: number };
  } = {},
) {
  const dir = await tempDir(t, "shoal-api-");
  const url = await startJetStream(t, dir);
  const nc = await connect({ servers: url });
  t.teardown(() => nc.close());
  const js = jetstream(nc);
  const failing = withFailingPublish(js, failPublish);
  const store = await StateStore.open(failing, silentLogger);
  const logs = makeLogs(dir);
  const results = new ResultsStore(dir);
  const modules = new ModuleStore(dir);
  await Promise.all([logs.init(), results.init(), modules.init()]);
  const enqueued: string[] = [];
  const dispatch: JobDispatch = {
    enqueue: (id) => enqueued.push(id),
    stop: async (id, reason) => {
      const job = store.jobs.get(id);
      if (job) store.setJobState(job, "Stopped", reason);
    },
  };
  const jobs = new JobService({
    store,
    logs,
    results,
    modules,
    log: silentLogger,
    parseSpec: parseSubmittedJob,
    dispatch,
    ...(listScanLimit ? { listScanLimit } : {}),
    ...(storeTimeoutMs ? { storeTimeoutMs } : {}),
    ...(maxUnfinished ? { maxUnfinished } : {}),
  });
  const nodes = makeNodes(store);
  const { pki } = await freshPki(t);
  const server = await pki.issue({ role: "server", dns: ["localhost"] });
  const api = buildApi({
    jobs,
    nodes,
    log: silentLogger,
    https: { key: server.keyPem!, cert: server.certPem },
    caBundlePem: () => pki.caCertPem,
    nodeInfo: () => ({ ID: "orchestrator" }),
    version: "test",
    ...more,
  });
  await api.listen({ host: "127.0.0.1", port: 0 });
  t.teardown(() => api.close());
  const port = (api.server.address() as { port: number }).port;
  const caller = apiCaller(`https://127.0.0.1:${port}`, pki.caCertPem);
  t.teardown(caller.close);
  const call = (method: string, path: string, body?: unknown) => caller.call(method, path, { body });

  return { call, nc, store, jobs, nodes, enqueued, modules, port, pki, dir };
}

t.test("the API validates every body and answers errors with code, message, fix and field", async (t) => {
  const { call, jobs, nodes, enqueued, modules, port, pki } = await startApi(t);
  t.equal((await call("GET", "/api/v1/agent/alive")).json.Status, "OK");
  t.match((await call("GET", "/api/v1/pki/ca")).text, /BEGIN CERTIFICATE/, "the CA bundle is public");

  const ok = await call("PUT", "/api/v1/orchestrator/jobs", { Job: spec() });
  t.equal(ok.status, 201);
  const id = ok.json.JobID as string;
  t.match(id, /^j-/);
  t.same(enqueued, [id], "a stored job is handed to the dispatcher");
  t.equal((await call("GET", `/api/v1/orchestrator/jobs/${id}`)).json.Job.State, "Pending");
  t.equal((await call("GET", "/api/v1/orchestrator/jobs")).json.Items.length, 1);

  const bad: [string, unknown, string][] = [
    ["unknown engine", spec({}, { Engine: { Type: "docker", Params: {} } }), "Tasks[0].Engine.Type"],
    ["unknown field", spec({ Colour: "red" }), "Colour"],
    ["negative CPU", spec({}, { Resources: { CPU: -1 } }), "Tasks[0].Resources.CPU"],
    [
      "module that is not WASM",
      spec(
        {},
        {
          Engine: {
            Type: "wasm",
            Params: {
              EntryModule: { Type: "inline", Params: { Content: Buffer.from("hello").toString("base64") } },
            },
          },
        },
      ),
      "Tasks[0].Engine.Params.EntryModule",
    ],
    [
      "job too large for one fabric message",
      spec(
        {},
        {
          InputSources: [0, 1].map((i) => ({
            Target: `/inputs/${i}`,
            Source: {
              Type: "inline",
              Params: { Content: Buffer.alloc(256 * 1024, 1).toString("base64"), Encoding: "base64" },
            },
          })),
        },
      ),
      "Tasks",
    ],
    [
      "module named by a digest nothing stored",
      spec(
        {},
        { Engine: { Type: "wasm", Params: { EntryModule: storedModule(`sha256:${"e".repeat(64)}`) } } },
      ),
      "Tasks[0].Engine.Params.EntryModule.Params.Digest",
    ],
  ];
  for (const [what, job, field] of bad) {
    const r = await call("PUT", "/api/v1/orchestrator/jobs", { Job: job });
    t.equal(r.status, 400, `${what}: 400`);
    t.equal(r.json.error?.code, "SHOAL_JOB_INVALID", `${what}: code`);
    t.match(r.json.error?.field, field, `${what}: names ${field}`);
    t.ok(r.json.error?.fix, `${what}: says how to fix it`);
  }
  t.equal(
    (await call("PUT", "/api/v1/orchestrator/jobs", { Job: spec() })).status,
    201,
    "a refused job leaves the store writable for the next",
  );
  // A module too large for one fabric message is stored apart; the job names it by digest.
  const module = Buffer.concat([
    Buffer.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]),
    Buffer.alloc(900 * 1024, 3),
  ]);
  const inline = { Type: "inline", Params: { Content: module.toString("base64") } };
  const big = await call("PUT", "/api/v1/orchestrator/jobs", {
    Job: spec({}, { Engine: { Type: "wasm", Params: { EntryModule: inline } } }),
  });
  t.equal(big.status, 201, "a 900 KiB module is accepted");
  const digest = moduleDigest(module);
  const bigJob = (await call("GET", `/api/v1/orchestrator/jobs/${big.json.JobID}`)).json.Job;
  t.same(bigJob.Spec.Tasks[0].Engine.Params.EntryModule, storedModule(digest), "the job names it by digest");
  t.ok((await modules.read(digest, 0, module.length))?.data.equals(module), "the module is stored whole");
  const reuse = await call("PUT", "/api/v1/orchestrator/jobs", {
    Job: spec({}, { Engine: { Type: "wasm", Params: { EntryModule: storedModule(digest) } } }),
  });
  t.equal(reuse.status, 201, "a job may name a stored module by its digest");

  // The CLI names a large module by digest first, and sends it only when the orchestrator lacks it.
  const client = await ApiClient.create({ url: `https://127.0.0.1:${port}`, caPem: pki.caCertPem, env: {} });
  t.teardown(() => client.close());
  let puts = 0;
  const put = modules.put.bind(modules);
  modules.put = (d, b) => {
    puts++;
    return put(d, b);
  };
  const large = wasmJobSpec({ name: "large", module: Buffer.concat([module, Buffer.alloc(1)]) });
  const first = await submitJob(client, large);
  t.equal(puts, 1, "a module the orchestrator lacks is sent, after it answered so");
  const second = await submitJob(client, large);
  t.equal(puts, 1, "once stored it is named by digest only");
  t.not(first, second);
  t.same(
    (await call("GET", `/api/v1/orchestrator/jobs/${second}`)).json.Job.Spec,
    (await call("GET", `/api/v1/orchestrator/jobs/${first}`)).json.Job.Spec,
    "both jobs are stored alike",
  );
  await submitJob(client, wasmJobSpec({ name: "small", module: Buffer.from(module.subarray(0, 1000)) }));
  t.equal(puts, 2, "a small module is sent inline at once");

  const envelope = await call("PUT", "/api/v1/orchestrator/jobs", { Job: spec(), Extra: 1 });
  t.equal(envelope.status, 400);
  t.equal(envelope.json.error.code, "SHOAL_ORCH_REQUEST_INVALID");
  t.equal(envelope.json.error.field, "Extra", "an unknown field of the request itself is named too");

  const missing = await call("GET", "/api/v1/orchestrator/jobs/j-nope");
  t.equal(missing.status, 404);
  t.equal(missing.json.error.code, "SHOAL_ORCH_JOB_NOT_FOUND");

  const stop = await call("DELETE", `/api/v1/orchestrator/jobs/${id}`);
  t.equal(stop.json.State, "Stopped");
  const again = await call("DELETE", `/api/v1/orchestrator/jobs/${id}`);
  t.equal(again.status, 409);
  t.equal(again.json.error.code, "SHOAL_ORCH_JOB_FINISHED");
  t.same(
    (await call("GET", `/api/v1/orchestrator/jobs/${id}/history`)).json.Items.map(
      (e: { State: string }) => e.State,
    ),
    ["Pending", "Stopped"],
  );

  // Nodes: registration under manual approval waits for an operator.
  nodes.register(
    "n1",
    {
      nodeId: "n1",
      chainPem: "",
      labels: { zone: "a" },
      capacity: { cpu: 2, memory: 1 << 30 },
      engines: ["wasm"],
      version: "test",
      executions: [],
    },
    "",
  );
  t.equal((await call("GET", "/api/v1/orchestrator/nodes/n1")).json.Node.Approval, "PENDING");
  t.equal((await call("POST", "/api/v1/orchestrator/nodes/n1/approve")).json.Node.Approval, "APPROVED");
  t.equal((await call("POST", "/api/v1/orchestrator/nodes/n1/reject")).json.Node.Approval, "REJECTED");
  t.equal((await call("DELETE", "/api/v1/orchestrator/nodes/n1")).json.Deleted, true);
  t.equal((await call("GET", "/api/v1/orchestrator/nodes/n1")).json.error.code, "SHOAL_ORCH_NODE_NOT_FOUND");
  t.equal(
    (await call("GET", "/api/v1/orchestrator/nodes/bad%20id")).status,
    400,
    "path parameters are validated",
  );

  // Shutting down: no new work.
  jobs.refuseNewWork();
  const refused = await call("PUT", "/api/v1/orchestrator/jobs", { Job: spec() });
  t.equal(refused.status, 503);
  t.equal(refused.json.error.code, "SHOAL_ORCH_SHUTTING_DOWN");
});

t.test("jobs are listed newest first, a page at a time, each job once", async (t) => {
  const { call, nc, store, jobs, port, pki } = await startApi(t, { listScanLimit: 6 });
  // Three jobs per millisecond, so pages also end between jobs created together.
  const ids = Array.from({ length: 25 }, (_, i) => `j-${String(i).padStart(2, "0")}`);
  // Labels: team=a on every other job, and on every fourth also tier=1.10 and expr=x=y.
  const labelsOf = (i: number): Record<string, string> =>
    i % 4 === 0 ? { team: "a", tier: "1.10", expr: "x=y" } : i % 4 === 1 ? { team: "a" } : { team: "b" };
  for (const [i, id] of ids.entries()) {
    const job = jobRecord(id, 1_000 + Math.floor(i / 3), { State: i % 5 === 0 ? "Completed" : "Pending" });
    store.putJob({ ...job, Spec: { ...(job.Spec as object), Labels: labelsOf(i) } });
  }
  await store.flushJob(ids.at(-1)!);
  const byTime = (id: string) => store.jobs.get(id)!.CreateTime;

  const list = async (query: string) => {
    const r = await call("GET", `/api/v1/orchestrator/jobs?${query}`);
    t.equal(r.status, 200, query);
    return r.json as { Items: { ID: string }[]; NextToken?: string };
  };
  /** Every page of a listing (at most 20), following the tokens. */
  const pagesOf = async (query: string) => {
    const pages: string[][] = [];
    let token: string | undefined;
    do {
      const page = await list(`${query}${token ? `&next_token=${token}` : ""}`);
      pages.push(page.Items.map((j) => j.ID));
      token = page.NextToken;
    } while (token && pages.length < 20);
    return pages;
  };
  const pages = await pagesOf("limit=4");
  t.same(
    pages.map((p) => p.length),
    [4, 4, 4, 4, 4, 4, 1],
    "full pages, then the rest; no token after the last",
  );
  const listed = pages.flat();
  t.same([...listed].sort(), [...ids].sort(), "every job once");
  t.ok(
    listed.every((id, i) => i === 0 || byTime(listed[i - 1]!) >= byTime(id)),
    "newest first, across pages",
  );
  t.same(
    (await pagesOf("state=Completed&limit=100")).flat(),
    listed.filter((id) => Number(id.slice(2)) % 5 === 0),
    "a state filter reads from the same order",
  );

  const numbered = (filter: (i: number) => boolean) => listed.filter((id) => filter(Number(id.slice(2))));
  t.same(
    (await pagesOf("label=team=a&limit=100")).flat(),
    numbered((i) => i % 4 <= 1),
    "a label filter",
  );
  t.same(
    (await pagesOf("label=team=a&label=tier=1.10&limit=100")).flat(),
    numbered((i) => i % 4 === 0),
    "every label must match",
  );
  t.same(
    (await pagesOf("label=expr=x=y&limit=100")).flat(),
    numbered((i) => i % 4 === 0),
    "a value may hold '='",
  );
  t.same((await pagesOf("label=team=c&limit=100")).flat(), [], "no job has that label");
  for (const bad of ["=a", "team", "-x=1"]) {
    const r = await call("GET", `/api/v1/orchestrator/jobs?label=${bad}`);
    t.equal(r.status, 400, `label=${bad}: 400`);
    t.match(r.json.error.field, /^label/);
  }

  // A job submitted and a job removed between pages: the next page neither repeats nor misses any.
  const first = await list("limit=5");
  t.same(
    first.Items.map((j) => j.ID),
    listed.slice(0, 5),
  );
  store.putJob(jobRecord("j-new", 2_000));
  const gone = listed[8]!;
  store.jobs.delete(gone);
  const rest = await list(`limit=4&next_token=${first.NextToken}`);
  t.same(
    rest.Items.map((j) => j.ID),
    listed.slice(5, 10).filter((id) => id !== gone),
    "the next page goes on where the first stopped",
  );
  t.notMatch(first.NextToken, /j-/, "a token does not name a job");

  // A listing reads at most listScanLimit jobs, however few of them the caller may see.
  let looked = 0;
  const mine = (job: { ID: string }) => {
    looked++;
    return job.ID.endsWith("7");
  };
  const seen: string[] = [];
  let after: string | undefined;
  let calls = 0;
  do {
    looked = 0;
    const page = jobs.list({ limit: 100, visible: mine, ...(after ? { after } : {}) });
    t.ok(looked <= 6, `page ${++calls} looked at ${looked} jobs`);
    seen.push(...page.items.map((j) => j.ID));
    after = page.next;
  } while (after && calls < 20);
  t.same(
    seen,
    listed.filter((id) => id.endsWith("7") && id !== gone),
    "following the tokens finds every visible job",
  );
  t.equal(calls, 5, "26 jobs, 6 at a time");

  for (const bad of ["nope", "1000.short", "-1.AAAAAAAAAAAAAAAA", "j-01"]) {
    const r = await call("GET", `/api/v1/orchestrator/jobs?next_token=${bad}`);
    t.equal(r.status, 400, `next_token=${bad}: 400`);
    t.equal(r.json.error.code, "SHOAL_ORCH_REQUEST_INVALID");
    t.equal(r.json.error.field, "next_token");
  }

  // The CLI follows the tokens until it has as many jobs as asked for.
  const client = await ApiClient.create({ url: `https://127.0.0.1:${port}`, caPem: pki.caCertPem, env: {} });
  t.teardown(() => client.close());
  const all = [...store.jobs.descending()].map((e) => e.row.ID);
  t.same(
    (await listJobs(client, { limit: 100 })).map((j) => j.ID),
    all,
    "every job, though each page holds at most 6",
  );
  t.same(
    (await listJobs(client, { limit: 8 })).map((j) => j.ID),
    all.slice(0, 8),
    "as many as asked for",
  );
  t.same(
    (await listJobs(client, { state: "Completed", labels: { team: "a" }, limit: 100 })).map((j) => j.ID),
    all.filter((id) => store.jobs.get(id)!.State === "Completed" && Number(id.slice(2)) % 4 <= 1),
    "the CLI's filters",
  );
  t.same(
    (await listJobs(client, { state: "Completed", limit: 2 })).map((j) => j.ID),
    all.filter((id) => store.jobs.get(id)!.State === "Completed").slice(0, 2),
  );

  // A restarted orchestrator lists the stored jobs in the same order.
  await store.flushJob("j-new");
  const reopened = await StateStore.open(jetstream(nc), silentLogger);
  t.teardown(() => reopened.close());
  t.same(
    [...reopened.jobs.descending()].map((e) => e.row.ID),
    ["j-new", ...listed.filter((id) => id !== gone)],
    "the order is rebuilt from KV",
  );
});

t.test("jobs that have not ended are limited per submitter and in all (429)", async (t) => {
  const { call, jobs, store, enqueued, modules } = await startApi(t, {
    maxUnfinished: { all: 3, perSubmitter: 2 },
  });
  const submit = () => call("PUT", "/api/v1/orchestrator/jobs", { Job: spec() });
  const first = await submit();
  t.equal((await submit()).status, 201);
  // Its own module, to see that a refused job stores nothing.
  const module = Buffer.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00]);
  const third = await call("PUT", "/api/v1/orchestrator/jobs", {
    Job: spec(
      {},
      {
        Engine: {
          Type: "wasm",
          Params: { EntryModule: { Type: "inline", Params: { Content: module.toString("base64") } } },
        },
      },
    ),
  });
  t.equal(third.status, 429, "the submitter's third unfinished job is refused");
  t.match(third.json.error, {
    code: "SHOAL_ORCH_JOB_LIMIT",
    message: /anonymous has 2 jobs that have not ended/,
    fix: /Orchestrator\.Scheduler\.MaxUnfinishedJobsPerSubmitter/,
  });
  t.notOk(await modules.has(moduleDigest(module)), "its module was not stored");
  t.equal(store.jobs.size, 2, "nor the job");
  t.equal(enqueued.length, 2);

  // Another submitter has room of their own, up to the limit in all.
  const bob = { sub: "bob", namespace: "default", method: "password" };
  await jobs.submit(spec(), bob);
  await t.rejects(
    jobs.submit(spec(), bob),
    {
      code: "SHOAL_ORCH_JOB_LIMIT",
      status: 429,
      message: /3 jobs have not ended/,
      fix: /MaxUnfinishedJobs\b/,
    },
    "past the limit in all, whoever submits",
  );

  // A job that ends makes room.
  await call("POST", `/api/v1/orchestrator/jobs/${first.json.JobID}/stop`, { Reason: "no longer wanted" });
  t.equal(store.jobs.get(first.json.JobID)?.State, "Stopped");
  t.equal((await submit()).status, 201, "room again once a job ended");
  t.equal((await submit()).status, 429);
});

t.test("submissions that arrive together cannot pass the limit between them", async (t) => {
  const { call, store } = await startApi(t, { maxUnfinished: { all: 0, perSubmitter: 2 } });
  const replies = await Promise.all(
    Array.from({ length: 5 }, () => call("PUT", "/api/v1/orchestrator/jobs", { Job: spec() })),
  );
  t.same(replies.map((r) => r.status).sort(), [201, 201, 429, 429, 429], "two taken, three refused");
  t.equal(store.jobs.size, 2);
});

t.test("a state store that fails is a 503 the caller may retry, not an internal error", async (t) => {
  let brokerDown = true;
  const { call, nc, nodes } = await startApi(t, {
    makeNodes: (store) => {
      const service = new NodeService({
        store,
        log: silentLogger,
        manualApproval: true,
        disconnectTimeoutMs: 60_000,
        heartbeatIntervalMs: 1000,
        // As the trust keeper's writes to the cluster's shared KV fail when JetStream does not answer.
        revokeIdentity: async () => {
          if (brokerDown) await nc.request("shoal.nobody.listens", "", { timeout: 1000 });
          return true;
        },
      });
      t.teardown(() => service.close());
      return service;
    },
  });
  nodes.register(
    "n1",
    {
      nodeId: "n1",
      chainPem: "",
      labels: {},
      capacity: { cpu: 1, memory: 1 << 30 },
      engines: ["wasm"],
      version: "test",
      executions: [],
    },
    "",
  );
  const refused = await call("DELETE", "/api/v1/orchestrator/nodes/n1");
  t.equal(refused.status, 503);
  t.equal(refused.json.error.code, "SHOAL_ORCH_STATE_STORE");
  t.match(refused.json.error.message, /^the state store failed: /);
  t.match(refused.json.error.fix, /retry/);
  brokerDown = false;

  // The connection to JetStream is gone: a node's change and a job are not stored, and say so.
  await nc.close();
  const approve = await call("POST", "/api/v1/orchestrator/nodes/n1/approve");
  t.equal(approve.status, 503);
  t.equal(approve.json.error.code, "SHOAL_ORCH_STATE_STORE");
  t.match(approve.json.error.message, "the change to node n1 could not be stored");
  const job = await call("PUT", "/api/v1/orchestrator/jobs", { Job: spec() });
  t.equal(job.status, 503);
  t.equal(job.json.error.code, "SHOAL_ORCH_STATE_STORE");
});

/**
 * A submission whose job write fails after `failsAfterMs` (the submission's
 * deadline is 300 ms): answered 503 by then, the job neither kept nor stored
 * later by the table's retry, which the test lets through once the answer came.
 */
for (const { failsAfterMs, what } of [
  { failsAfterMs: 0, what: "a job the store could not take" },
  { failsAfterMs: 1500, what: "a job the store is slow to take (answered by the deadline)" },
]) {
  t.test(`${what} is not kept, and no retry of its write stores it later`, async (t) => {
    let down = true;
    const { call, nc, store } = await startApi(t, {
      failPublish: (subject) => (down && subject.startsWith("$KV.shoal-jobs.") ? failsAfterMs : undefined),
      storeTimeoutMs: 300,
    });
    const t0 = Date.now();
    const job = await call("PUT", "/api/v1/orchestrator/jobs", { Job: spec() });
    t.ok(Date.now() - t0 < 1400, "answered before a slow write failed");
    t.equal(job.status, 503);
    t.equal(job.json.error.code, "SHOAL_ORCH_STATE_STORE");
    t.match(job.json.error.message, /^job j-\S+ could not be stored durably$/);
    const jobId = job.json.error.message.split(" ")[1];
    t.equal(store.jobs.get(jobId), undefined, "not in memory");
    t.same((await call("GET", "/api/v1/orchestrator/jobs")).json.Items, [], "not listed");

    // The store answers again: the failed write would be retried 250 ms after it failed.
    down = false;
    await new Promise((r) => setTimeout(r, failsAfterMs + 600));
    await store.flush();
    const reopened = await StateStore.open(jetstream(nc), silentLogger);
    t.teardown(() => reopened.close());
    t.equal(reopened.jobs.get(jobId), undefined, "not in KV");
    t.same(await reopened.history(jobId), [], "nor its history");
  });
}

/** Resolves with how long (ms) until the server closed the connection, and what it last sent. */
function whenClosed(socket: net.Socket): Promise<{ afterMs: number; said: string }> {
  const t0 = Date.now();
  let said = "";
  socket.on("data", (d: Buffer) => {
    said += d.toString();
  });
  socket.on("error", () => {});
  return new Promise((resolve) => socket.on("close", () => resolve({ afterMs: Date.now() - t0, said })));
}

t.test(
  "a caller that sends nothing, or a request too slowly, is cut off; a long response is not",
  async (t) => {
    const timeouts = { handshakeMs: 400, headersMs: 800, requestMs: 1500, checkMs: 100 };
    const { call, port, pki } = await startApi(t, { api: { timeouts } });
    const open = (then?: (s: tls.TLSSocket) => void) => {
      const s = tls.connect({ port, host: "127.0.0.1", ca: pki.caCertPem, servername: "localhost" }, () =>
        then?.(s),
      );
      return s;
    };
    // Before any authentication: no TLS handshake; a handshake and no request; headers never finished.
    const noHandshake = whenClosed(net.connect(port, "127.0.0.1"));
    const noRequest = whenClosed(open());
    const slowHeaders = whenClosed(open((s) => s.write("GET /api/v1/agent/alive HTTP/1.1\r\nHost: x\r\n")));
    // Headers done, the body never finished: the whole request has its own time.
    const slowBody = whenClosed(
      open((s) =>
        s.write(
          'PUT /api/v1/orchestrator/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"Job"',
        ),
      ),
    );
    // A job that stays Pending (nothing places it here): its history is followed well past every timeout.
    const { JobID } = (await call("PUT", "/api/v1/orchestrator/jobs", { Job: spec() })).json as {
      JobID: string;
    };
    const follow = open((s) =>
      s.write(`GET /api/v1/orchestrator/jobs/${JobID}/history?follow=true HTTP/1.1\r\nHost: x\r\n\r\n`),
    );
    const followed = whenClosed(follow);
    let streamed = "";
    follow.on("data", (d: Buffer) => {
      streamed += d.toString();
    });

    const [handshake, request, headers, body] = await Promise.all([
      noHandshake,
      noRequest,
      slowHeaders,
      slowBody,
    ]);
    t.ok(
      handshake.afterMs >= 350 && handshake.afterMs < 5000,
      `no handshake: cut after ${handshake.afterMs} ms`,
    );
    t.ok(request.afterMs >= 700 && request.afterMs < 5000, `no request: cut after ${request.afterMs} ms`);
    t.ok(
      headers.afterMs >= 700 && headers.afterMs < 5000,
      `unfinished headers: cut after ${headers.afterMs} ms`,
    );
    t.ok(body.afterMs >= 1400 && body.afterMs < 6000, `unfinished body: cut after ${body.afterMs} ms`);
    t.match(body.said, /^HTTP\/1.1 408/, "and told why");

    await new Promise((r) => setTimeout(r, 2 * timeouts.requestMs));
    t.notOk(follow.destroyed, "the followed history still streams after twice the request timeout");
    t.equal((await call("DELETE", `/api/v1/orchestrator/jobs/${JobID}`)).status, 200);
    await eventually("the stream ends with the Stopped job", () =>
      /"Job":\{.*"State":"Stopped"/.test(streamed),
    );
    t.match(streamed, /"State":"Pending"/, "it carried the job's history");
    follow.destroy();
    await followed;
  },
);

t.test("one client address holds at most API.MaxConnsPerClient connections", async (t) => {
  const { port, pki } = await startApi(t, { api: { maxConnsPerClient: 3 } });
  const connect = () =>
    new Promise<{ socket: tls.TLSSocket; up: boolean }>((resolve) => {
      const socket = tls.connect(
        { port, host: "127.0.0.1", ca: pki.caCertPem, servername: "localhost" },
        () => resolve({ socket, up: true }),
      );
      socket.on("error", () => resolve({ socket, up: false }));
      socket.on("close", () => resolve({ socket, up: false }));
    });
  const held = [await connect(), await connect(), await connect()];
  t.same(
    held.map((c) => c.up),
    [true, true, true],
  );
  const fourth = await connect();
  t.equal(fourth.up, false, "the fourth is closed before its handshake");
  held[0]!.socket.destroy();
  await new Promise((r) => setTimeout(r, 200));
  const again = await connect();
  t.equal(again.up, true, "one closed, one more may come");
  for (const c of [...held, again]) c.socket.destroy();
});

/** A log store that counts the lines its readers have taken. */
class CountingLogStore extends LogStore {
  taken = 0;

  override async *lines(jobId: string): AsyncGenerator<LogEntry> {
    for await (const line of super.lines(jobId)) {
      this.taken++;
      yield line;
    }
  }
}

t.test("a job's logs are read as the client takes them, never all ahead of it", async (t) => {
  let logs: CountingLogStore | undefined;
  const { store, port, pki } = await startApi(t, {
    makeLogs: (d) => {
      logs = new CountingLogStore(d);
      return logs;
    },
  });
  store.putJob(jobRecord("j-big", Date.now(), { State: "Completed" }));
  // 32 MiB of stored lines: far more than the buffers on the way hold (about 4 MiB here).
  const LINES = 32_000;
  const data = "x".repeat(1000);
  await Promise.all(
    Array.from({ length: LINES }, (_, i) =>
      logs!.append("j-big", { Time: i, ExecutionID: `e-${i >> 10}`, Stream: "stdout", Seq: i, Data: data }),
    ),
  );

  const res = await new Promise<import("node:http").IncomingMessage>((resolve, reject) =>
    https
      .get(`https://127.0.0.1:${port}/api/v1/orchestrator/jobs/j-big/logs`, { ca: pki.caCertPem }, resolve)
      .on("error", reject),
  );
  t.equal(res.statusCode, 200);
  res.pause();
  await new Promise((r) => setTimeout(r, 1000));
  const takenWhilePaused = logs!.taken;
  t.ok(
    takenWhilePaused < 12_000,
    `a client that does not read holds the reading back (${takenWhilePaused} lines read)`,
  );
  let received = 0;
  let tail = "";
  res.setEncoding("utf8");
  res.on("data", (chunk: string) => {
    const parts = (tail + chunk).split("\n");
    tail = parts.pop()!;
    received += parts.length;
  });
  res.resume();
  await new Promise((r) => res.on("end", r));
  t.equal(received, LINES, "then every line comes");
  t.equal(logs!.taken, LINES);
});
