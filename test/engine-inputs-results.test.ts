import "reflect-metadata";
import { createHash } from "node:crypto";
import { mkdir, mkdtemp, readFile, rm, stat, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import t from "tap";
import { collectResults, MAX_RESULT_MANIFEST_JSON_BYTES, prepareInputs } from "../compute/engines/index.js";
import { type InputSource, parseJobSpec } from "../core/index.js";

const root = await mkdtemp(path.join(os.tmpdir(), "shoal-io-"));
t.teardown(() => rm(root, { recursive: true, force: true }));
const sha = (b: Buffer | string) => createHash("sha256").update(b).digest("hex");

/** Input sources as parseJobSpec validates them. */
function inputs(list: unknown[]): InputSource[] {
  return parseJobSpec({
    Name: "t",
    Tasks: [
      {
        Name: "m",
        Engine: { Type: "exec", Params: { Command: "/bin/true" } },
        InputSources: list,
      },
    ],
  }).Tasks[0]!.InputSources;
}

let n = 0;
async function freshDir(): Promise<string> {
  const d = path.join(root, `d${n++}`);
  await mkdir(d, { recursive: true });
  return d;
}

// Host data: an allowed directory with a file, a subdirectory and links in and out.
const allowed = path.join(root, "allowed");
const secret = path.join(root, "secret.txt");
await mkdir(path.join(allowed, "data/sub"), { recursive: true });
await writeFile(path.join(allowed, "data/a.txt"), "alpha");
await writeFile(path.join(allowed, "data/sub/b.txt"), "beta");
await symlink(path.join(allowed, "data/a.txt"), path.join(allowed, "data/link-in"));
await writeFile(secret, "top secret");
await mkdir(path.join(allowed, "leaky"));
await symlink(secret, path.join(allowed, "leaky/out"));
await symlink(secret, path.join(allowed, "escape.txt"));

t.test("inline inputs are written read-only; host inputs are copied from allowed paths", async (t) => {
  const dir = await freshDir();
  const prepared = await prepareInputs(
    dir,
    inputs([
      { Target: "/inputs/in.txt", Source: { Type: "inline", Params: { Content: "hello" } } },
      {
        Target: "/inputs/bin/data.bin",
        Source: {
          Type: "inline",
          Params: { Content: Buffer.from([0, 1, 2]).toString("base64"), Encoding: "base64", ReadWrite: true },
        },
      },
      {
        Target: "/inputs/a.txt",
        Source: { Type: "localFile", Params: { SourcePath: path.join(allowed, "data/a.txt") } },
      },
      {
        Target: "/inputs/tree",
        Source: { Type: "localDirectory", Params: { SourcePath: path.join(allowed, "data") } },
      },
    ]),
    { allowedPaths: [allowed] },
  );
  t.same(
    prepared.map((p) => [p.target, p.bytes]),
    [
      ["/inputs/in.txt", 5],
      ["/inputs/bin/data.bin", 3],
      ["/inputs/a.txt", 5],
      ["/inputs/tree", 14],
    ],
  );
  t.equal(await readFile(path.join(dir, "in.txt"), "utf8"), "hello");
  t.equal((await stat(path.join(dir, "in.txt"))).mode & 0o777, 0o444);
  t.equal((await stat(path.join(dir, "bin/data.bin"))).mode & 0o777, 0o644, "ReadWrite inputs stay writable");
  t.same(await readFile(path.join(dir, "bin/data.bin")), Buffer.from([0, 1, 2]));
  t.equal(await readFile(path.join(dir, "tree/sub/b.txt"), "utf8"), "beta");
  t.equal(
    await readFile(path.join(dir, "tree/link-in"), "utf8"),
    "alpha",
    "a link inside the allowed path is copied as a file",
  );
  t.notOk((await stat(path.join(dir, "tree/link-in"))).isSymbolicLink());
});

t.test("host inputs outside the allow-list are refused", async (t) => {
  const local = (SourcePath: string, Type = "localFile") =>
    inputs([{ Target: "/inputs/x", Source: { Type, Params: { SourcePath } } }]);
  await t.rejects(prepareInputs(await freshDir(), local(secret), { allowedPaths: [allowed] }), {
    code: "SHOAL_INPUT_NOT_ALLOWED",
  });
  await t.rejects(
    prepareInputs(await freshDir(), local(path.join(allowed, "data/a.txt")), { allowedPaths: [] }),
    {
      code: "SHOAL_INPUT_NOT_ALLOWED",
      message: /allows no host paths/,
    },
  );
  await t.rejects(
    prepareInputs(await freshDir(), local(path.join(allowed, "escape.txt")), { allowedPaths: [allowed] }),
    {
      code: "SHOAL_INPUT_NOT_ALLOWED",
      message: /really .*secret\.txt/,
    },
  );
  await t.rejects(
    prepareInputs(await freshDir(), local(path.join(allowed, "leaky"), "localDirectory"), {
      allowedPaths: [allowed],
    }),
    {
      code: "SHOAL_INPUT_NOT_ALLOWED",
    },
  );
  await t.rejects(prepareInputs(await freshDir(), local(`${allowed}x/file`), { allowedPaths: [allowed] }), {
    code: "SHOAL_INPUT_MISSING",
  });
  await t.rejects(
    prepareInputs(await freshDir(), local(path.join(allowed, "data"), "localDirectory"), {
      allowedPaths: [allowed],
      maxTotalBytes: 6,
    }),
    {
      code: "SHOAL_INPUT_TOO_LARGE",
    },
  );
});

t.test("results: files and directories in digested chunks, missing ones listed", async (t) => {
  const out = await freshDir();
  await writeFile(path.join(out, "out.txt"), "0123456789");
  await mkdir(path.join(out, "dir/deeper"), { recursive: true });
  await writeFile(path.join(out, "dir/x.txt"), "x");
  await writeFile(path.join(out, "dir/deeper/y.txt"), "yy");
  await symlink(path.join(out, "out.txt"), path.join(out, "dir/link"));
  await symlink(path.join(out, "dir"), path.join(out, "dir/loop"));
  const res = await collectResults(
    out,
    [
      { Name: "main", Path: "/outputs/out.txt" },
      { Name: "all", Path: "/outputs/dir" },
      { Name: "gone", Path: "/outputs/never-written" },
    ],
    { chunkBytes: 4 },
  );
  t.same(res.missing, ["gone"]);
  t.same(
    res.files.map((f) => [f.name, f.size]),
    [
      ["all/deeper/y.txt", 2],
      ["all/link", 10],
      ["all/x.txt", 1],
      ["main", 10],
    ],
    "a link to a directory is skipped, a link to a file inside is collected",
  );
  const main = res.files.find((f) => f.name === "main")!;
  t.equal(main.sha256, sha("0123456789"));
  t.same(
    main.chunks.map((c) => [c.index, c.data.toString(), c.sha256]),
    [
      [0, "0123", sha("0123")],
      [1, "4567", sha("4567")],
      [2, "89", sha("89")],
    ],
  );
});

t.test("results: escaping links and oversized files are refused", async (t) => {
  const out = await freshDir();
  await symlink(secret, path.join(out, "steal"));
  await t.rejects(collectResults(out, [{ Name: "s", Path: "/outputs/steal" }]), {
    code: "SHOAL_RESULT_ESCAPE",
  });
  await t.rejects(collectResults(out, [{ Name: "all", Path: "/outputs" }]), { code: "SHOAL_RESULT_ESCAPE" });
  const big = await freshDir();
  await writeFile(path.join(big, "a"), "x".repeat(100));
  await writeFile(path.join(big, "b"), "x".repeat(100));
  await t.rejects(collectResults(big, [{ Name: "a", Path: "/outputs/a" }], { maxFileBytes: 99 }), {
    code: "SHOAL_RESULT_TOO_LARGE",
  });
  await t.rejects(collectResults(big, [{ Name: "all", Path: "/outputs" }], { maxTotalBytes: 150 }), {
    code: "SHOAL_RESULT_TOO_LARGE",
  });
  await t.rejects(collectResults(big, [{ Name: "all", Path: "/outputs" }], { maxFiles: 1 }), {
    code: "SHOAL_RESULT_TOO_LARGE",
  });
  const ok = await collectResults(big, [{ Name: "all", Path: "/outputs" }], { maxTotalBytes: 200 });
  t.equal(ok.files.length, 2);
});

t.test("results: the list of files fits in one signed result message", async (t) => {
  const all = [{ Name: "all", Path: "/outputs" }];
  const files = async (count: number, name: (i: number) => string) => {
    const dir = await freshDir();
    for (let i = 0; i < count; i++) {
      const file = path.join(dir, name(i));
      await mkdir(path.dirname(file), { recursive: true });
      await writeFile(file, "x");
    }
    return dir;
  };
  const numbered = (width: number) => (i: number) => String(i).padStart(width, "0");
  await t.rejects(collectResults(await files(1001, numbered(4)), all), {
    code: "SHOAL_RESULT_TOO_LARGE",
    message: /exceed 1000 files/,
  });
  // 1000 files, each named by a 200-character directory and a 200-character file name.
  const long = (i: number) => path.join("d".repeat(200), numbered(200)(i));
  await t.rejects(collectResults(await files(1000, long), all), {
    code: "SHOAL_RESULT_TOO_LARGE",
    message: /list of \d+ result files is more than 384 KiB as JSON/,
  });
  const kept = await collectResults(await files(1000, numbered(150)), all);
  t.equal(kept.files.length, 1000, "1000 files with names of 150 characters are kept");
  const manifest = kept.files.map((f) => ({
    name: f.name,
    size: f.size,
    sha256: f.sha256,
    chunks: f.chunks.map((c) => c.sha256),
  }));
  t.ok(
    Buffer.byteLength(JSON.stringify(manifest)) <= MAX_RESULT_MANIFEST_JSON_BYTES,
    "and their list is within the limit",
  );
});
