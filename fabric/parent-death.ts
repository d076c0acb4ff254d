import { execFile } from "node:child_process";

/**
 * The launcher that makes a child die with this process: util-linux
 * `setpriv --pdeathsig SIGTERM --` sets PR_SET_PDEATHSIG and execs the child,
 * so even a SIGKILLed orchestrator takes its nats-server with it. Empty where
 * setpriv is missing or refuses (then a leftover server is stopped at the
 * next start, by pid file). Probed once per process.
 */
let probe: Promise<string[]> | undefined;

export function dieWithParentLauncher(): Promise<string[]> {
  probe ??= new Promise((resolve) => {
    const launcher = ["setpriv", "--pdeathsig", "SIGTERM", "--"];
    execFile(launcher[0]!, [...launcher.slice(1), "true"], (err) => resolve(err ? [] : launcher));
  });
  return probe;
}
