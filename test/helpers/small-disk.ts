/** Small file systems for full-disk tests: tmpfs mounts, which need root. */
import { execFile } from "node:child_process";
import { promises as fs } from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import type { Test } from "tap";

const run = promisify(execFile);

/** Why this machine cannot mount a tmpfs (not root, or refused), or undefined when it can. */
export async function whySmallDisksCannot(): Promise<string | undefined> {
  if (process.getuid?.() !== 0) return "needs root to mount a tmpfs";
  const probe = await fs.mkdtemp("/tmp/shoal-tmpfs-probe-");
  try {
    await run("mount", ["-t", "tmpfs", "-o", "size=64k", "tmpfs", probe]);
    await run("umount", [probe]);
    return undefined;
  } catch (err) {
    return `cannot mount a tmpfs: ${(err as Error).message.split("\n")[0]}`;
  } finally {
    await fs.rmdir(probe).catch(() => {});
  }
}

/** Mounts a tmpfs of `size` over `dir` until the test ends. */
export async function smallDisk(t: Test, dir: string, size: string): Promise<void> {
  await fs.mkdir(dir, { recursive: true });
  await run("mount", ["-t", "tmpfs", "-o", `size=${size},mode=0700`, "tmpfs", dir]);
  t.teardown(() => run("umount", ["-l", dir]).catch(() => {}));
}

/** Fills the file system of `dir` but for `leave` bytes; returns the file to remove to free it again. */
export async function fillBut(dir: string, leave: number): Promise<string> {
  const { bavail, bsize } = await fs.statfs(dir);
  const filler = path.join(dir, "filler");
  await fs.writeFile(filler, Buffer.alloc(bavail * bsize - leave));
  return filler;
}
