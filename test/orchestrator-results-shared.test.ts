import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import { text } from "node:stream/consumers";
import { jetstream } from "@nats-io/jetstream";
import { Objm } from "@nats-io/obj";
import { connect } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { RESULTS_BUCKET, ResultsStore } from "../orchestrator/results-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";
import { resultMessages } from "./helpers/records.js";

/**
 * A cluster's result files against a real nats-server: what one
 * orchestrator stores is served by another from the object store, and what
 * the object store hands back must be the file the node sent.
 */

async function twoOrchestrators(t: Test) {
  const root = await tempDir(t, "shoal-results-");
  const nc = await connect({ servers: await startJetStream(t, path.join(root, "js")) });
  t.teardown(() => nc.close());
  const js = jetstream(nc);
  const shared = { objects: await new Objm(js).create(RESULTS_BUCKET), jsm: await js.jetstreamManager() };
  const [a, b] = [
    new ResultsStore(path.join(root, "a"), shared),
    new ResultsStore(path.join(root, "b"), shared),
  ];
  await Promise.all([a.init(), b.init()]);
  return { root, a, b, shared };
}

/** The chunks and manifest a node sends for one file `out.txt` holding `content` (several chunks). */
const result = (content: string) => resultMessages("e-1", [content.slice(0, 5), content.slice(5)]);

t.test("a file stored by one orchestrator is served by another from the object store", async (t) => {
  const { root, a, b } = await twoOrchestrators(t);
  const content = "result of the cluster, in chunks";
  const { chunks, manifest } = result(content);
  for (const c of chunks) t.ok(await a.stageChunk(c));
  const [file] = await a.commit("j-1", manifest);
  if (!file) throw new Error("one file expected");
  // A resend after a lost acknowledgement stores nothing twice.
  await a.commit("j-1", manifest);
  const atB = await b.open("j-1", "e-1", file);
  t.equal(atB?.size, content.length);
  t.equal(await text(atB!.stream), content);
  await t.rejects(fs.stat(path.join(root, "b", "results", "j-1")), { code: "ENOENT" }, "not on B's disk");
  t.equal(await b.open("j-1", "e-2", file), undefined, "another execution has no such file");
});

t.test("an object that is not the file the node sent is refused while it is read", async (t) => {
  const { a, b, shared } = await twoOrchestrators(t);
  const { chunks, manifest } = result("the node's own bytes");
  for (const c of chunks) await a.stageChunk(c);
  const [file] = await a.commit("j-1", manifest);
  if (!file) throw new Error("one file expected");
  // Someone with write access to the bucket replaces the object.
  await shared.objects.putBlob({ name: "j-1/e-1/out.txt" }, new TextEncoder().encode("forged bytes, 20 chr"));
  const opened = await b.open("j-1", "e-1", file);
  await t.rejects(text(opened!.stream), /does not match its digest/);
});

t.test(
  "a file is served from the stream's leader when the replica answering direct gets is behind",
  async (t) => {
    const { root, a, shared } = await twoOrchestrators(t);
    const content = "stored while this replica lagged";
    const { chunks, manifest } = result(content);
    for (const c of chunks) await a.stageChunk(c);
    const [file] = await a.commit("j-1", manifest);
    // Every direct get finds nothing, as a replica that has not caught up yet would answer.
    const jsm = new Proxy(shared.jsm, {
      get: (target, name) =>
        name === "direct" ? { getMessage: async () => null } : Reflect.get(target, name),
    });
    const behind = new ResultsStore(path.join(root, "c"), { ...shared, jsm });
    await behind.init();
    const opened = await behind.open("j-1", "e-1", file!);
    t.equal(opened?.size, content.length);
    t.equal(await text(opened!.stream), content);
  },
);
