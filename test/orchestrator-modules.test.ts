import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import { jetstream } from "@nats-io/jetstream";
import { Objm } from "@nats-io/obj";
import { connect } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { moduleDigest, separateModules, silentLogger, wasmJobSpec } from "../core/index.js";
import { type MessageBody, MODULE_CHUNK_BYTES, subjects } from "../fabric/index.js";
import { MODULES_BUCKET, ModuleStore } from "../orchestrator/module-store.js";
import type { ExecutionRecord } from "../orchestrator/records.js";
import { StateStore } from "../orchestrator/state-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";
import { startTestLink } from "./helpers/fabric-link.js";
import { joinFabric, registeredNode, type TestFabric, type TestIdentity } from "./helpers/nats.js";
import { EMPTY_MODULE, executionRecord, jobRecord } from "./helpers/records.js";

/**
 * Modules stored apart from their jobs: the store keeps one copy per digest
 * (on disk, and in a cluster's object store, from which an orchestrator
 * without a copy makes one), removes a module only when no job has named it
 * at two collections in a row, and an orchestrator hands a module over the
 * fabric only to the node an active execution of a job naming it is placed on.
 */

/** A valid module header followed by `size` bytes of `fill`. */
const moduleOf = (size: number, fill: number) => Buffer.concat([EMPTY_MODULE, Buffer.alloc(size, fill)]);

t.test("a module is stored once, read in parts, and copied from the cluster's object store", async (t) => {
  const root = await tempDir(t, "shoal-modules-");
  const url = await startJetStream(t, path.join(root, "js"));
  const open = async (name: string) => {
    const nc = await connect({ servers: url });
    t.teardown(() => nc.close());
    const js = jetstream(nc);
    const shared = { objects: await new Objm(js).create(MODULES_BUCKET), jsm: await js.jetstreamManager() };
    const store = new ModuleStore(path.join(root, name), shared);
    await store.init();
    return { store, shared };
  };
  const a = await open("a");
  const b = await open("b");
  const module = moduleOf(300_000, 9);
  const digest = moduleDigest(module);
  await a.store.put(digest, module);
  await a.store.put(digest, module);
  t.equal((await a.shared.objects.list()).length, 1, "one object however many puts");
  t.same(await fs.readdir(path.join(root, "a", "modules")), [`${digest.slice(7)}.wasm`]);

  t.ok(await b.store.has(digest), "another orchestrator sees it in the object store");
  const part = await b.store.read(digest, 100_000, 150_000);
  t.equal(part?.size, module.length);
  t.ok(part?.data.equals(module.subarray(100_000, 250_000)), "the part asked for");
  t.ok((await b.store.read(digest, 250_000, 150_000))?.data.equals(module.subarray(250_000)), "the tail");
  t.same(
    await fs.readdir(path.join(root, "b", "modules")),
    [`${digest.slice(7)}.wasm`],
    "copied to its disk",
  );

  const unknown = moduleDigest(Buffer.from("nothing"));
  t.notOk(await b.store.has(unknown));
  t.equal(await b.store.read(unknown, 0, 10), undefined);
  t.equal(await b.store.read("sha256:../../etc/passwd", 0, 10), undefined, "a digest never names a path");

  // A crash in the middle of writing a copy leaves only a temporary file, dropped at start.
  await fs.writeFile(path.join(root, "b", "modules", `${digest.slice(7)}.wasm.abc.tmp`), "half");
  await b.store.init();
  t.same(await fs.readdir(path.join(root, "b", "modules")), [`${digest.slice(7)}.wasm`]);

  // A store remembers the copies it has, and forgets one it removes: put again, it is written again.
  await a.store.remove(digest);
  t.same(await fs.readdir(path.join(root, "a", "modules")), []);
  await a.store.put(digest, module);
  t.same(await fs.readdir(path.join(root, "a", "modules")), [`${digest.slice(7)}.wasm`], "written again");

  // A copy deleted by hand: a read makes it again from the object store.
  await fs.rm(path.join(root, "b", "modules", `${digest.slice(7)}.wasm`));
  t.ok((await b.store.read(digest, 0, 10))?.data.equals(module.subarray(0, 10)), "read, copied again");
});

