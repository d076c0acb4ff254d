import { spawn } from "node:child_process";
import { promises as fs, constants as fsConstants } from "node:fs";
import os from "node:os";
import { performance } from "node:perf_hooks";
import { dieWithParentLauncher, isUnsafeExecEnvName, type Task, within } from "../../core/index.js";
import { ENGINE_CODES, EngineError, ExecNotAllowedError } from "./errors.js";
import type { ExecAllowList } from "./exec-allow-list.js";
import { BaseExecutor, type EngineRunRequest, type EngineRunResult, stopFailure } from "./executor.js";
import { capturedStreams, OutputCapture } from "./output-capture.js";

/** The only PATH an exec program sees. */
export const EXEC_PATH = "/usr/bin:/bin";
/** util-linux prlimit: sets RLIMIT_AS on the program when present. */
export const PRLIMIT_PATH = "/usr/bin/prlimit";
/** How long to wait for stdout/stderr to close after the program's process group was killed. */
const PIPE_CLOSE_GRACE_MS = 1000;

export interface ExecExecutorOptions {
  /** `Compute.Engines.Exec.Allow`, resolved at start-up. Empty: exec is off. */
  allow: ExecAllowList;
}

/**
 * Runs allow-listed native programs. The command's real path (symlinks
 * resolved per job) must equal the real path of an allow-list entry (resolved
 * when the node started, see ExecAllowList), and that real
 * path is what gets executed — so a link swapped after the check does not
 * matter. No shell; the environment is only PATH=/usr/bin:/bin, the task's
 * Env (minus loader variables), SHOAL_INPUTS and SHOAL_OUTPUTS; cwd is the
 * work directory. The program leads its own process group, which is killed
 * as a whole on timeout, cancel, and after it exits (stray children). It is
 * started through `setpriv --pdeathsig SIGKILL` where util-linux has it, so it
 * dies with the node even when the node is SIGKILLed; what it started and left
 * running then is killed when the node starts again (ExecutionManager.recover).
 * Memory is capped with RLIMIT_AS via prlimit when /usr/bin/prlimit exists;
 * there is no CPU or file-system isolation — allow-list only trusted programs.
 */
export class ExecExecutor extends BaseExecutor {
  readonly engine = "exec" as const;
  readonly #allow: ExecAllowList;

  constructor(options: ExecExecutorOptions) {
    super();
    this.#allow = options.allow;
  }

  /** The real path to run for `command`; throws ExecNotAllowedError unless allow-listed. */
  async resolveCommand(command: string): Promise<string> {
    if (!this.#allow.enabled) {
      throw new ExecNotAllowedError(
        command,
        undefined,
        "the exec engine is off on this node (no allow-list)",
      );
    }
    const check = await this.#allow.check(command);
    if (!check.ok) throw new ExecNotAllowedError(command, check.realPath, `the command ${check.reason}`);
    return check.realPath;
  }

  protected async execute(req: EngineRunRequest, signal: AbortSignal): Promise<EngineRunResult> {
    const params = execParams(req.task);
    const real = await this.resolveCommand(params.Command);
    const unsafe = Object.keys(req.task.Env).filter(isUnsafeExecEnvName);
    if (unsafe.length > 0) {
      throw new EngineError(
        ENGINE_CODES.SHOAL_ENGINE_ENV_NOT_ALLOWED,
        `exec jobs may not set ${unsafe.join(", ")}`,
      );
    }
    const env = {
      ...req.task.Env,
      PATH: req.task.Env.PATH ?? EXEC_PATH,
      SHOAL_INPUTS: req.inputsDir,
      SHOAL_OUTPUTS: req.outputsDir,
    };
    // The program dies with the node, even a SIGKILLed one; prlimit (then the program) is exec'd in its place.
    const [file, ...args] = [
      ...(await dieWithParentLauncher("SIGKILL")),
      ...((await isExecutable(PRLIMIT_PATH))
        ? [PRLIMIT_PATH, `--as=${req.limits.maxMemoryBytes}`, "--"]
        : []),
      real,
      ...params.Arguments,
    ] as [string, ...string[]];

    const stdout = new OutputCapture(req.limits.maxStdoutBytes, (c) => req.onLog?.("stdout", c));
    const stderr = new OutputCapture(req.limits.maxStderrBytes, (c) => req.onLog?.("stderr", c));
    const started = performance.now();
    const child = spawn(file, args, {
      cwd: req.workDir,
      env,
      shell: false,
      detached: true,
      stdio: ["ignore", "pipe", "pipe"],
    });
    child.stdout.on("data", (c: Buffer) => stdout.push(c));
    child.stderr.on("data", (c: Buffer) => stderr.push(c));
    let stopReason: "timeout" | "cancel" | undefined;
    const killGroup = () => {
      if (child.pid === undefined) return;
      try {
        process.kill(-child.pid, "SIGKILL");
      } catch {
        // ESRCH: the group is already gone.
      }
    };
    const stop = (reason: "timeout" | "cancel") => {
      stopReason ??= reason;
      killGroup();
    };
    const timer = setTimeout(() => stop("timeout"), req.timeoutMs);
    const onAbort = () => stop("cancel");
    if (signal.aborted) onAbort();
    else signal.addEventListener("abort", onAbort, { once: true });

    const exit = await new Promise<{ code: number | null; signal: NodeJS.Signals | null } | { error: Error }>(
      (resolve) => {
        child.once("error", (error) => resolve({ error }));
        child.once("exit", (code, sig) => resolve({ code, signal: sig }));
      },
    );
    clearTimeout(timer);
    signal.removeEventListener("abort", onAbort);
    killGroup();
    await closePipes(child.stdout, child.stderr);
    const result = capturedStreams(stdout, stderr, started);
    if ("error" in exit) {
      return {
        exitCode: -1,
        ...result,
        error: {
          code: ENGINE_CODES.SHOAL_ENGINE_START_FAILED,
          message: `cannot start ${real}: ${exit.error.message}`,
        },
      };
    }
    if (stopReason) return { exitCode: -1, ...result, error: stopFailure(stopReason, req.timeoutMs) };
    if (exit.code !== null) return { exitCode: exit.code, ...result };
    const signo = os.constants.signals[exit.signal!] ?? 0;
    return {
      exitCode: 128 + signo,
      ...result,
      error: { code: ENGINE_CODES.SHOAL_ENGINE_CRASHED, message: `killed by ${exit.signal}` },
    };
  }
}

function execParams(task: Task) {
  if (task.Engine.Type !== "exec") throw new Error("unreachable: checked by BaseExecutor.run");
  return task.Engine.Params;
}

async function isExecutable(file: string): Promise<boolean> {
  return fs.access(file, fsConstants.X_OK).then(
    () => true,
    () => false,
  );
}

/** Waits for both pipes to end; a grandchild that left the group may hold them open, so give up after a grace. */
async function closePipes(...streams: NodeJS.ReadableStream[]): Promise<void> {
  const ended = streams.map(
    (s) =>
      new Promise<void>((resolve) => {
        if ((s as { readableEnded?: boolean }).readableEnded) resolve();
        s.once("end", () => resolve());
        s.once("close", () => resolve());
      }),
  );
  await within(Promise.all(ended), PIPE_CLOSE_GRACE_MS);
  for (const s of streams) (s as unknown as { destroy(): void }).destroy();
}
