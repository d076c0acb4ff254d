import { randomUUID } from "node:crypto";
import { constants, type Dirent, promises as fs, ftruncateSync, readdirSync, writeSync } from "node:fs";
import path from "node:path";
import { type JobSpec, type Logger, within } from "../core/index.js";
import { type MessageBody, RESULT_LOG_TAIL_BYTES, type Submitter } from "../fabric/index.js";
import { COMPUTE_CODES, ComputeError } from "./errors.js";
import { killLeftoverProcesses } from "./leftover-processes.js";
import {
  type CollectedFile,
  isSafeExecutionId,
  type ResultSpool,
  type SpooledResult,
} from "./result-spool.js";

/** What the orchestrator asked this node to run. */
export interface ExecutionRequest {
  jobId: string;
  executionId: string;
  spec: JobSpec;
  submitter: Submitter;
  timeoutMs: number;
}

/**
 * Work directories made ahead of need. @default 4
 *
 * Making one costs three new inodes (the directory, `inputs/`, `outputs/`),
 * and on ext4 with many files created and deleted per second each new inode
 * takes a millisecond or more (it passes over the recently deleted ones):
 * made ahead, that cost is off the execution's path.
 */
export const DEFAULT_READY_WORK_DIRS = 4;

/**
 * Work directories kept for reuse, made ahead or given back by a WASM
 * execution that left them as they were made (see {@link workDirReusable}).
 * @default 16
 */
export const DEFAULT_IDLE_WORK_DIRS = 16;

/**
 * Whether an execution of `spec` may give its work directory back for the
 * next one (when it is found as it was made). Only WASM tasks without
 * inputs: a module reaches the directory through its preopens alone and
 * nothing of it runs once its run has ended, where an `exec` program's
 * children may outlive it and write into a directory another job then uses;
 * inputs are copied in by the node itself, and a copy that an abort left
 * running could land in the next job's `inputs/`.
 */
export function workDirReusable(spec: JobSpec): boolean {
  return spec.Tasks.every((task) => task.Engine.Type === "wasm" && task.InputSources.length === 0);
}

/** Everything a runner needs for one execution; the manager owns the directories and the clock. */
export interface ExecutionContext {
  jobId: string;
  executionId: string;
  spec: JobSpec;
  submitter: Submitter;
  /**
   * `DATA-DIR/executions/w-<uuid>` as a real path, this execution's alone
   * while it runs: made ahead (see DEFAULT_READY_WORK_DIRS), or given back by
   * an earlier execution that left it as it was made (see workDirReusable);
   * removed or given back after the result is spooled.
   */
  workDir: string;
  /** `workDir/inputs`, created empty. */
  inputsDir: string;
  /** `workDir/outputs`, created empty. */
  outputsDir: string;
  /** The execution's time limit; the engine enforces it (the manager aborts a little later as a backstop). */
  timeoutMs: number;
  /** Aborted on cancel, backstop timeout or shutdown; the runner must stop promptly. */
  signal: AbortSignal;
  /** Output as it is produced. */
  onLog(stream: "stdout" | "stderr", data: Uint8Array): void;
}

/** How an execution ended, with its result files. */
export type ExecutionOutcome = Omit<MessageBody<"result">, "executionId" | "files"> & {
  files: readonly CollectedFile[];
};

/** Runs one execution to its end: prepares inputs, runs the engine, collects results. */
export type ExecutionRunner = (ctx: ExecutionContext) => Promise<ExecutionOutcome>;

/** Why an execution was stopped before it ended by itself. */
type StopReason = { kind: "cancel" | "timeout" | "shutdown"; message: string };

