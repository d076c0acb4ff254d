import "reflect-metadata";
import { execFile } from "node:child_process";
import { promises as fs } from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { jetstream } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { silentLogger } from "../core/index.js";
import { JobService, type JobServiceOptions } from "../orchestrator/job-service.js";
import { FOLLOWER_QUEUE_BYTES, type LogEntry, LogStore } from "../orchestrator/log-store.js";
import { StateStore } from "../orchestrator/state-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";
import { jobRecord, storedLines } from "./helpers/records.js";

const line = (
  Seq: number,
  Data: string,
  ExecutionID = "e-1",
  Stream: LogEntry["Stream"] = "stdout",
): LogEntry => ({
  Time: Date.now(),
  ExecutionID,
  Stream,
  Seq,
  Data,
});

t.test(
  "a follower gets the stored lines, the live ones, and then the end once the job is final",
  async (t) => {
    const dir = await tempDir(t, "shoal-job-logs-");
    const nc = await connect({ servers: await startJetStream(t, path.join(dir, "js")) });
    t.teardown(() => nc.close());
    const store = await StateStore.open(jetstream(nc), silentLogger);
    t.teardown(() => store.close());
    const logs = new LogStore(dir);
    await logs.init();
    await logs.append("j-1", line(0, "stored\n"));
    const job = jobRecord("j-1", Date.now(), { State: "Running" });
    store.putJob(job);
    // followLogs needs only the store and the log store.
    const jobs = new JobService({ store, logs, log: silentLogger } as unknown as JobServiceOptions);

    const follower = jobs.followLogs("j-1", new AbortController().signal);
    t.equal((await follower.next()).value?.Data, "stored\n");
    // The job ends while the follower waits: a line stored before the end is still given.
    const appended = logs.append("j-1", line(1, "live\n"));
    store.putJob({ ...job, State: "Completed" });
    await appended;
    const rest: string[] = [];
    for await (const e of follower) rest.push(e.Data);
    t.same(rest, ["live\n"], "then the iteration ends");

    // Lines taken just before the job ended are still being written when a follower starts.
    store.putJob({ ...job, ID: "j-3", State: "Running" });
    const last = [logs.append("j-3", line(0, "a\n")), logs.append("j-3", line(1, "b\n"))];
    store.putJob({ ...job, ID: "j-3", State: "Completed" });
    const late: string[] = [];
    for await (const e of jobs.followLogs("j-3", new AbortController().signal)) late.push(e.Data);
    t.same(late, ["a\n", "b\n"], "a follower of a job just ended waits for its lines being written");
    await Promise.all(last);

    const cancelled = new AbortController();
    store.putJob({ ...job, ID: "j-2", State: "Running" });
    const quiet = jobs.followLogs("j-2", cancelled.signal);
    const waiting = quiet.next();
    cancelled.abort();
    t.same(await waiting, { value: undefined, done: true }, "a follower whose client went away ends at once");
  },
);

t.test(
  "the repeat check and the caps hold across a restart, and for jobs whose counts were let go",
  async (t) => {
    const dir = await tempDir(t, "shoal-job-logs-");
    const first = new LogStore(dir, 10);
    await first.init();
    t.equal(await first.append("j-1", line(0, "123456")), "stored");
    t.equal(await first.append("j-1", line(1, "78")), "stored");

    const restarted = new LogStore(dir, 10, 1);
    await restarted.init();
    t.equal(await restarted.append("j-1", line(1, "78")), "repeated", "a resent line is not stored twice");
    t.equal(
      await restarted.append("j-1", line(2, "901")),
      "capped",
      "the bytes stored before count against the cap",
    );
    t.equal(
      await restarted.append("j-1", line(3, "12", "e-1", "stderr")),
      "stored",
      "each stream has its own",
    );
    // One job's counts are kept: j-2's push j-1's out, which are then worked out from its lines again.
    t.equal(await restarted.append("j-2", line(0, "x", "e-2")), "stored");
    t.equal(await restarted.append("j-1", line(3, "12", "e-1", "stderr")), "repeated");
    t.same(
      (await storedLines(restarted, "j-1")).map((e) => e.Data),
      ["123456", "78", "12"],
    );
  },
);