t.test(
  "a module file deleted by hand is not taken for present: the next submission writes it again",
  async (t) => {
    const root = await tempDir(t, "shoal-modules-");
    const store = new ModuleStore(root);
    await store.init();
    const module = moduleOf(1000, 3);
    const digest = moduleDigest(module);
    await store.put(digest, module);
    const file = path.join(root, "modules", `${digest.slice(7)}.wasm`);
    await fs.rm(file);
    t.equal(await store.read(digest, 0, 10), undefined, "not stored: the node is told so");
    t.notOk(await store.has(digest), "and a submission naming it by digest is refused");
    await store.put(digest, module);
    t.ok((await fs.readFile(file)).equals(module), "a submission with the module writes the file again");
    t.ok((await store.read(digest, 0, 10))?.data.equals(module.subarray(0, 10)));
  },
);

t.test("a module goes when no job named it at two collections in a row, unless pinned", async (t) => {
  const root = await tempDir(t, "shoal-modules-");
  const url = await startJetStream(t, path.join(root, "js"));
  const nc = await connect({ servers: url });
  t.teardown(() => nc.close());
  const js = jetstream(nc);
  const jsm = await js.jetstreamManager();
  const store = new ModuleStore(root, { objects: await new Objm(js).create(MODULES_BUCKET), jsm });
  await store.init();
  const [kept, dropped, pinned] = [1, 2, 3].map((fill) => moduleOf(1000, fill));
  const [keptD, droppedD, pinnedD] = [kept!, dropped!, pinned!].map(moduleDigest) as [string, string, string];
  for (const [d, m] of [
    [keptD, kept!],
    [droppedD, dropped!],
    [pinnedD, pinned!],
  ] as const) {
    await store.put(d, m);
  }
  const release = store.pin([pinnedD]);
  t.equal(await store.collect(new Set([keptD])), 0, "the first collection only notes what no job names");
  t.equal(await store.collect(new Set([keptD])), 1, "the second removes it");
  t.notOk(await store.has(droppedD));
  t.equal(
    (await jsm.streams.info(`OBJ_${MODULES_BUCKET}`)).state.messages,
    4,
    "purged from the object store (two modules of one chunk and one description each), no delete marker",
  );
  t.ok(await store.has(pinnedD), "a submission's pinned module stays");
  release();
  t.equal(await store.collect(new Set([keptD])), 0, "unpinned, it is noted first");
  t.equal(await store.collect(new Set([keptD, pinnedD])), 0, "and a job naming it again keeps it");
  t.equal(await store.collect(new Set([keptD])), 0);
  t.equal(await store.collect(new Set([keptD])), 1);
  t.ok(await store.has(keptD), "the named module stays throughout");
});

t.test("an orchestrator hands a module only to the node running a job that names it", async (t) => {
  const { fabric, orchId, n1, n2, store, modules } = await startTestLink(t);

  // Two jobs, each naming its own stored module; executions placed on n1.
  const module = moduleOf(MODULE_CHUNK_BYTES + 1000, 5);
  const other = moduleOf(100, 6);
  for (const [id, bytes] of [
    ["j-1", module],
    ["j-2", other],
  ] as const) {
    const { record, parts } = job(id, bytes);
    for (const [d, b] of parts) await modules.put(d, b);
    store.putJob(record);
  }
  store.putExecution(execution("e-run", "j-1", "Running"));
  store.putExecution(execution("e-done", "j-1", "Completed"));

  const digest = moduleDigest(module);
  const ask = await nodeAsker(t, fabric, orchId);
  const asN1 = await ask(n1);
  const asN2 = await ask(n2);

  const first = await asN1({ executionId: "e-run", digest, offset: 0 });
  t.equal(first.size, module.length);
  const second = await asN1({ executionId: "e-run", digest, offset: MODULE_CHUNK_BYTES });
  const got = Buffer.concat([first, second].map((r) => Buffer.from(r.data ?? "", "base64")));
  t.ok(got.equals(module), "its node gets the module, chunk by chunk");
  t.equal(Buffer.from(first.data ?? "", "base64").length, MODULE_CHUNK_BYTES, "at most one chunk per answer");

  const refusals: [string, MessageBody<"module">, RegExp][] = [
    ["another node's execution", { executionId: "e-run", digest, offset: 0 }, /not placed on n2/],
    ["an execution that ended", { executionId: "e-done", digest, offset: 0 }, /is Completed/],
    [
      "another job's module",
      { executionId: "e-run", digest: moduleDigest(other), offset: 0 },
      /does not run module/,
    ],
  ];
  for (const [what, body, reason] of refusals) {
    const asker = what === "another node's execution" ? asN2 : asN1;
    const reply = await asker(body);
    t.match(reply.reason, reason, what);
    t.equal(reply.data, undefined, `${what}: no bytes`);
    t.equal(reply.unknown, undefined, `${what}: not worth asking again`);
  }
  const unknown = await asN1({ executionId: "e-nope", digest, offset: 0 });
  t.same(unknown, { reason: "execution e-nope is not known here", unknown: true }, "may be on its way");

  // Records another orchestrator stored that this one has not followed (its follower lags
  // after a server loss) are read from the buckets themselves.
  const elsewhere = await StateStore.open(jetstream((await joinFabric(t, fabric, orchId)).nc), silentLogger);
  t.teardown(() => elsewhere.close());
  const { record: lagging } = job("j-3", module);
  elsewhere.putJob(lagging);
  elsewhere.putExecution(execution("e-lagging", "j-3", "Running"));
  await elsewhere.flush();
  t.notOk(store.jobs.has("j-3"), "not in this orchestrator's memory");
  const read = await asN1({ executionId: "e-lagging", digest, offset: 0 });
  t.equal(read.size, module.length, "served from the stored records");
  elsewhere.putExecution(execution("e-orphan", "j-missing", "Running"));
  await elsewhere.flush();
  t.same(
    await asN1({ executionId: "e-orphan", digest, offset: 0 }),
    { reason: "job j-missing is not known here", unknown: true },
    "an execution whose job is nowhere yet may be asked for again",
  );
});

