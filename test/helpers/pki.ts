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

const repo = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "..");

/** Runs the real CLI (`bin/shoal`, from dist/: run `npm run build` first) and returns its exit code and output. */
export async function shoal(
  args: string[],
  opts: { env?: Record<string, string>; cwd?: string } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    // tap's processinfo plugin injects NODE_OPTIONS (a loader that breaks the
    // extension-less bin/shoal) into every child it sees spawned: `env -u` drops it.
    execFile(
      "/usr/bin/env",
      ["-u", "NODE_OPTIONS", process.execPath, path.join(repo, "bin", "shoal"), ...args],
      { encoding: "utf8", cwd: opts.cwd ?? repo, env: { ...process.env, ...opts.env } },
      (err, stdout, stderr) => {
        const code = err
          ? typeof (err as { code?: unknown }).code === "number"
            ? (err as { code: number }).code
            : 1
          : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

/**
 * Runs the CLI in this process (cli/main.ts), capturing what it prints; faster
 * than {@link shoal} for the many small cases. `env` is set for the call only.
 */
export async function shoalInProcess(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const { main } = await import("../../cli/main.js");
  const out = { stdout: "", stderr: "" };
  const saved = { stdout: process.stdout.write, stderr: process.stderr.write, env: { ...process.env } };
  process.stdout.write = ((chunk: string | Uint8Array) => {
    out.stdout += chunk.toString();
    return true;
  }) as typeof process.stdout.write;
  process.stderr.write = ((chunk: string | Uint8Array) => {
    out.stderr += chunk.toString();
    return true;
  }) as typeof process.stderr.write;
  Object.assign(process.env, env);
  try {
    return { code: await main(args), ...out };
  } finally {
    process.stdout.write = saved.stdout;
    process.stderr.write = saved.stderr;
    for (const k of Object.keys(env)) {
      if (saved.env[k] === undefined) delete process.env[k];
      else process.env[k] = saved.env[k];
    }
  }
}
