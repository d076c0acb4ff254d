/**
 * Host files that change while a node reads them: a job's host inputs (and
 * a localFile module) are read from directories other users may write to,
 * and an exec program's helpers may outlive it and change its outputs while
 * the node collects them. A swapper process renames links, directories and
 * FIFOs in and out of the paths being read, as fast as it can; whatever the
 * timing, nothing outside the allowed paths may be read and nothing may hang.
 */
import "reflect-metadata";
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import t from "tap";
import { collectResults, prepareInputs, resolveEntryModule } from "../compute/engines/index.js";
import { type InputSource, parseJobSpec } from "../core/index.js";

const root = await mkdtemp(path.join(os.tmpdir(), "shoal-races-"));
t.teardown(() => rm(root, { recursive: true, force: true }));

const SECRET = "top secret";
const outside = path.join(root, "outside");
await mkdir(outside);
await writeFile(path.join(outside, "secret.txt"), SECRET);

/** Attempts per race, and the most time each race may take. */
const ATTEMPTS = 300;
const RACE_MS = 5000;
/** Longest one read may take before it counts as hung. */
const HANG_MS = 3000;

/**
 * Starts a process that swaps `a` and `b` (each a file, directory, link or
 * FIFO) under one name, `at`, again and again: `at` is `a`, then `b`, then
 * `a`... It stops by itself after twice RACE_MS, or when the test ends.
 */
function swapper(t: { teardown: (fn: () => void) => void }, at: string, other: string): ChildProcess {
  const script = `
    const fs = require("node:fs");
    const [at, other, tmp] = process.argv.slice(1);
    const until = Date.now() + ${2 * RACE_MS};
    while (Date.now() < until) {
      try { fs.renameSync(at, tmp); fs.renameSync(other, at); fs.renameSync(tmp, other); } catch {}
    }`;
  const child = spawn(process.execPath, ["-e", script, at, other, `${at}.swap`], { stdio: "ignore" });
  t.teardown(() => {
    child.kill("SIGKILL");
  });
  return child;
}

/** Runs `attempt` up to ATTEMPTS times within RACE_MS; each must settle within HANG_MS. */
async function race<T>(attempt: () => Promise<T>): Promise<PromiseSettledResult<T>[]> {
  const outcomes: PromiseSettledResult<T>[] = [];
  const start = Date.now();
  while (outcomes.length < ATTEMPTS && Date.now() - start < RACE_MS) {
    let timer: NodeJS.Timeout | undefined;
    const hung = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(Object.assign(new Error("hung"), { code: "HUNG" })), HANG_MS);
    });
    const [outcome] = await Promise.allSettled([Promise.race([attempt(), hung])]);
    clearTimeout(timer);
    outcomes.push(outcome!);
  }
  return outcomes;
}

/** The error codes among the refusals, each once. */
const codes = (outcomes: PromiseSettledResult<unknown>[]) => [
  ...new Set(
    outcomes.flatMap((o) => (o.status === "rejected" ? [String((o.reason as { code?: string }).code)] : [])),
  ),
];

function inputs(Type: "localFile" | "localDirectory", SourcePath: string): InputSource[] {
  return parseJobSpec({
    Name: "t",
    Tasks: [
      {
        Name: "m",
        Engine: { Type: "exec", Params: { Command: "/bin/true" } },
        InputSources: [{ Target: "/inputs/x", Source: { Type, Params: { SourcePath } } }],
      },
    ],
  }).Tasks[0]!.InputSources;
}

let n = 0;
const fresh = async (name: string) => {
  const d = path.join(root, `${name}${n++}`);
  await mkdir(d, { recursive: true });
  return d;
};