export interface ExecutionManagerOptions {
  /** Parent of the work directories, normally `DATA-DIR/executions`. */
  root: string;
  spool: ResultSpool;
  runner: ExecutionRunner;
  log: Logger;
  /**
   * Batched output: one call per stream per flush. `seq` counts up per execution
   * from 0. What is left when the execution ends, up to RESULT_LOG_TAIL_BYTES,
   * goes in its result (`logs`) instead.
   */
  onLog(executionId: string, stream: "stdout" | "stderr", seq: number, data: Uint8Array): void;
  /**
   * The execution's outcome, ready to be sent. `stored` resolves once its spool
   * entry is on disk (false: it could not be written, and the result exists only
   * in memory); a result with files is on disk already (see ResultSpool.begin).
   * Its spool entry may be removed only after `stored` settles.
   */
  onResult(entry: SpooledResult, stored: Promise<boolean>): void;
  /** The orchestrator's cancel took effect; nothing is spooled. */
  onCancelled(executionId: string, reason: string): void;
  /** Output is sent at least this often while it is produced. @default 100 */
  logFlushMs?: number;
  /** Output is sent as soon as this much is buffered. @default 65536 */
  logFlushBytes?: number;
  /** @default DEFAULT_READY_WORK_DIRS */
  readyWorkDirs?: number;
  /** @default DEFAULT_IDLE_WORK_DIRS */
  idleWorkDirs?: number;
}

interface Running {
  request: ExecutionRequest;
  controller: AbortController;
  stop: StopReason | undefined;
  done: Promise<void>;
}

const MARKER = "execution.json";
const INPUTS = "inputs";
const OUTPUTS = "outputs";
const MADE_DIRS = new Set([INPUTS, OUTPUTS]);
/** How long past its time limit an execution may take (inputs, results) before the manager aborts it. */
export const TIMEOUT_BACKSTOP_MS = 5000;

/** Output of one execution, gathered into batches so each log message is worth its signature. */
class LogBatcher {
  #seq = 0;
  readonly #pending = { stdout: [] as Uint8Array[], stderr: [] as Uint8Array[] };
  #bytes = 0;
  #timer: NodeJS.Timeout | undefined;

  constructor(
    readonly emit: (stream: "stdout" | "stderr", seq: number, data: Uint8Array) => void,
    readonly flushMs: number,
    readonly flushBytes: number,
  ) {}