/** A log store in a new directory, closed at the test's end; `segmentBytes` as LogStore takes it. */
async function openStore(t: Test, segmentBytes?: number): Promise<{ dir: string; logs: LogStore }> {
  const dir = await tempDir(t, "shoal-job-logs-");
  const logs = new LogStore(dir, undefined, undefined, segmentBytes);
  t.teardown(() => logs.close());
  await logs.init();
  return { dir, logs };
}

/** The log segments (`.ndjson`) in `dir`'s store, sorted; `kind: "index"` for their indexes. */
const logFiles = async (dir: string, kind: "segment" | "index" = "segment") =>
  (await fs.readdir(path.join(dir, "logs")))
    .filter((n) => n.endsWith(kind === "segment" ? ".ndjson" : ".index"))
    .sort();

t.test("the lines of many jobs go into one segment, each job's read back in its order", async (t) => {
  const { dir, logs } = await openStore(t);
  const jobs = Array.from({ length: 50 }, (_, i) => `j-${i}`);
  for (let seq = 0; seq < 3; seq++) {
    await Promise.all(jobs.map((id) => logs.append(id, line(seq, `${id} line ${seq}\n`))));
  }
  t.same(await logFiles(dir), ["segment-1.ndjson"], "no file per job");
  for (const id of ["j-0", "j-17", "j-49"]) {
    t.same(
      (await storedLines(logs, id)).map((e) => e.Data),
      [0, 1, 2].map((seq) => `${id} line ${seq}\n`),
    );
  }
  t.same([...(await logs.jobs()).keys()].sort(), [...jobs].sort());
  t.same(Object.keys((await storedLines(logs, "j-3"))[0]!).sort(), [
    "Data",
    "ExecutionID",
    "Seq",
    "Stream",
    "Time",
  ]);
});

t.test("a full segment is left for a new one, and a restart finds every line again", async (t) => {
  const { dir, logs } = await openStore(t, 300);
  for (let seq = 0; seq < 6; seq++) {
    await logs.append("j-a", line(seq, `a${seq}`));
    await logs.append("j-b", line(seq, `b${seq}`, "e-2"));
  }
  t.ok((await logFiles(dir)).length > 2, "lines past 300 bytes start new segments");
  const restarted = new LogStore(dir);
  t.teardown(() => restarted.close());
  await restarted.init();
  t.same(
    (await storedLines(restarted, "j-a")).map((e) => e.Data),
    ["a0", "a1", "a2", "a3", "a4", "a5"],
  );
  t.same(
    (await storedLines(restarted, "j-b")).map((e) => e.Data),
    ["b0", "b1", "b2", "b3", "b4", "b5"],
  );
  t.equal(await restarted.append("j-a", line(5, "a5")), "repeated", "counted from the segments");
});

t.test(
  "a removed job's lines are gone, after a restart too, and a segment goes once no job has lines in it",
  async (t) => {
    const { dir, logs } = await openStore(t);
    await logs.append("j-gone", line(0, "gone\n"));
    await logs.append("j-kept", line(0, "kept\n", "e-2"));
    await logs.remove("j-gone");
    t.same(await storedLines(logs, "j-gone"), []);
    t.same([...(await logs.jobs()).keys()], ["j-kept"]);
    await logs.close();

    const restarted = new LogStore(dir);
    t.teardown(() => restarted.close());
    await restarted.init();
    t.same(await storedLines(restarted, "j-gone"), [], "the removal is recorded in the segment");
    t.same(
      (await storedLines(restarted, "j-kept")).map((e) => e.Data),
      ["kept\n"],
    );
    t.equal(await restarted.append("j-gone", line(0, "again\n")), "stored", "counted from nothing");
    await restarted.remove("j-gone");
    t.same(
      await logFiles(dir),
      ["segment-1.ndjson", "segment-2.ndjson"],
      "a job still has lines in the first",
    );
    await restarted.remove("j-kept");
    t.same(await logFiles(dir), ["segment-2.ndjson"], "deleted once no job has lines in it");

    const again = new LogStore(dir);
    t.teardown(() => again.close());
    await again.init();
    t.same(await logFiles(dir), [], "a segment of removals only, all older ones gone, is deleted at start");
    t.same([...(await again.jobs()).keys()], []);
  },
);