t.test("a host input swapped for a link to a secret is never copied from the link", async (t) => {
  const allowed = await fresh("allowed");
  const target = path.join(allowed, "data.txt");
  await writeFile(target, "public");
  await symlink(path.join(outside, "secret.txt"), path.join(allowed, "alt"));
  swapper(t, target, path.join(allowed, "alt"));
  const outcomes = await race(async () => {
    const dir = await fresh("in");
    await prepareInputs(dir, inputs("localFile", target), { allowedPaths: [allowed] });
    return readFile(path.join(dir, "x"), "utf8");
  });
  const copied = outcomes.flatMap((o) => (o.status === "fulfilled" ? [o.value] : []));
  t.notOk(copied.includes(SECRET), "the secret was never copied");
  t.same(
    [...new Set(copied)].filter((c) => c !== "public"),
    [],
    "only the allowed file's bytes were copied",
  );
  t.same(
    codes(outcomes).filter((c) => c !== "SHOAL_INPUT_NOT_ALLOWED" && c !== "SHOAL_INPUT_MISSING"),
    [],
    "every refusal says why: outside the allowed paths, or changed",
  );
  t.ok(outcomes.length >= 20, `${outcomes.length} attempts ran`);
});

t.test("a directory inside a host input swapped for a link leads nowhere outside", async (t) => {
  const allowed = await fresh("allowed");
  const tree = path.join(allowed, "tree");
  await mkdir(path.join(tree, "sub"), { recursive: true });
  await writeFile(path.join(tree, "sub/secret.txt"), "public");
  // The link waits outside the tree, so a listing of the tree sees either the directory or the link.
  await symlink(outside, path.join(allowed, "alt"));
  swapper(t, path.join(tree, "sub"), path.join(allowed, "alt"));
  const outcomes = await race(async () => {
    const dir = await fresh("in");
    await prepareInputs(dir, inputs("localDirectory", tree), { allowedPaths: [allowed] });
    // Nothing is there when the listing came between two renames of the swap.
    return readFile(path.join(dir, "x/sub/secret.txt"), "utf8").catch(() => "");
  });
  const copied = outcomes.flatMap((o) => (o.status === "fulfilled" ? [o.value] : []));
  t.notOk(copied.includes(SECRET), "the secret was never copied");
  t.same(
    codes(outcomes).filter((c) => c !== "SHOAL_INPUT_NOT_ALLOWED" && c !== "SHOAL_INPUT_MISSING"),
    [],
    "every refusal says why",
  );
});

t.test("a host input or module swapped for a FIFO is refused, never waited on", async (t) => {
  const allowed = await fresh("allowed");
  const target = path.join(allowed, "data.bin");
  await writeFile(target, Buffer.from("\0asm\x01\0\0\0", "latin1"));
  execFileSync("mkfifo", [path.join(allowed, "alt")]);
  swapper(t, target, path.join(allowed, "alt"));
  const outcomes = await race(async () => {
    await prepareInputs(await fresh("in"), inputs("localFile", target), { allowedPaths: [allowed] });
    await resolveEntryModule(
      { Type: "localFile", Params: { SourcePath: target } },
      { allowedPaths: [allowed] },
    );
  });
  t.notOk(codes(outcomes).includes("HUNG"), "no read waited for a writer");
  t.same(
    codes(outcomes).filter((c) => c !== "SHOAL_INPUT_MISSING"),
    [],
    "a FIFO is refused as not a regular file",
  );
});

t.test("results: a directory of outputs swapped for a link is never read through", async (t) => {
  const out = await fresh("out");
  await mkdir(path.join(out, "dir"));
  await writeFile(path.join(out, "dir/secret.txt"), "public");
  await symlink(outside, path.join(out, "alt"));
  swapper(t, path.join(out, "dir"), path.join(out, "alt"));
  const outcomes = await race(() => collectResults(out, [{ Name: "d", Path: "/outputs/dir" }]));
  const read = outcomes.flatMap((o) =>
    o.status === "fulfilled" ? o.value.files.flatMap((f) => f.chunks.map((c) => c.data.toString())) : [],
  );
  t.notOk(read.includes(SECRET), "the secret was never read");
  t.same(
    codes(outcomes).filter((c) => c !== "SHOAL_RESULT_ESCAPE" && c !== "SHOAL_RESULT_CHANGED"),
    [],
    "every refusal says why: outside the outputs, or changed",
  );
});
