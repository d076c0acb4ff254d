import { type EngineType, MAX_OUTPUT_STREAM_BYTES, type Task } from "../../core/index.js";
import { ENGINE_CODES, EngineError } from "./errors.js";

/** Bytes of stdout kept per execution. @default 1 MiB */
export const DEFAULT_MAX_STDOUT_BYTES = MAX_OUTPUT_STREAM_BYTES;
/** Bytes of stderr kept per execution. @default 1 MiB */
export const DEFAULT_MAX_STDERR_BYTES = MAX_OUTPUT_STREAM_BYTES;
/** Bytes a WASM program may write to a stream (spooled on disk) before it is killed. @default 64 MiB */
export const DEFAULT_MAX_LOG_FILE_BYTES = 64 * 1024 * 1024;

export interface EngineLimits {
  /** Memory the program may use: the WASM linear memory cap; RLIMIT_AS for exec (when prlimit exists). */
  maxMemoryBytes: number;
  /** @default DEFAULT_MAX_STDOUT_BYTES */
  maxStdoutBytes: number;
  /** @default DEFAULT_MAX_STDERR_BYTES */
  maxStderrBytes: number;
  /** @default DEFAULT_MAX_LOG_FILE_BYTES */
  maxLogFileBytes?: number;
}

/** One execution of one task, as the compute daemon hands it to an engine. */
export interface EngineRunRequest {
  executionId: string;
  /** The validated task (core/job-spec); its engine must be this executor's. */
  task: Task;
  /**
   * The execution's private directory (cwd of exec programs; holds the stream
   * spools). This and the two below are real paths (no symlinks, as the
   * execution manager makes them): the WASM engine preopens them as they are and,
   * after killing a worker, closes what is left open under them by path.
   */
  workDir: string;
  /** Prepared inputs (prepareInputs); `/inputs` in the WASM sandbox. */
  inputsDir: string;
  /** Where the program writes results; `/outputs` in the WASM sandbox. */
  outputsDir: string;
  timeoutMs: number;
  limits: EngineLimits;
  /** Output as it is produced (only the kept part, see limits). */
  onLog?(stream: "stdout" | "stderr", chunk: Buffer): void;
}

/** Why an execution ended other than by exiting on its own. */
export interface EngineFailure {
  code: string;
  message: string;
}

export interface EngineRunResult {
  /** The program's exit code; -1 when it never exited on its own (killed, trapped, failed to start). */
  exitCode: number;
  stdout: Buffer;
  stdoutTruncated: boolean;
  stderr: Buffer;
  stderrTruncated: boolean;
  durationMs: number;
  error?: EngineFailure;
}

/**
 * An engine that runs tasks. `run` throws an {@link EngineError} when it
 * refuses before starting (exec not allow-listed, invalid module, memory cap);
 * once started, every outcome — exit, timeout, cancel, crash — is a result.
 */
export interface Executor {
  readonly engine: EngineType;
  start(): Promise<void>;
  run(req: EngineRunRequest, signal: AbortSignal): Promise<EngineRunResult>;
  /** Refuses new runs, kills running ones and waits for them. Idempotent: same promise. */
  close(): Promise<void>;
  /** Resolves when closed, to the error that closed it if any. */
  closed(): Promise<Error | undefined>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** The shared lifecycle: tracks runs so that close() can kill them. */
export abstract class BaseExecutor implements Executor {
  abstract readonly engine: EngineType;
  readonly #running = new Set<{ abort: AbortController; done: Promise<unknown> }>();
  #closing: Promise<void> | undefined;
  #resolveClosed!: (err: Error | undefined) => void;
  readonly #closed = new Promise<Error | undefined>((resolve) => {
    this.#resolveClosed = resolve;
  });

  async start(): Promise<void> {}

  async run(req: EngineRunRequest, signal: AbortSignal): Promise<EngineRunResult> {
    if (this.#closing)
      throw new EngineError(ENGINE_CODES.SHOAL_ENGINE_CLOSED, `the ${this.engine} executor is closed`);
    if (req.task.Engine.Type !== this.engine) {
      throw new EngineError(
        ENGINE_CODES.SHOAL_ENGINE_START_FAILED,
        `a ${req.task.Engine.Type} task was given to the ${this.engine} executor`,
      );
    }
    const abort = new AbortController();
    const onAbort = () => abort.abort(signal.reason);
    if (signal.aborted) onAbort();
    else signal.addEventListener("abort", onAbort, { once: true });
    const done = this.execute(req, abort.signal);
    const entry = { abort, done: done.catch(() => {}) };
    this.#running.add(entry);
    try {
      return await done;
    } finally {
      signal.removeEventListener("abort", onAbort);
      this.#running.delete(entry);
    }
  }

  /** Runs one request until it ends or `signal` aborts (then it kills the program and reports CANCELLED). */
  protected abstract execute(req: EngineRunRequest, signal: AbortSignal): Promise<EngineRunResult>;

  /** Frees what the executor holds (worker threads) once its runs have ended; called once by close(). */
  protected async release(): Promise<void> {}

  close(): Promise<void> {
    this.#closing ??= (async () => {
      const running = [...this.#running];
      for (const r of running) r.abort.abort(new Error("executor closing"));
      await Promise.all(running.map((r) => r.done));
      await this.release();
      this.#resolveClosed(undefined);
    })();
    return this.#closing;
  }

  closed(): Promise<Error | undefined> {
    return this.#closed;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** The failure for a run stopped by `signal` or by its timeout. */
export function stopFailure(reason: "timeout" | "cancel", timeoutMs: number): EngineFailure {
  return reason === "timeout"
    ? {
        code: ENGINE_CODES.SHOAL_ENGINE_TIMEOUT,
        message: `killed after the execution timeout of ${timeoutMs} ms`,
      }
    : { code: ENGINE_CODES.SHOAL_ENGINE_CANCELLED, message: "cancelled" };
}