/** A running job of a WASM module, and the module's parts to store apart. */
function job(id: string, bytes: Buffer) {
  const { spec, modules: parts } = separateModules(wasmJobSpec({ name: id, module: bytes }));
  return { record: jobRecord(id, Date.now(), { Spec: spec, State: "Running" }), parts };
}

const execution = (id: string, jobId: string, state: ExecutionRecord["State"], node = "n1") =>
  executionRecord(id, jobId, state, { node });

t.test(
  "module bytes served to a node keep to its rate; past the longest wait it is told to ask again",
  async (t) => {
    const { fabric, orchId, n1, n2, store, modules } = await startTestLink(t, {
      moduleBytesLimit: { perSecond: MODULE_CHUNK_BYTES, burst: 2 * MODULE_CHUNK_BYTES, maxWaitMs: 1500 },
    });
    const module = moduleOf(100, 7);
    const { record, parts } = job("j-1", module);
    for (const [d, b] of parts) await modules.put(d, b);
    store.putJob(record);
    store.putExecution(execution("e-1", "j-1", "Running"));
    store.putExecution(execution("e-2", "j-1", "Running", "n2"));
    const ask = await nodeAsker(t, fabric, orchId);
    const [asN1, asN2] = [await ask(n1), await ask(n2)];
    const digest = moduleDigest(module);

    const start = performance.now();
    const answers = await Promise.all(
      Array.from({ length: 6 }, () =>
        asN1({ executionId: "e-1", digest, offset: 0 }).then((reply) => ({
          reply,
          ms: performance.now() - start,
        })),
      ),
    );
    const served = answers.filter((a) => a.reply.size === module.length);
    t.equal(served.length, 3, "two chunks' worth at once, and one more within the longest wait");
    t.ok(Math.max(...served.map((a) => a.ms)) >= 900, "the third waited its turn (a second at this rate)");
    const refused = answers.filter((a) => a.reply.size === undefined);
    t.equal(refused.length, 3);
    for (const { reply } of refused) {
      t.same(
        reply,
        { reason: "n1 asks for more module bytes than it may now", unknown: true },
        "to ask again",
      );
    }
    t.equal(
      (await asN2({ executionId: "e-2", digest, offset: 0 })).size,
      module.length,
      "another node has its own rate",
    );
  },
);

/** `ask(node)`: that node's signed `module` requests to the orchestrator, each resolving to the verified reply. */
async function nodeAsker(t: Test, fabric: TestFabric, orch: TestIdentity) {
  return async (node: TestIdentity) => {
    const { id, messenger } = await registeredNode(t, fabric, node, orch);
    return async (body: MessageBody<"module">): Promise<MessageBody<"module-reply">> => {
      const env = await messenger.requestSigned(
        subjects.computeOut(id, "module"),
        "module",
        orch.spiffeId,
        body,
      );
      t.equal(env.kind, "module-reply");
      return env.body as MessageBody<"module-reply">;
    };
  };
}