t.test(
  "a segment recording a removal stays while an older segment holds the removed job's lines",
  async (t) => {
    // Room for two lines of ~95 bytes a segment, or one and a removal's record.
    const { dir, logs } = await openStore(t, 200);
    await logs.append("j-a", line(0, "a"));
    await logs.append("j-b", line(0, "b")); // segment 1: a, b
    await logs.append("j-c", line(0, "c")); // segment 2: c
    await logs.remove("j-b"); // recorded in segment 2
    await logs.append("j-d", line(0, "d")); // segment 3
    await logs.remove("j-c"); // recorded in segment 3: no job has lines in segment 2 now
    t.same(await logFiles(dir), ["segment-1.ndjson", "segment-2.ndjson", "segment-3.ndjson"]);
    await logs.close();
    const restarted = new LogStore(dir);
    t.teardown(() => restarted.close());
    await restarted.init();
    t.same([...(await restarted.jobs()).keys()].sort(), ["j-a", "j-d"], "j-b's removal still holds");
  },
);

t.test(
  "a segment that cannot be deleted is kept, with no failure, and deleted at a later sweep",
  async (t) => {
    // Room for one line of ~95 bytes a segment, or one and a removal's record.
    const { dir, logs } = await openStore(t, 150);
    await logs.append("j-a", line(0, "a")); // segment 1
    await logs.append("j-b", line(0, "b")); // segment 2
    const logsDir = path.join(dir, "logs");
    // Immutable: not even root may unlink in it (permissions would not stop root).
    const chattr = (flag: string) => promisify(execFile)("chattr", [flag, logsDir]);
    const immutable = await chattr("+i").then(
      () => true,
      (err: Error) => {
        t.plan(0, `the file system has no immutable flag (chattr: ${err.message.trim()})`);
        return false;
      },
    );
    if (!immutable) return;
    t.teardown(() => chattr("-i"));
    await logs.remove("j-a"); // recorded in segment 2; segment 1 cannot be deleted
    t.same(await logFiles(dir), ["segment-1.ndjson", "segment-2.ndjson"]);
    await chattr("-i");
    await logs.remove("j-b");
    t.same(await logFiles(dir), ["segment-2.ndjson"], "tried again at the next sweep");
  },
);

t.test("a segment left is indexed, and a restart reads the index rather than the segment", async (t) => {
  const dir = await tempDir(t, "shoal-job-logs-");
  const logs = new LogStore(dir, undefined, undefined, 200);
  await logs.init();
  for (let seq = 0; seq < 3; seq++) await logs.append("j-a", line(seq, `a${seq}`));
  await logs.close();
  t.same(await logFiles(dir), ["segment-1.ndjson", "segment-2.ndjson"]);
  t.same(
    await logFiles(dir, "index"),
    ["segment-1.index", "segment-2.index"],
    "each segment left, at close too",
  );
  // Lines the segments no longer name a job in: only their indexes still know whose they are.
  for (const name of await logFiles(dir)) {
    const file = path.join(dir, "logs", name);
    await fs.writeFile(file, (await fs.readFile(file, "utf8")).replaceAll('{"JobID":', '{"JobXX":'));
  }
  const restarted = new LogStore(dir);
  t.teardown(() => restarted.close());
  await restarted.init();
  t.same(
    (await storedLines(restarted, "j-a")).map((e) => e.Data),
    ["a0", "a1", "a2"],
  );
});

t.test(
  "an index that does not match its segment's size is not trusted: the segment is read through",
  async (t) => {
    const dir = await tempDir(t, "shoal-job-logs-");
    const logs = new LogStore(dir);
    await logs.init();
    await logs.append("j-a", line(0, "a0"));
    await logs.close();
    // A line the index does not know of (an index left from before a crash's last writes).
    await fs.appendFile(
      path.join(dir, "logs", "segment-1.ndjson"),
      `${JSON.stringify({ JobID: "j-b", ...line(0, "b0", "e-2") })}\n`,
    );
    const restarted = new LogStore(dir);
    t.teardown(() => restarted.close());
    await restarted.init();
    t.same([...(await restarted.jobs()).keys()].sort(), ["j-a", "j-b"]);
    t.same(
      (await storedLines(restarted, "j-b")).map((e) => e.Data),
      ["b0"],
    );
  },
);

