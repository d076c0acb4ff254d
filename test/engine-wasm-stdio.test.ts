import "reflect-metadata";
import { closeSync, fstatSync, readSync, writeSync } from "node:fs";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import t, { type Test } from "tap";
import { StdioPool } from "../compute/engines/wasm-stdio.js";

async function tempDir(t: Test): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), "shoal-stdio-"));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

t.test(
  "a released set comes back emptied, appending from the start, and leaves no names behind",
  async (t) => {
    const dir = await tempDir(t);
    const pool = new StdioPool(1);
    const first = await pool.acquire(dir);
    t.same(await readdir(dir), [], "the files are unlinked at once");
    writeSync(first.stdout, "first execution's output");
    writeSync(first.stderr, "and its errors");
    pool.release(first);
    t.equal(pool.idle, 1, "idle again as soon as it is given back");
    const second = await pool.acquire(dir);
    t.same(second, first, "the same descriptors");
    t.equal(fstatSync(second.stdout).size, 0, "stdout emptied");
    t.equal(fstatSync(second.stderr).size, 0, "stderr emptied");
    writeSync(second.stdout, "mine", 100); // an explicit offset still appends
    const buf = Buffer.alloc(16);
    t.equal(buf.toString("utf8", 0, readSync(second.stdout, buf, 0, 16, 0)), "mine");
    t.equal(readSync(second.stdin, buf, 0, 16, null), 0, "stdin is /dev/null");

    // Beyond the idle cap, a set given back is closed.
    const third = await pool.acquire(dir);
    t.not(third.stdout, second.stdout, "a new set while the other is in use");
    pool.release(second);
    pool.release(third);
    pool.close();
    t.equal(pool.idle, 0);
    for (const fd of [first.stdout, third.stdout]) t.throws(() => closeSync(fd), { code: "EBADF" }, "closed");
  },
);

t.test("given what each stream holds, only a stream with output is emptied", async (t) => {
  const dir = await tempDir(t);
  const pool = new StdioPool(1);
  const set = await pool.acquire(dir);
  writeSync(set.stdout, "hello\n");
  pool.release(set, [6, 0]); // stderr read to its end and found empty
  const again = await pool.acquire(dir);
  t.equal(fstatSync(again.stdout).size, 0, "stdout emptied");
  t.equal(fstatSync(again.stderr).size, 0, "stderr still empty");
  pool.close();
});

t.test("a set that cannot be made fails whole, closing what it opened", async (t) => {
  const pool = new StdioPool();
  await t.rejects(pool.acquire(path.join(await tempDir(t), "missing")), { code: "ENOENT" });
});
