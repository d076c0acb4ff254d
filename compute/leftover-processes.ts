import { promises as fs } from "node:fs";
import path from "node:path";
import { procStat } from "../core/index.js";

/**
 * Kills the process groups of programs still running in a directory under
 * `root`: what exec programs started and left behind when their node was
 * killed (the programs themselves die with the node, `setpriv --pdeathsig`,
 * where util-linux has it). Found by their working directory, which is
 * where an exec program starts, so a number the kernel has handed out again
 * is never mistaken for one of them; a process that moved elsewhere is not
 * seen. Resolves to the process groups killed.
 */
export async function killLeftoverProcesses(root: string): Promise<number[]> {
  const inside = (cwd: string) => cwd.replace(/ \(deleted\)$/, "").startsWith(root + path.sep);
  const own = await processGroupOf("self");
  const pids = (await fs.readdir("/proc").catch(() => [] as string[])).filter((name) => /^\d+$/.test(name));
  const groups = await Promise.all(
    pids.map(async (pid) => {
      const cwd = await fs.readlink(`/proc/${pid}/cwd`).catch(() => undefined);
      return cwd !== undefined && inside(cwd) ? processGroupOf(pid) : undefined;
    }),
  );
  const killed = [...new Set(groups)].filter((g): g is number => g !== undefined && g > 1 && g !== own);
  for (const group of killed) {
    try {
      process.kill(-group, "SIGKILL");
    } catch {
      // ESRCH: the group ended meanwhile.
    }
  }
  return killed;
}

/** The process group of `pid` (a number, or "self"); undefined once the process is gone. */
async function processGroupOf(pid: string): Promise<number | undefined> {
  const group = (await procStat(`/proc/${pid}/stat`))?.[2];
  return group === undefined ? undefined : Number(group);
}
