import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import { pino } from "pino";
import t, { type Test } from "tap";
import { subjects } from "../fabric/index.js";
import type { Dispatcher } from "../orchestrator/dispatcher.js";
import { type LogEntry, LogStore } from "../orchestrator/log-store.js";
import { ResultsStore } from "../orchestrator/results-store.js";
import { tempDir } from "./helpers/cluster.js";
import { startTestLink } from "./helpers/fabric-link.js";
import { registeredNode, type TestFabric, type TestIdentity } from "./helpers/nats.js";
import { resultMessages, storedLines } from "./helpers/records.js";

/**
 * What a node that ignores its own limits can make an orchestrator keep:
 * no more staged result chunks per execution than a node may return, no more
 * log output per stream than a node may keep, and nothing staged across a
 * restart; no more messages a second than a node may send (the excess
 * dropped unverified), and no more than one warning per node every 10 s.
 */

t.test("chunks staged for one execution stop at the cap; a resent chunk counts once", async (t) => {
  const dir = await tempDir(t, "shoal-limits-");
  const results = new ResultsStore(dir, undefined, { maxStagedBytes: 10 });
  await results.init();
  const { chunks } = resultMessages("e-1", ["12345", "67890", "x"]);
  const [first, second, third] = chunks;
  t.ok(await results.stageChunk(first!));
  t.ok(await results.stageChunk(first!), "the same chunk again (a resend) counts once");
  t.ok(await results.stageChunk(second!), "10 bytes in all: at the cap");
  t.notOk(await results.stageChunk(third!), "an 11th byte is refused");
  const staging = path.join(dir, "results", ".staging", "e-1");
  t.equal((await fs.readdir(staging)).length, 2, "and not written");
  const other = resultMessages("e-2", ["abc"]).chunks[0]!;
  t.ok(await results.stageChunk(other), "another execution has its own cap");

  await results.discardStaged("e-1");
  t.ok(await results.stageChunk(third!), "discarded chunks no longer count");

  // A restart drops what was staged: the node resends a result whose manifest fails.
  const again = new ResultsStore(dir, undefined, { maxStagedBytes: 10 });
  await again.init();
  t.same(await fs.readdir(path.join(dir, "results", ".staging")), []);
});

t.test("log lines of one execution's stream stop at the cap", async (t) => {
  const dir = await tempDir(t, "shoal-limits-");
  const logs = new LogStore(dir, 8);
  await logs.init();
  const line = (execution: string, stream: LogEntry["Stream"], seq: number, data: string): LogEntry => ({
    Time: seq,
    ExecutionID: execution,
    Stream: stream,
    Seq: seq,
    Data: data,
  });
  t.equal(await logs.append("j-1", line("e-1", "stdout", 0, "12345")), "stored");
  t.equal(await logs.append("j-1", line("e-1", "stdout", 1, "678")), "stored", "8 bytes: at the cap");
  t.equal(await logs.append("j-1", line("e-1", "stdout", 2, "9")), "capped", "the first line past it");
  t.equal(await logs.append("j-1", line("e-1", "stdout", 3, "")), "dropped", "and every later one");
  t.equal(
    await logs.append("j-1", line("e-1", "stderr", 4, "stderr")),
    "stored",
    "each stream has its own cap (a node numbers both streams' lines in one sequence)",
  );
  t.equal(await logs.append("j-1", line("e-1", "stderr", 4, "stderr")), "repeated", "a line taken before");
  t.equal(await logs.append("j-1", line("e-1", "stdout", 1, "678")), "repeated", "or numbered below one");
  t.equal(await logs.append("j-1", line("e-2", "stdout", 0, "e-2")), "stored", "and each execution");
  t.same(
    (await storedLines(logs, "j-1")).map((e) => e.Data),
    ["12345", "678", "stderr", "e-2"],
  );

  await logs.remove("j-1");
  t.equal(
    await logs.append("j-1", line("e-1", "stdout", 0, "new")),
    "stored",
    "a removed job's counts and numbers go with it",
  );
});