  push(stream: "stdout" | "stderr", data: Uint8Array): void {
    if (data.length === 0) return;
    this.#pending[stream].push(Buffer.from(data));
    this.#bytes += data.length;
    if (this.#bytes >= this.flushBytes) this.flush();
    else this.#timer ??= setTimeout(() => this.flush(), this.flushMs);
  }

  flush(): void {
    for (const [stream, seq, data] of this.#take()) this.emit(stream, seq, data);
  }

  /**
   * The execution ended: what is pending becomes the result's last lines when it
   * is at most `maxBytes`; more is sent as usual, and there are none.
   */
  finish(maxBytes: number): LogTail {
    if (this.#bytes > maxBytes) {
      this.flush();
      return [];
    }
    return this.#take().map(([stream, seq, data]) => ({ stream, seq, data: data.toString("base64") }));
  }

  /** The pending output, one numbered batch per stream that has some; nothing is pending after. */
  #take(): OutputBatch[] {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const batches: OutputBatch[] = [];
    for (const stream of ["stdout", "stderr"] as const) {
      const parts = this.#pending[stream];
      if (parts.length === 0) continue;
      this.#pending[stream] = [];
      batches.push([stream, this.#seq++, Buffer.concat(parts)]);
    }
    this.#bytes = 0;
    return batches;
  }
}

type OutputBatch = [stream: "stdout" | "stderr", seq: number, data: Buffer];
type LogTail = NonNullable<MessageBody<"result">["logs"]>;

/**
 * Runs executions: one fresh work directory each, `DATA-DIR/executions/w-<uuid>/`
 * (with `inputs/` and `outputs/`, made ahead), a time limit, batched output, and the
 * outcome handed on while it is written to the result spool. A cancel
 * from the orchestrator aborts the runner and spools nothing; a timeout or a
 * shutdown aborts it and spools a Failed result saying why.
 */
export class ExecutionManager {
  readonly #o: ExecutionManagerOptions;
  readonly #running = new Map<string, Running>();
  /** Every execution until it is completely done, work directory removal included. */
  readonly #unsettled = new Set<Promise<void>>();
  /** `root` created and resolved to its real path, once: engines are given real paths. */
  #realRoot: Promise<string> | undefined;
  /**
   * Work directories ready for an execution, each with empty `inputs/` and
   * `outputs/` and no marker or an empty one.
   */
  readonly #ready: string[] = [];
  /**
   * The marker of each work directory that has one, kept open as long as the
   * directory is: an execution writes it with one call and the directory's
   * return empties it with one, where opening and closing it each time took
   * six (each a turn on a libuv thread and a wake-up of the event loop).
   */
  readonly #markers = new Map<string, fs.FileHandle>();
  #preparing = 0;
  /** Directories of running executions that may be given back (workDirReusable). */
  #returning = 0;
  #draining = false;

  constructor(options: ExecutionManagerOptions) {
    this.#o = options;
  }

  /**
   * Turns the work directories left by a previous process (it crashed or was
   * killed mid-run) into spooled Failed results, so the orchestrator learns
   * what happened once the node is back, after killing what those executions
   * left running in them. Returns what it spooled.
   */
  async recover(): Promise<SpooledResult[]> {
    const root = await this.#root();
    const killed = await killLeftoverProcesses(root);
    if (killed.length > 0) {
      this.#o.log.warn(
        { processGroups: killed },
        "killed programs that executions interrupted by a restart left running",
      );
    }
    const recovered: SpooledResult[] = [];
    for (const name of await fs.readdir(root)) {
      const workDir = path.join(root, name);
      const marker = await fs
        .readFile(path.join(workDir, MARKER), "utf8")
        .then((t) => JSON.parse(t) as { jobId: string; executionId: string })
        .catch(() => undefined);
      const executionId = marker?.executionId;
      // A directory without a marker was made ahead and never used, or its execution had
      // barely started. A result already spooled (the crash came after it, before the
      // directory was removed) stands.
      if (
        typeof executionId === "string" &&
        isSafeExecutionId(executionId) &&
        !(await this.#o.spool.has(executionId))
      ) {
        recovered.push(
          await this.#o.spool.put(
            String(marker?.jobId),
            failedOutcome(executionId, "the compute node stopped while the execution ran (crash or kill)"),
            [],
          ),
        );
        this.#o.log.warn(
          { executionId, jobId: marker?.jobId },
          "execution interrupted by a restart; reported as failed",
        );
      }
      await fs.rm(workDir, { recursive: true, force: true });
    }
    return recovered;
  }

  /** Ids of the executions that are running now. */
  running(): string[] {
    return [...this.#running.keys()];
  }

  has(executionId: string): boolean {
    return this.#running.has(executionId);
  }

  /** Starts an execution in the background; its end is reported through the callbacks. */
  start(request: ExecutionRequest): void {
    if (!isSafeExecutionId(request.executionId)) {
      throw new ComputeError(
        COMPUTE_CODES.SHOAL_COMPUTE_SPOOL,
        `unsafe execution id ${JSON.stringify(request.executionId)}`,
      );
    }
    if (this.#running.has(request.executionId)) return;
    const controller = new AbortController();
    const entry: Running = { request, controller, stop: undefined, done: Promise.resolve() };
    this.#running.set(request.executionId, entry);
    const done = this.#run(entry).finally(() => {
      this.#running.delete(request.executionId);
      this.#unsettled.delete(done);
    });
    entry.done = done;
    this.#unsettled.add(done);
  }

  /** Aborts a running execution on the orchestrator's request; false when it is not running here. */
  cancel(executionId: string, reason: string): boolean {
    const entry = this.#running.get(executionId);
    if (!entry) return false;
    this.#stop(entry, { kind: "cancel", message: reason });
    return true;
  }

  /**
   * Lets running executions finish for up to `graceMs`, then aborts the rest;
   * their Failed results are spooled, and every work directory removed, before
   * this resolves.
   */
  async drain(graceMs: number): Promise<void> {
    const all = () => Promise.all([...this.#running.values()].map((r) => r.done));
    if (this.#running.size === 0) {
      await this.#dropReady();
      return;
    }
    await within(all(), graceMs);
    for (const entry of this.#running.values()) {
      this.#stop(entry, {
        kind: "shutdown",
        message: "the compute node shut down before the execution finished",
      });
    }
    await this.#dropReady();
  }

  /** Waits for every execution's end and removes the work directories made ahead; none are made after. */
  async #dropReady(): Promise<void> {
    this.#draining = true;
    await Promise.all(this.#unsettled);
    await Promise.all(this.#ready.splice(0).map((dir) => this.#removeWorkDir(dir)));
  }

  /**
   * A work directory for one execution: a ready one, else a new one. More are
   * made behind it, unless the execution is expected to give it back.
   */
  async #workDir(reusable: boolean): Promise<string> {
    const ready = this.#ready.pop();
    if (reusable) this.#returning++;
    this.#prepare();
    return ready ?? (await this.#makeWorkDir());
  }

  /**
   * Ends an execution's use of its work directory: given back to the ready
   * ones when it may be (`reuse`) and is as it was made, with its marker
   * emptied; removed otherwise (and another made ahead in its place).
   * `returning`: the directory was taken as one expected back (#workDir).
   */
  async #retire(workDir: string | undefined, returning: boolean, reuse: boolean): Promise<void> {
    const room = () =>
      !this.#draining && this.#ready.length < (this.#o.idleWorkDirs ?? DEFAULT_IDLE_WORK_DIRS);
    try {
      if (workDir !== undefined && reuse && room() && asMade(workDir)) {
        const marker = this.#markers.get(workDir);
        if (marker) ftruncateSync(marker.fd, 0);
        if (room()) {
          this.#ready.push(workDir);
          return;
        }
      }
    } catch {
      // Removed below, like any directory that cannot be given back.
    } finally {
      if (returning) this.#returning--;
    }
    await this.#removeWorkDir(workDir);
    this.#prepare();
  }

  /**
   * Writes a work directory's marker (its file opened once, see #markers).
   * Over an empty one, from its start: never truncated by the open, as ext4
   * flushes a file truncated to nothing by its open when it is closed
   * (auto_da_alloc), a disk write per execution. The write, and the
   * truncation when the directory is given back, are synchronous: each takes
   * a few microseconds, its libuv round trip ten times that (docs/compute.md,
   * "Small file-system calls").
   */
  async #mark(workDir: string, data: Buffer): Promise<void> {
    let marker = this.#markers.get(workDir);
    if (!marker) {
      marker = await fs.open(path.join(workDir, MARKER), constants.O_WRONLY | constants.O_CREAT, 0o600);
      this.#markers.set(workDir, marker);
    }
    writeSync(marker.fd, data, 0, data.length, 0);
  }

