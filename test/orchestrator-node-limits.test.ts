import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import { type LogEntry, LogStore } from "../orchestrator/log-store.js";
import { ResultsStore } from "../orchestrator/results-store.js";
import { tempDir } from "./helpers/cluster.js";
import { resultMessages } from "./helpers/records.js";

/**
 * What a node that ignores its own limits can make an orchestrator keep:
 * no more staged result chunks per execution than a node may return, no more
 * log output per stream than a node may keep, and nothing staged across a
 * restart.
 */

t.test("chunks staged for one execution stop at the cap; a resent chunk counts once", async (t) => {
  const dir = await tempDir(t, "shoal-limits-");
  const results = new ResultsStore(dir, undefined, 10);
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
  const again = new ResultsStore(dir, undefined, 10);
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
  const live: string[] = [];
  logs.follow("j-1", (e) => live.push(e.Data));
  t.equal(await logs.append("j-1", line("e-1", "stdout", 0, "12345")), "stored");
  t.equal(await logs.append("j-1", line("e-1", "stdout", 1, "678")), "stored", "8 bytes: at the cap");
  t.equal(await logs.append("j-1", line("e-1", "stdout", 2, "9")), "capped", "the first line past it");
  t.equal(await logs.append("j-1", line("e-1", "stdout", 3, "")), "dropped", "and every later one");
  t.equal(
    await logs.append("j-1", line("e-1", "stderr", 0, "stderr")),
    "stored",
    "each stream has its own cap",
  );
  t.equal(await logs.append("j-1", line("e-2", "stdout", 0, "e-2")), "stored", "and each execution");
  t.same(
    (await logs.read("j-1")).map((e) => e.Data),
    ["12345", "678", "stderr", "e-2"],
  );
  t.same(live, ["12345", "678", "stderr", "e-2"], "followers get no dropped line either");

  await logs.remove("j-1", ["e-1"]);
  t.equal(
    await logs.append("j-1", line("e-1", "stdout", 4, "new")),
    "stored",
    "a removed job's counts go with it",
  );
});