t.test("a node past its message rate has the excess dropped unverified, and is named once", async (t) => {
  const warnings: { msg: string; node?: string; dropped?: number; code?: string; heldBack?: number }[] = [];
  const counted = { dropped: new Map<string, number>(), refused: new Map<string, number>() };
  const bump = (m: Map<string, number>, k: string) => m.set(k, (m.get(k) ?? 0) + 1);
  const { fabric, orchId, n1, n2, link, store } = await startTestLink(t, {
    log: pino({ level: "warn" }, { write: (line: string) => warnings.push(JSON.parse(line)) }),
    metrics: {
      nodeMessageDropped: (kind) => bump(counted.dropped, kind),
      nodeMessageRefused: (code) => bump(counted.refused, code),
    },
    nodeMessageLimit: { perSecond: 20, burst: 40 },
  });
  const handled = new Map<string, number>();
  link.attach({
    handleLogs: (nodeId: string) => handled.set(nodeId, (handled.get(nodeId) ?? 0) + 1),
  } as unknown as Dispatcher);

  const flooder = await loggingNode(t, fabric, n1, orchId);
  const quiet = await loggingNode(t, fabric, n2, orchId);
  const start = performance.now();
  for (let seq = 0; seq < 400; seq++) flooder.logs(seq);
  await flooder.conn.flush();
  await settled(() => handled.get("n1") ?? 0);
  const seconds = (performance.now() - start) / 1000;
  const n1Handled = handled.get("n1") ?? 0;
  t.ok(n1Handled >= 39, `the burst is taken, less the register's message (${n1Handled})`);
  t.ok(n1Handled <= 40 + 20 * seconds + 1, `then no more than the rate (${n1Handled} in ${seconds} s)`);
  const limited = warnings.filter(
    (w) => w.msg === "node exceeds its message rate: messages dropped unverified",
  );
  t.same(
    limited.map((w) => [w.node, w.dropped]),
    [["n1", 1]],
    "one warning for the flood (the next one, 10 s on, would count what was held back)",
  );
  t.equal(counted.dropped.get("message"), 400 - n1Handled, "every dropped message is counted");

  for (let seq = 0; seq < 3; seq++) quiet.logs(seq);
  await quiet.conn.flush();
  await settled(() => handled.get("n2") ?? 0);
  t.equal(handled.get("n2"), 3, "another node is not held back by the flood");

  for (let i = 0; i < 20; i++) quiet.conn.publish(subjects.computeOut("n2", "logs"), "not a signed envelope");
  await quiet.conn.flush();
  await new Promise((r) => setTimeout(r, 300));
  const refused = warnings.filter((w) => w.msg === "fabric message refused");
  t.equal(refused.length, 1, "twenty pieces of garbage are one warning, not twenty");
  t.equal(refused[0]?.node, "n2");
  t.equal(refused[0]?.code, "SHOAL_ENVELOPE_MALFORMED");
  t.equal(counted.refused.get("SHOAL_ENVELOPE_MALFORMED"), 20, "and every refused one, by code");
  t.equal(handled.get("n2"), 3);

  // Signed requests the link refuses on their merits: warned about once too.
  store.putExecution({
    ID: "e-elsewhere",
    JobID: "j-1",
    NodeID: "n1",
    State: "Running",
    StateMessage: "running",
    Resources: { cpu: 0.1, memory: 1 },
    CreateTime: Date.now(),
    ModifyTime: Date.now(),
  });
  for (let i = 0; i < 5; i++) {
    const reply = await quiet.messenger.requestSigned(
      subjects.computeOut("n2", "module"),
      "module",
      orchId.spiffeId,
      {
        executionId: "e-elsewhere",
        digest: `sha256:${"0".repeat(64)}`,
        offset: 0,
      },
    );
    t.match((reply.body as { reason?: string }).reason, /not placed on n2/);
  }
  t.same(
    warnings.filter((w) => w.msg === "module refused").map((w) => w.node),
    ["n2"],
    "five refused module requests are one warning",
  );
});

t.test("registers and renewals past a node's own limit are dropped unverified", async (t) => {
  const warnings: { msg: string; node?: string; kind?: string; dropped?: number }[] = [];
  let renewed = 0;
  const { fabric, orchId, n1, n2, link } = await startTestLink(t, {
    log: pino({ level: "warn" }, { write: (line: string) => warnings.push(JSON.parse(line)) }),
    // Refilled too slowly to matter within the test: each node gets exactly the burst.
    nodeControlLimits: { register: { perSecond: 0.001, burst: 3 }, renew: { perSecond: 0.001, burst: 2 } },
    renewCertificate: async () => {
      renewed++;
      throw new Error("not in this test");
    },
  });
  link.attach({ reconcile: () => {} } as unknown as Dispatcher);
  const node = await registeredNode(t, fabric, n1, orchId); // the first register of the three
  const answered = async (kind: "register" | "renew", body: object) => {
    const replies = await Promise.allSettled(
      Array.from({ length: 4 }, () =>
        node.messenger.requestSigned(
          subjects.computeOut("n1", kind),
          kind,
          orchId.spiffeId,
          body as never,
          500,
        ),
      ),
    );
    return replies.filter((r) => r.status === "fulfilled").length;
  };
  const register = {
    nodeId: "n1",
    chainPem: n1.issued.certPem,
    labels: {},
    capacity: { cpu: 1, memory: 1 },
    engines: ["wasm"],
    version: "test",
    executions: [],
  };
  t.equal(await answered("register", register), 2, "two more registers, then none");
  t.equal(await answered("renew", { csrPem: "x" }), 2, "two renewals, then none");
  t.equal(renewed, 2, "the dropped renewals never reached the CA");
  t.same(
    warnings.filter((w) => /rate: messages dropped unverified/.test(w.msg)).map((w) => [w.kind, w.dropped]),
    [
      ["register", 1],
      ["renew", 1],
    ],
    "one warning per kind",
  );
  await registeredNode(t, fabric, n2, orchId); // another node has its own limit
  t.pass("another node registers");
});

/** A node registered with the orchestrator, and a function that sends it a signed `logs` message. */
async function loggingNode(t: Test, fabric: TestFabric, node: TestIdentity, orch: TestIdentity) {
  const { id, conn, signer, messenger } = await registeredNode(t, fabric, node, orch);
  return {
    conn,
    messenger,
    logs: (seq: number) =>
      conn.publish(
        subjects.computeOut(id, "logs"),
        signer.sign("logs", orch.spiffeId, { executionId: "e-1", stream: "stdout", seq, data: "" }),
      ),
  };
}

/** Resolves once `count` has not changed for 200 ms (at most 10 s). */
async function settled(count: () => number): Promise<void> {
  let last = -1;
  for (let i = 0; i < 50 && count() !== last; i++) {
    last = count();
    await new Promise((r) => setTimeout(r, 200));
  }
}
