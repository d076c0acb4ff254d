import { constants, promises as fs } from "node:fs";
import path from "node:path";
import { FileWriteError } from "../core/index.js";
import { COMPUTE_CODES, ComputeError } from "./errors.js";

const LOCK_FILE = "compute.lock";

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Holds `DATA-DIR/compute.lock` (our pid) for the life of a compute node, so
 * two nodes never share a spool or work directories. A lock left by a process
 * that no longer exists is taken over. Returns the release function.
 *
 * @throws ComputeError `SHOAL_COMPUTE_DATA_DIR_LOCKED` when a live process holds it.
 */
export async function lockDataDir(dataDir: string): Promise<() => Promise<void>> {
  await fs.mkdir(dataDir, { recursive: true, mode: 0o700 });
  const file = path.join(dataDir, LOCK_FILE);
  // Each node in one process (tests, benchmarks) has its own data dir; the token tells our lock from theirs.
  const token = `${process.pid} ${Math.random().toString(36).slice(2)}`;
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const handle = await fs.open(file, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
      try {
        await handle.writeFile(token);
      } catch (err) {
        // A full disk, say: no empty lock is left behind, and the error names the file.
        await handle.close();
        await fs.rm(file, { force: true });
        throw new FileWriteError(file, err);
      }
      await handle.close();
      return async () => {
        const held = await fs.readFile(file, "utf8").catch(() => "");
        if (held === token) await fs.rm(file, { force: true });
      };
    } catch (err) {
      if (err instanceof FileWriteError) throw err;
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw new FileWriteError(file, err);
      const holder = await fs.readFile(file, "utf8").catch(() => "");
      const pid = Number.parseInt(holder, 10);
      if (Number.isInteger(pid) && pid > 0 && isAlive(pid)) {
        throw new ComputeError(
          COMPUTE_CODES.SHOAL_COMPUTE_DATA_DIR_LOCKED,
          `${dataDir} is in use by another compute node (pid ${pid}${pid === process.pid ? ", this process" : ""})`,
          { fix: "stop the other node, or give this one its own --data-dir" },
        );
      }
      await fs.rm(file, { force: true });
    }
  }
  throw new ComputeError(COMPUTE_CODES.SHOAL_COMPUTE_DATA_DIR_LOCKED, `cannot take the lock ${file}`, {
    fix: "remove the file if no compute node runs with this data directory",
  });
}
