import { closeSync, promises as fs } from "node:fs";
import path from "node:path";
import { isWithin } from "./host-files.js";

/** Where Linux lists a process's open descriptors, each a link to what it refers to. */
const OWN_FDS = "/proc/self/fd";

/**
 * Closes every descriptor of this process that refers to one of `roots`
 * (real paths) or to something under them, and returns how many it closed.
 *
 * For descriptors whose owner is gone without closing them: node:wasi never
 * closes its preopened directories, nor the files a module opened, not even
 * when its worker thread is terminated: each killed WebAssembly execution
 * would keep two or more descriptors open for the life of the node (measured
 * on Node 20). The caller must be sure nothing alive uses a
 * descriptor under `roots`; each one is checked again just before it is
 * closed. Without /proc (not Linux) nothing is closed.
 */
export async function closeDescriptorsUnder(roots: readonly string[]): Promise<number> {
  const entries = await fs.readdir(OWN_FDS).catch(() => [] as string[]);
  let closed = 0;
  for (const entry of entries) {
    const target = await fs.readlink(path.join(OWN_FDS, entry)).catch(() => undefined);
    if (target === undefined || !roots.some((r) => isWithin(target, r))) continue;
    closeSync(Number(entry));
    closed++;
  }
  return closed;
}
