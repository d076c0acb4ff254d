import { read as readCallback, readSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { promisify } from "node:util";
import { INPUTS_DIR, OUTPUTS_DIR, type Task } from "../../core/index.js";
import { closeDescriptorsUnder } from "./descriptor-sweep.js";
import { ENGINE_CODES, EngineError } from "./errors.js";
import {
  BaseExecutor,
  DEFAULT_MAX_LOG_FILE_BYTES,
  type EngineFailure,
  type EngineRunRequest,
  type EngineRunResult,
  stopFailure,
} from "./executor.js";
import { resolveEntryModule } from "./job-inputs.js";
import { capturedStreams, OutputCapture } from "./output-capture.js";
import { WasmModuleCache, type WasmModuleCacheOptions } from "./wasm-module-cache.js";
import { WasmWorkerPool, type WasmWorkerPoolOptions } from "./wasm-pool.js";
import { StdioPool } from "./wasm-stdio.js";
import type { WasmWorkerData, WasmWorkerMessage } from "./wasm-worker.js";

/** How often the stream spools are read while a module runs. @default 50 */
export const DEFAULT_WASM_LOG_POLL_MS = 50;

export interface WasmExecutorOptions {
  /** `Compute.Inputs.AllowedPaths`: where a `localFile` EntryModule may come from. */
  allowedPaths?: readonly string[];
  /** @default DEFAULT_WASM_LOG_POLL_MS */
  logPollMs?: number;
  /** Warm worker threads (see WasmWorkerPool). */
  pool?: WasmWorkerPoolOptions;
  /** Compiled modules kept (see WasmModuleCache). */
  modules?: WasmModuleCacheOptions;
  /** Gets a `stored` EntryModule by its digest, for the execution that runs it (compute/stored-modules). */
  storedModule?: (executionId: string, digest: string) => Promise<Buffer>;
}

type StopReason = "timeout" | "cancel" | "output";

/**
 * Runs WebAssembly (WASI preview1) modules on a pool of warm worker threads
 * (WasmWorkerPool), one execution per worker at a time, each with a fresh WASI
 * and a fresh instance of the module, compiled once per module digest and
 * memory cap (WasmModuleCache): `/inputs` and `/outputs` are preopened (fds 3
 * and 4, in that order), stdin is /dev/null, stdout and stderr go to unlinked
 * files that are read back while the module runs (capped) and reused, emptied,
 * by later executions (StdioPool). The
 * module's memory is capped by rewriting its declared maximum (see
 * capModuleMemory); the worker's JS heap by `resourceLimits`. Timeout and
 * cancel terminate the worker, and the pool starts another in its place;
 * the descriptors the terminated worker's WASI left open are closed then.
 *
 * node:wasi is not a security sandbox for the file system (Node's own
 * warning): it confines paths to the preopens, but it does not make
 * `/inputs` read-only. Inputs are per-execution copies, so a module can only
 * change its own copy.
 */
export class WasmExecutor extends BaseExecutor {
  readonly engine = "wasm" as const;
  readonly #allowedPaths: readonly string[];
  readonly #storedModule: WasmExecutorOptions["storedModule"];
  readonly #pollMs: number;
  readonly #pool: WasmWorkerPool;
  readonly #modules: WasmModuleCache;
  readonly #stdio = new StdioPool();

  constructor(options: WasmExecutorOptions = {}) {
    super();
    this.#allowedPaths = options.allowedPaths ?? [];
    this.#storedModule = options.storedModule;
    this.#pollMs = options.logPollMs ?? DEFAULT_WASM_LOG_POLL_MS;
    this.#pool = new WasmWorkerPool(options.pool);
    this.#modules = new WasmModuleCache(options.modules);
  }

  /** Starts the warm workers. */
  override async start(): Promise<void> {
    await this.#pool.start();
  }

  protected override async release(): Promise<void> {
    await this.#pool.close();
    this.#stdio.close();
  }

  protected async execute(req: EngineRunRequest, signal: AbortSignal): Promise<EngineRunResult> {
    const params = wasmParams(req.task);
    const fetch = this.#storedModule;
    const bytes = await unlessAborted(
      resolveEntryModule(params.EntryModule, {
        allowedPaths: this.#allowedPaths,
        ...(fetch ? { stored: (digest: string) => fetch(req.executionId, digest) } : {}),
      }),
      signal,
    );
    const module = await this.#modules.get(bytes, req.limits.maxMemoryBytes, params.Entrypoint);
    const started = performance.now();
    const stdout = new OutputCapture(req.limits.maxStdoutBytes, (c) => req.onLog?.("stdout", c));
    const stderr = new OutputCapture(req.limits.maxStderrBytes, (c) => req.onLog?.("stderr", c));
    const maxLog = req.limits.maxLogFileBytes ?? DEFAULT_MAX_LOG_FILE_BYTES;
    const stdio = await this.#stdio.acquire(req.workDir);
    const spools = [stdio.stdout, stdio.stderr].map((fd) => ({ fd, offset: 0 }));
    let stopReason: StopReason | undefined;
    let outcome: WasmWorkerMessage | undefined;
    let workerError: Error | undefined;
    /** What each stream holds, once read to its end after the module ended. */
    let sizes: [number, number] | undefined;
    try {
      const data: WasmWorkerData = {
        module,
        args: [req.task.Name, ...params.Parameters],
        env: { ...req.task.Env, ...params.EnvironmentVariables },
        preopens: { [INPUTS_DIR]: req.inputsDir, [OUTPUTS_DIR]: req.outputsDir },
        ...stdio,
        entrypoint: params.Entrypoint,
        maxMemoryBytes: req.limits.maxMemoryBytes,
      };
      const worker = await this.#pool.acquire();
      let ran = false;
      const stop = (reason: StopReason) => {
        stopReason ??= reason;
        // Once it answered, the worker is back in the pool and may serve another execution.
        if (!ran) void worker.kill();
      };
      const captures = [stdout, stderr];
      let draining: Promise<void> | undefined;
      const drain = (final = false) =>
        (draining ??= (async () => {
          await Promise.all(
            spools.map(async (spool, i) => {
              spool.offset = await readNew(spool.fd, spool.offset, captures[i]!, final);
              if (spool.offset > maxLog) stop("output");
            }),
          );
        })().finally(() => {
          draining = undefined;
        }));
      const poll = setInterval(() => drain(), this.#pollMs);
      const timer = setTimeout(() => stop("timeout"), req.timeoutMs);
      const onAbort = () => stop("cancel");
      if (signal.aborted) onAbort();
      else signal.addEventListener("abort", onAbort, { once: true });
      try {
        outcome = await worker.run(data);
      } catch (err) {
        workerError = err as Error;
      } finally {
        ran = true;
        this.#pool.release(worker);
      }
      if (workerError) {
        // Killed or died before it could close what its WASI opened (see closeDescriptorsUnder):
        // once the thread is gone, nothing else holds a descriptor into this execution's preopens.
        await worker.kill();
        await closeDescriptorsUnder(Object.values(data.preopens));
      }
      clearInterval(poll);
      clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
      await draining;
      await drain(true);
      sizes = [spools[0]!.offset, spools[1]!.offset];
    } finally {
      // The module no longer runs (it answered, or its thread is gone).
      this.#stdio.release(stdio, sizes);
    }
    const result = capturedStreams(stdout, stderr, started);
    const failure = failureOf(stopReason, outcome, workerError, req);
    if (failure) return { exitCode: -1, ...result, error: failure };
    return { exitCode: (outcome as { exitCode: number }).exitCode, ...result };
  }
}

/**
 * `work`, or SHOAL_ENGINE_CANCELLED as soon as `signal` aborts: a stop or a
 * timeout ends an execution at once, even while its module is still being
 * fetched (which may wait seconds for an orchestrator). The work itself
 * goes on unobserved; a fetch other executions share finishes for them.
 */
function unlessAborted<T>(work: Promise<T>, signal: AbortSignal): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const onAbort = () =>
      reject(
        new EngineError(
          ENGINE_CODES.SHOAL_ENGINE_CANCELLED,
          "stopped before it started, while its module was fetched",
        ),
      );
    if (signal.aborted) onAbort();
    else signal.addEventListener("abort", onAbort, { once: true });
    work.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

function wasmParams(task: Task) {
  if (task.Engine.Type !== "wasm") throw new Error("unreachable: checked by BaseExecutor.run");
  return task.Engine.Params;
}

const readFd = promisify(readCallback);
/** What one read of a stream spool takes. */
const READ_BYTES = 64 * 1024;

/**
 * Reads what was appended to a spool since `offset` into `capture`; returns the new offset.
 * A read of a regular file comes back short only at its end, so a short read is the last.
 * `final`: the module is done, so the first read (one page-cache copy of up to 64 KiB) is
 * made here rather than through a libuv round trip; a longer tail goes on asynchronously.
 */
async function readNew(fd: number, offset: number, capture: OutputCapture, final: boolean): Promise<number> {
  const buf = Buffer.alloc(READ_BYTES);
  let pos = offset;
  for (let first = true; ; first = false) {
    const bytesRead =
      final && first
        ? readSync(fd, buf, 0, buf.length, pos)
        : (await readFd(fd, buf, 0, buf.length, pos)).bytesRead;
    if (bytesRead > 0) capture.push(Buffer.from(buf.subarray(0, bytesRead)));
    pos += bytesRead;
    if (bytesRead < buf.length) return pos;
  }
}

function failureOf(
  stopReason: StopReason | undefined,
  outcome: WasmWorkerMessage | undefined,
  workerError: Error | undefined,
  req: EngineRunRequest,
): EngineFailure | undefined {
  if (stopReason === "output") {
    return {
      code: ENGINE_CODES.SHOAL_ENGINE_OUTPUT_LIMIT,
      message: `killed: wrote more than ${req.limits.maxLogFileBytes ?? DEFAULT_MAX_LOG_FILE_BYTES} bytes to one stream`,
    };
  }
  if (stopReason) return stopFailure(stopReason, req.timeoutMs);
  if (outcome && "exitCode" in outcome) return undefined;
  const message = outcome?.error ?? workerError?.message ?? "the worker ended without a result";
  return { code: ENGINE_CODES.SHOAL_ENGINE_CRASHED, message };
}
