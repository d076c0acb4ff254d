import "reflect-metadata";
import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import t, { type Test } from "tap";
import { ResultSpool } from "../compute/index.js";
import { spoolEntries } from "./helpers/records.js";

const sha = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

async function tempSpool(t: Test): Promise<ResultSpool> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-spool-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const spool = new ResultSpool(path.join(dir, "spool"));
  await spool.init();
  return spool;
}

const outcome = (executionId: string) => ({
  executionId,
  state: "Completed" as const,
  exitCode: 0,
  stdout: "hi\n",
  stderr: "",
  stdoutTruncated: false,
  stderrTruncated: false,
});

function file(name: string, parts: string[]) {
  const chunks = parts.map((p) => {
    const data = Buffer.from(p);
    return { sha256: sha(data), data };
  });
  const whole = Buffer.concat(chunks.map((c) => c.data));
  return { name, size: whole.length, sha256: `sha256:${sha(whole)}`, chunks };
}

t.test("put then list and read back every chunk; remove forgets it", async (t) => {
  const spool = await tempSpool(t);
  const entry = await spool.put("job-1", outcome("exec-1"), [file("out.txt", ["hello ", "world"])]);
  t.same(entry.result.files[0]?.chunks, [sha(Buffer.from("hello ")), sha(Buffer.from("world"))]);
  t.equal(entry.result.files[0]?.sha256, sha(Buffer.from("hello world")), "digest stored bare");

  const listed = await spool.list();
  t.equal(listed.length, 1);
  t.same(listed[0]?.result, entry.result);
  t.equal(listed[0]?.jobId, "job-1");
  const back = await Promise.all(entry.result.files[0]!.chunks.map((d) => spool.readChunk("exec-1", d)));
  t.equal(Buffer.concat(back).toString(), "hello world");
  const mode = (await fs.stat(path.join(spool.root, "exec-1.json"))).mode & 0o777;
  t.equal(mode, 0o600, "manifest is private");

  await spool.remove("exec-1");
  await spool.remove("exec-1");
  t.same(await spool.list(), []);
  t.same(await spoolEntries(spool.root), [], "manifest and chunks gone");
});

t.test(
  "begin: a result with files is on disk when it may be sent; one without is written behind it",
  async (t) => {
    const spool = await tempSpool(t);
    const withFiles = await spool.begin("job-1", outcome("exec-files"), [file("out.txt", ["hello"])]);
    t.ok(await spool.has("exec-files"), "manifest written before the result may be sent");
    t.same(
      await spool.readChunk("exec-files", withFiles.entry.result.files[0]!.chunks[0]!),
      Buffer.from("hello"),
      "its chunks are readable for the delivery",
    );
    await withFiles.stored;

    const bare = await spool.begin("job-2", outcome("exec-bare"), []);
    t.same(bare.entry.result.files, []);
    await bare.stored;
    const listed = await spool.list();
    t.same(
      listed.find((e) => e.result.executionId === "exec-bare"),
      bare.entry,
      "the manifest on disk is the one handed out",
    );
    await spool.remove("exec-bare", { chunks: false });
    await spool.remove("exec-bare", { chunks: false });
    t.notOk(await spool.has("exec-bare"), "a file-less entry is removed by its manifest alone");
    await t.rejects(spool.begin("job-3", outcome("../escape"), []), { code: "SHOAL_COMPUTE_SPOOL" });
  },
);

t.test(
  "a removed manifest is kept as a spare and written over by the next entry: no inode made or freed",
  async (t) => {
    const spool = await tempSpool(t);
    const inode = async (id: string) => (await fs.stat(path.join(spool.root, `${id}.json`))).ino;
    const long = { ...outcome("exec-1"), stdout: "x".repeat(5000) };
    await (await spool.begin("job-1", long, [])).stored;
    const first = await inode("exec-1");
    await spool.remove("exec-1", { chunks: false });
    t.same(await spoolEntries(spool.root), [], "the entry is gone");
    t.equal((await spool.list()).length, 0, "a spare is never an entry");
    t.same(await fs.readdir(spool.root), [".spare-0.tmp"], "nor swept as a leftover while kept");
    t.equal((await fs.stat(path.join(spool.root, ".spare-0.tmp"))).ino, first, "the manifest's own file");

    // Shorter than the spare's bytes: what is left of them is cut.
    const bare = await spool.begin("job-2", outcome("exec-2"), []);
    await bare.stored;
    t.equal(await inode("exec-2"), first, "the spare's inode holds the next manifest");
    t.same(await spool.list(), [bare.entry], "whole and exact");
    t.equal((await fs.stat(path.join(spool.root, "exec-2.json"))).mode & 0o777, 0o600, "still private");
    t.same(await fs.readdir(spool.root), ["exec-2.json"], "the spare was used up");

    // A restart forgets its spares and sweeps them with the other temporary files.
    await spool.remove("exec-2", { chunks: false });
    t.equal((await fs.readdir(spool.root)).length, 1, "one spare");
    t.same(await new ResultSpool(spool.root).list(), []);
    t.same(await fs.readdir(spool.root), [], "swept");
  },
);