  /**
   * Removes a work directory (its marker closed first) with one call per entry
   * the manager made (marker, `inputs/`, `outputs/`; one made ahead and never
   * used has no marker, and takes the fallback); only when something else is
   * left in it (inputs, a program's output) the whole tree with fs.rm, which
   * reads every directory and stats every entry first. Never fails: a leftover
   * is swept by recover().
   */
  async #removeWorkDir(workDir: string | undefined): Promise<void> {
    if (workDir === undefined) return;
    const marker = this.#markers.get(workDir);
    this.#markers.delete(workDir);
    await marker?.close().catch(() => {});
    try {
      await Promise.all([
        fs.unlink(path.join(workDir, MARKER)),
        fs.rmdir(path.join(workDir, INPUTS)),
        fs.rmdir(path.join(workDir, OUTPUTS)),
      ]);
      await fs.rmdir(workDir);
    } catch {
      await fs.rm(workDir, { recursive: true, force: true }).catch(() => {});
    }
  }

  async #makeWorkDir(): Promise<string> {
    const workDir = path.join(await this.#root(), `w-${randomUUID()}`);
    // Side by side: each creates what is missing of its path (the work directory too).
    await Promise.all([
      fs.mkdir(path.join(workDir, INPUTS), { recursive: true, mode: 0o700 }),
      fs.mkdir(path.join(workDir, OUTPUTS), { recursive: true, mode: 0o700 }),
    ]);
    return workDir;
  }

  /**
   * Makes work directories in the background until DEFAULT_READY_WORK_DIRS
   * are ready, being made, or expected back from running executions.
   */
  #prepare(): void {
    const wanted = this.#o.readyWorkDirs ?? DEFAULT_READY_WORK_DIRS;
    while (!this.#draining && this.#ready.length + this.#preparing + this.#returning < wanted) {
      this.#preparing++;
      const making = this.#makeWorkDir()
        .then(
          (dir) => {
            this.#ready.push(dir);
          },
          (err: unknown) => this.#o.log.warn({ err }, "cannot make a work directory ahead"),
        )
        .finally(() => {
          this.#preparing--;
          this.#unsettled.delete(making);
        });
      this.#unsettled.add(making);
    }
  }

  #root(): Promise<string> {
    this.#realRoot ??= fs
      .mkdir(this.#o.root, { recursive: true, mode: 0o700 })
      .then(() => fs.realpath(this.#o.root));
    // A failure is not kept: the next execution tries again.
    this.#realRoot.catch(() => {
      this.#realRoot = undefined;
    });
    return this.#realRoot;
  }

  #stop(entry: Running, reason: StopReason): void {
    if (entry.stop) return;
    entry.stop = reason;
    entry.controller.abort(new Error(reason.message));
  }

  async #run(entry: Running): Promise<void> {
    const { request, controller } = entry;
    const { executionId, jobId } = request;
    const log = this.#o.log.child({ executionId, jobId });
    const batcher = new LogBatcher(
      (stream, seq, data) => this.#o.onLog(executionId, stream, seq, data),
      this.#o.logFlushMs ?? 100,
      this.#o.logFlushBytes ?? 64 * 1024,
    );
    const timer = setTimeout(
      () =>
        this.#stop(entry, { kind: "timeout", message: `execution timed out after ${request.timeoutMs} ms` }),
      request.timeoutMs + TIMEOUT_BACKSTOP_MS,
    );
    let outcome: ExecutionOutcome;
    let marked: Promise<unknown> = Promise.resolve();
    let workDir: string | undefined;
    const reusable = workDirReusable(request.spec);
    /** Gives back or removes the work directory once the marker's write (and `after`) settled. */
    const retireAfter = async (after?: Promise<unknown>) => {
      await Promise.all([marked, after]);
      await this.#retire(workDir, reusable, reusable && entry.stop === undefined);
    };
    try {
      workDir = await this.#workDir(reusable);
      const inputsDir = path.join(workDir, INPUTS);
      const outputsDir = path.join(workDir, OUTPUTS);
      // Written while the execution runs, not before, and the result does not wait for it
      // (only the directory's removal does): it only has to outlive a crash of this
      // process, and one not written yet (or cut short) reads as no marker (docs/compute.md
      // "Durability"). Neither fsynced nor renamed into place, for the same reason; a
      // directory given back holds an empty one, written over in place (no new inode).
      marked = this.#mark(workDir, Buffer.from(JSON.stringify({ jobId, executionId }))).catch(
        (err: unknown) =>
          log.warn(
            { err },
            "cannot write the work directory's marker; a crash would go unreported by this node",
          ),
      );
      log.info({ workDir }, "execution started");
      outcome = await this.#o.runner({
        jobId,
        executionId,
        spec: request.spec,
        submitter: request.submitter,
        workDir,
        inputsDir,
        outputsDir,
        timeoutMs: request.timeoutMs,
        signal: controller.signal,
        onLog: (stream, data) => {
          if (entry.stop?.kind !== "cancel") batcher.push(stream, data);
        },
      });
    } catch (err) {
      outcome = { ...failedOutcome(executionId, describeFailure(err)), files: [] };
    } finally {
      clearTimeout(timer);
    }
    if (entry.stop?.kind === "cancel") {
      batcher.flush();
      await retireAfter();
      log.info({ reason: entry.stop.message }, "execution cancelled");
      this.#running.delete(executionId);
      this.#o.onCancelled(executionId, entry.stop.message);
      return;
    }
    if (entry.stop) outcome = { ...outcome, state: "Failed", error: entry.stop.message, files: [] };
    const tail = batcher.finish(RESULT_LOG_TAIL_BYTES);
    const { files, ...rest } = { ...outcome, ...(tail.length > 0 ? { logs: tail } : {}) };
    let started: { entry: SpooledResult; stored: Promise<void> };
    try {
      started = await this.#o.spool.begin(jobId, { ...rest, executionId }, files);
    } catch (err) {
      // Only the files can fail here (a full disk, most often): the execution is reported
      // Failed without them, a result without files being sent while it is written, and
      // kept in memory if that write fails too. Reporting nothing would leave the
      // orchestrator waiting for the execution's timeout.
      log.error({ err }, "cannot spool the result's files; the execution is reported Failed without them");
      const failure = `the node cannot store the result's files: ${describeFailure(err)}`;
      started = await this.#o.spool.begin(
        jobId,
        { ...rest, executionId, state: "Failed", error: failure },
        [],
      );
    }
    const { entry: result } = started;
    log.info({ state: result.result.state, exitCode: result.result.exitCode }, "execution finished");
    const stored = started.stored.then(
      () => true,
      (err: unknown) => {
        log.error(
          { err },
          "cannot spool the result of an execution; it is kept in memory until acknowledged",
        );
        return false;
      },
    );
    // No longer running once its result exists: callbacks see the node as it now is.
    this.#running.delete(executionId);
    this.#o.onResult(result, stored);
    // Off the result's path: a crash before this leaves a work directory whose marker
    // recover() turns into a Failed result, which the orchestrator refuses as a resend
    // (it already stored the real one) or never asked for.
    await retireAfter(stored);
  }
}

