import { execFile } from "node:child_process";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import type { Test } from "tap";
import { type InitPkiOptions, initPki, openPki, type Pki } from "../../pki/index.js";

export const execFileAsync = promisify(execFile);

/** A temp directory removed when the test ends. */
export async function tempDir(t: Test, prefix = "shoal-pki-"): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A fresh PKI in a temp dir, opened. */
export async function freshPki(
  t: Test,
  opts: InitPkiOptions = {},
): Promise<{ dir: string; pki: Pki; root: string }> {
  const root = await tempDir(t);
  const dir = path.join(root, "pki");
  await initPki(dir, opts);
  const pki = await openPki(dir, opts.passphrase === undefined ? {} : { passphrase: opts.passphrase });
  return { dir, pki, root };
}

/** Runs `openssl` and returns its exit code and output (never throws on a non-zero exit). */
export async function openssl(
  args: string[],
  input?: string,
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = execFile("openssl", args, { encoding: "utf8" }, (err, stdout, stderr) => {
      const code = err
        ? typeof (err as { code?: unknown }).code === "number"
          ? (err as { code: number }).code
          : 1
        : 0;
      resolve({ code, stdout, stderr });
    });
    if (input !== undefined) child.stdin?.end(input);
  });
}
