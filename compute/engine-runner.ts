import { type Logger, parseMemory } from "../core/index.js";
import {
  collectResults,
  DEFAULT_MAX_STDERR_BYTES,
  DEFAULT_MAX_STDOUT_BYTES,
  type EngineRunResult,
  type ExecAllowList,
  ExecExecutor,
  type Executor,
  prepareInputs,
  WasmExecutor,
} from "./engines/index.js";
import type { ExecutionOutcome, ExecutionRunner } from "./execution-manager.js";

/**
 * Largest JSON-encoded stdout (and, separately, stderr) carried in a `result`
 * manifest, in UTF-8 bytes, so that the manifest's envelope stays under the
 * broker's 1 MiB payload limit however the bytes escape or encode: two of these,
 * the list of files (MAX_RESULT_MANIFEST_JSON_BYTES) and the last log lines
 * (RESULT_LOG_TAIL_BYTES, base64), a third larger again in the envelope's
 * base64url, leave room for the rest of the envelope. The whole output (up to the
 * engine's cap) was already streamed as `logs`.
 */
export const MAX_RESULT_OUTPUT_JSON_BYTES = 176 * 1024;

export interface EngineRunnerOptions {
  /** `Compute.Engines.Exec.Allow`, resolved at start-up; empty turns exec off. */
  execAllow: ExecAllowList;
  /** `Compute.Inputs.AllowedPaths`. */
  allowedInputPaths: readonly string[];
  /** `Compute.Engines.WASM.MaxMemory` in bytes: the cap on a module's linear memory. */
  wasmMaxMemoryBytes: number;
  /** Gets a job's `stored` module for the execution that runs it (compute/stored-modules). */
  storedModule: (executionId: string, digest: string) => Promise<Buffer>;
  log: Logger;
}

/** The executors of this node and the runner that drives them; close them with the node. */
export interface EngineRunner {
  engines: string[];
  run: ExecutionRunner;
  close(): Promise<void>;
}

/**
 * `text` cut so that its JSON encoding is at most `maxBytes` in UTF-8 (what a
 * message carries: a character past ASCII is two to four bytes, an escaped
 * control character six); whether it was cut.
 */
export function fitForManifest(text: string, maxBytes: number): { text: string; cut: boolean } {
  const fits = (s: string) => Buffer.byteLength(JSON.stringify(s)) <= maxBytes;
  if (fits(text)) return { text, cut: false };
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (fits(text.slice(0, mid))) lo = mid;
    else hi = mid - 1;
  }
  return { text: text.slice(0, lo), cut: true };
}

function outcomeOf(result: EngineRunResult): Omit<ExecutionOutcome, "files"> {
  const stdout = fitForManifest(result.stdout.toString("utf8"), MAX_RESULT_OUTPUT_JSON_BYTES);
  const stderr = fitForManifest(result.stderr.toString("utf8"), MAX_RESULT_OUTPUT_JSON_BYTES);
  const ok = result.exitCode === 0 && !result.error;
  return {
    state: ok ? "Completed" : "Failed",
    exitCode: result.exitCode,
    ...(ok
      ? {}
      : {
          error: result.error
            ? `${result.error.code}: ${result.error.message}`
            : `exit code ${result.exitCode}`,
        }),
    stdout: stdout.text,
    stderr: stderr.text,
    stdoutTruncated: result.stdoutTruncated || stdout.cut,
    stderrTruncated: result.stderrTruncated || stderr.cut,
  };
}

/**
 * Runs executions with the real engines: copies inputs into the work
 * directory, runs the task's engine with its memory limit, and collects the
 * declared result paths (also for a failed program, whose partial output may
 * help; not when collecting itself fails, which fails the execution).
 */
export async function createEngineRunner(o: EngineRunnerOptions): Promise<EngineRunner> {
  const executors = new Map<string, Executor>();
  executors.set(
    "wasm",
    new WasmExecutor({ allowedPaths: o.allowedInputPaths, storedModule: o.storedModule }),
  );
  if (o.execAllow.enabled) executors.set("exec", new ExecExecutor({ allow: o.execAllow }));
  for (const executor of executors.values()) await executor.start();

  const run: ExecutionRunner = async (ctx) => {
    const task = ctx.spec.Tasks[0]!;
    const executor = executors.get(task.Engine.Type);
    if (!executor) {
      return {
        state: "Failed",
        exitCode: -1,
        error: `engine ${task.Engine.Type} is not enabled on this node`,
        stdout: "",
        stderr: "",
        stdoutTruncated: false,
        stderrTruncated: false,
        files: [],
      };
    }
    await prepareInputs(ctx.inputsDir, task.InputSources, { allowedPaths: o.allowedInputPaths });
    const taskMemory = parseMemory(task.Resources.Memory);
    const result = await executor.run(
      {
        executionId: ctx.executionId,
        task,
        workDir: ctx.workDir,
        inputsDir: ctx.inputsDir,
        outputsDir: ctx.outputsDir,
        timeoutMs: ctx.timeoutMs,
        limits: {
          maxMemoryBytes:
            task.Engine.Type === "wasm" ? Math.min(taskMemory, o.wasmMaxMemoryBytes) : taskMemory,
          maxStdoutBytes: DEFAULT_MAX_STDOUT_BYTES,
          maxStderrBytes: DEFAULT_MAX_STDERR_BYTES,
        },
        onLog: (stream, chunk) => ctx.onLog(stream, chunk),
      },
      ctx.signal,
    );
    const outcome = outcomeOf(result);
    if (ctx.signal.aborted) return { ...outcome, files: [] };
    const collected = await collectResults(ctx.outputsDir, task.ResultPaths);
    if (collected.missing.length > 0) {
      o.log.info(
        { executionId: ctx.executionId, missing: collected.missing },
        "result paths the program did not create",
      );
    }
    return { ...outcome, files: collected.files };
  };

  return {
    engines: [...executors.keys()],
    run,
    close: async () => {
      await Promise.all([...executors.values()].map((e) => e.close()));
    },
  };
}