/**
 * Whether a work directory holds only what the manager made: its marker (a
 * regular file), and `inputs/` and `outputs/` with nothing in them. Read
 * synchronously (docs/compute.md, "Small file-system calls"): `readdirSync`
 * of three small directories, as `opendirSync` (to stop at the first entry)
 * cost more on the event loop than reading them whole.
 */
function asMade(workDir: string): boolean {
  const made = (d: Dirent) => (d.name === MARKER ? d.isFile() : MADE_DIRS.has(d.name) && d.isDirectory());
  return (
    readdirSync(path.join(workDir, INPUTS)).length === 0 &&
    readdirSync(path.join(workDir, OUTPUTS)).length === 0 &&
    readdirSync(workDir, { withFileTypes: true }).every(made)
  );
}

/** A Failed outcome with no output, for executions that never produced one. */
export function failedOutcome(executionId: string, error: string): Omit<MessageBody<"result">, "files"> {
  return {
    executionId,
    state: "Failed",
    exitCode: -1,
    error,
    stdout: "",
    stderr: "",
    stdoutTruncated: false,
    stderrTruncated: false,
  };
}

function describeFailure(err: unknown): string {
  if (err instanceof Error && "code" in err && typeof err.code === "string")
    return `${err.code}: ${err.message}`;
  return err instanceof Error ? err.message : String(err);
}
