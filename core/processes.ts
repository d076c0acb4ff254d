import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";

/** The signals a child may be sent when its parent dies. */
export type ParentDeathSignal = "SIGTERM" | "SIGKILL";

/**
 * The launcher that makes a child die with this process: util-linux
 * `setpriv --pdeathsig SIGNAL --` sets PR_SET_PDEATHSIG and execs the child,
 * so even a SIGKILLed orchestrator takes its nats-server with it (SIGTERM),
 * and a SIGKILLed compute node its exec programs (SIGKILL). Empty where
 * setpriv is missing or refuses (then a leftover server is stopped at the
 * next start, by pid file; leftover programs are killed when the node starts
 * again). Probed once per signal and process.
 */
const probes = new Map<ParentDeathSignal, Promise<string[]>>();

export function dieWithParentLauncher(signal: ParentDeathSignal = "SIGTERM"): Promise<string[]> {
  let probe = probes.get(signal);
  if (!probe) {
    probe = new Promise((resolve) => {
      const launcher = ["setpriv", "--pdeathsig", signal, "--"];
      execFile(launcher[0]!, [...launcher.slice(1), "true"], (err) => resolve(err ? [] : launcher));
    });
    probes.set(signal, probe);
  }
  return probe;
}

/**
 * The fields of a `/proc/.../stat` file from the state on (`[0]` state, `[2]`
 * process group, `[11]` utime, `[12]` stime); undefined once the process is gone.
 */
export async function procStat(file: string): Promise<string[] | undefined> {
  const stat = await readFile(file, "utf8").catch(() => undefined);
  // "pid (comm) state ...": comm may hold spaces and parentheses, so fields are counted after its last ")".
  return stat?.slice(stat.lastIndexOf(")") + 2).split(" ");
}

/** Whether process `pid` runs: false once it is gone, or a zombie its parent (or pid 1) has not reaped yet. */
export async function isRunning(pid: number): Promise<boolean> {
  const state = (await procStat(`/proc/${pid}/stat`))?.[0];
  return state !== undefined && state !== "Z";
}