t.test("a job's file from a store before segments is moved into one at start", async (t) => {
  const dir = await tempDir(t, "shoal-job-logs-");
  await fs.mkdir(path.join(dir, "logs"), { recursive: true });
  await fs.writeFile(
    path.join(dir, "logs", "j-old.ndjson"),
    `${JSON.stringify(line(0, "one\n"))}\n${JSON.stringify(line(1, "two\n"))}\n{"Time":1,"Execu`,
  );
  const logs = new LogStore(dir);
  t.teardown(() => logs.close());
  await logs.init();
  t.same(await logFiles(dir), ["segment-1.ndjson"], "the job's file is gone");
  t.same(
    (await storedLines(logs, "j-old")).map((e) => e.Data),
    ["one\n", "two\n"],
    "its torn line left out",
  );
  t.equal(await logs.append("j-old", line(1, "two\n")), "repeated");
  t.equal(await logs.append("j-old", line(2, "three\n")), "stored");
});

t.test("a job's file whose move a crash cut short is moved on, each line once", async (t) => {
  const dir = await tempDir(t, "shoal-job-logs-");
  await fs.mkdir(path.join(dir, "logs"), { recursive: true });
  const old = [line(0, "one\n"), line(1, "two\n")];
  await fs.writeFile(
    path.join(dir, "logs", "j-old.ndjson"),
    old.map((e) => `${JSON.stringify(e)}\n`).join(""),
  );
  // The first line was moved into a segment before the crash; the file was not deleted yet.
  await fs.writeFile(
    path.join(dir, "logs", "segment-1.ndjson"),
    `${JSON.stringify({ JobID: "j-old", ...old[0] })}\n`,
  );
  const logs = new LogStore(dir);
  t.teardown(() => logs.close());
  await logs.init();
  t.same(
    (await storedLines(logs, "j-old")).map((e) => e.Data),
    ["one\n", "two\n"],
  );
  t.same(await logFiles(dir), ["segment-1.ndjson", "segment-2.ndjson"], "the job's file is gone");
});

t.test("lines longer than a read, and a torn last line, are read back right", async (t) => {
  const dir = await tempDir(t, "shoal-job-logs-");
  const logs = new LogStore(dir);
  await logs.init();
  const long = "x".repeat(150_000);
  await logs.append("j-1", line(0, "short\n"));
  await logs.append("j-1", line(1, long));
  await logs.append("j-1", line(2, "after\n"));
  t.same(
    (await storedLines(logs, "j-1")).map((e) => e.Data),
    ["short\n", long, "after\n"],
  );

  // A crash in the middle of a write leaves half a line at the end of the segment.
  await fs.appendFile(path.join(dir, "logs", "segment-1.ndjson"), '{"JobID":"j-1","Time":1,"Execu');
  const restarted = new LogStore(dir);
  await restarted.init();
  t.same(
    (await storedLines(restarted, "j-1")).map((e) => e.Seq),
    [0, 1, 2],
    "the torn line is not read",
  );
  t.equal(await restarted.append("j-1", line(3, "next\n")), "stored");
  t.same(
    (await storedLines(restarted, "j-1")).map((e) => e.Data),
    ["short\n", long, "after\n", "next\n"],
    "the next line starts on a line of its own",
  );
});

t.test("a follower that falls behind reads what it missed from the segments, each line once", async (t) => {
  const dir = await tempDir(t, "shoal-job-logs-");
  const logs = new LogStore(dir);
  await logs.init();
  const ended = new AbortController();
  const follower = logs.follow("j-1", ended.signal);
  const first = follower.next();
  await logs.append("j-1", line(0, "first\n"));
  t.equal((await first).value?.Data, "first\n", "a caught-up follower gets a line as it is written");
  // Written while the follower takes nothing: more than it may hold in memory (each of
  // its own execution, whose output is capped at 1 MiB).
  const data = "x".repeat(1000);
  const count = Math.ceil((2 * FOLLOWER_QUEUE_BYTES) / data.length);
  const stored = await Promise.all(
    Array.from({ length: count }, (_, i) => logs.append("j-1", line(i + 1, data, `e-${i}`))),
  );
  t.same(new Set(stored), new Set(["stored"]));
  ended.abort();
  const seqs: number[] = [];
  for await (const e of follower) seqs.push(e.Seq);
  t.same(
    seqs,
    Array.from({ length: count }, (_, i) => i + 1),
  );
});