t.test("an entry without a manifest (crash while spooling) is swept, not sent", async (t) => {
  const spool = await tempSpool(t);
  await fs.mkdir(path.join(spool.root, "exec-half", "chunks"), { recursive: true });
  await fs.writeFile(path.join(spool.root, "exec-half", "chunks", "x"), "partial");
  await fs.writeFile(path.join(spool.root, ".exec-cut.json.0123456789ab.tmp"), "{");
  t.same(await spool.list(), []);
  t.same(await fs.readdir(spool.root), [], "chunks and the interrupted manifest write removed");
});

t.test("an entry spooled with its manifest inside its directory (older layout) is still sent", async (t) => {
  const spool = await tempSpool(t);
  const entry = await spool.put("job-1", outcome("exec-old"), [file("a", ["abc"])]);
  await fs.rename(path.join(spool.root, "exec-old.json"), path.join(spool.root, "exec-old", "manifest.json"));
  t.same(
    (await spool.list()).map((e) => e.result),
    [entry.result],
  );
  t.equal(
    (await spool.readChunk("exec-old", entry.result.files[0]!.chunks[0]!)).toString(),
    "abc",
    "its chunks stay where they were",
  );
  await spool.remove("exec-old");
  t.same(await spoolEntries(spool.root), []);
});

t.test(
  "an empty manifest (a machine crash before the unsynced write reached the disk) is swept",
  async (t) => {
    const spool = await tempSpool(t);
    await spool.put("job-1", outcome("exec-empty"), [file("a", ["abc"])]);
    await fs.writeFile(path.join(spool.root, "exec-empty.json"), "");
    const broken: string[] = [];
    t.same(await spool.list((id) => broken.push(id)), []);
    t.same(broken, [], "not reported as broken: it was never written");
    t.same(await spoolEntries(spool.root), [], "manifest and chunks removed");
  },
);

t.test("a result without files is its manifest alone, no directory", async (t) => {
  const spool = await tempSpool(t);
  await spool.put("job-1", outcome("exec-bare"), []);
  t.same(await fs.readdir(spool.root), ["exec-bare.json"]);
  t.equal((await spool.list())[0]?.result.executionId, "exec-bare");
});

t.test("a corrupted chunk is detected on read", async (t) => {
  const spool = await tempSpool(t);
  const entry = await spool.put("job-1", outcome("exec-2"), [file("a", ["abc"])]);
  const digest = entry.result.files[0]!.chunks[0]!;
  await fs.writeFile(path.join(spool.root, "exec-2", "chunks", digest), "abd");
  await t.rejects(spool.readChunk("exec-2", digest), { code: "SHOAL_COMPUTE_SPOOL" });
});

t.test("a broken manifest is reported and left for the operator", async (t) => {
  const spool = await tempSpool(t);
  await spool.put("job-1", outcome("exec-3"), []);
  await fs.writeFile(path.join(spool.root, "exec-3.json"), "{not json");
  const broken: string[] = [];
  t.same(await spool.list((id) => broken.push(id)), []);
  t.same(broken, ["exec-3"]);
});

t.test("chunks that do not match their digests are refused before anything is kept", async (t) => {
  const spool = await tempSpool(t);
  const bad = file("a", ["abc"]);
  bad.chunks[0]!.sha256 = sha(Buffer.from("other"));
  await t.rejects(spool.put("job-1", outcome("exec-4"), [bad]), { code: "SHOAL_COMPUTE_SPOOL" });
  const short = file("b", ["abc"]);
  short.size = 4;
  await t.rejects(spool.put("job-1", outcome("exec-5"), [short]), { code: "SHOAL_COMPUTE_SPOOL" });
  await t.rejects(fs.stat(path.join(spool.root, "exec-5")), { code: "ENOENT" }, "nothing partial left");
  t.same(await spool.list(), []);
});

t.test("execution ids that could escape the spool are refused", async (t) => {
  const spool = await tempSpool(t);
  for (const id of ["..", "../x", "a/b", ""]) {
    await t.rejects(spool.put("job", outcome(id), []), { code: "SHOAL_COMPUTE_SPOOL" }, id);
  }
});
