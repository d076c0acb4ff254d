import { Worker } from "node:worker_threads";
import { ENGINE_CODES, EngineError } from "./errors.js";
import {
  type WasmWorkerData,
  type WasmWorkerMessage,
  type WasmWorkerReply,
  wasmWorkerMain,
} from "./wasm-worker.js";

/** The worker's program as source text (see wasmWorkerMain). */
const WORKER_SOURCE = `(${wasmWorkerMain.toString()})();`;

/** Workers started ahead of demand and always kept ready. @default 2 */
export const DEFAULT_WASM_WARM_WORKERS = 2;
/** Idle workers beyond the warm ones are stopped after this long without work. @default 30 s */
export const DEFAULT_WASM_IDLE_MS = 30_000;
/** A worker is retired after this many executions, bounding whatever one could leave behind. @default 1000 */
export const DEFAULT_WASM_RUNS_PER_WORKER = 1000;
/**
 * How long an execution waits for a busy worker before the pool starts
 * another for it: about what starting one takes here (20–70 ms of wall time,
 * ~70 ms of CPU), so a busy worker that is done sooner serves it instead.
 * @default 25 ms
 */
export const DEFAULT_WASM_GROW_AFTER_MS = 25;

/** The JS heap of a worker; WebAssembly memory is capped separately (capModuleMemory). */
const RESOURCE_LIMITS = { maxOldGenerationSizeMb: 64, maxYoungGenerationSizeMb: 16, stackSizeMb: 4 };

export interface WasmWorkerPoolOptions {
  /** @default DEFAULT_WASM_WARM_WORKERS */
  warm?: number;
  /** @default DEFAULT_WASM_IDLE_MS */
  idleMs?: number;
  /** @default DEFAULT_WASM_RUNS_PER_WORKER */
  runsPerWorker?: number;
  /** @default DEFAULT_WASM_GROW_AFTER_MS */
  growAfterMs?: number;
}

/** A worker handed to a waiting execution; `started`: a new one started for it. */
interface Handed {
  worker: PooledWasmWorker;
  started: boolean;
}

/** An execution waiting for a worker: the first worker given back, or a new one after growAfterMs. */
interface Waiter {
  take(handed: Handed): void;
  refuse(err: Error): void;
  grow: NodeJS.Timeout;
}

/**
 * One worker thread of the pool. It runs one execution at a time; `kill()`
 * terminates it (the pool never hands it out again).
 */
export class PooledWasmWorker {
  readonly #worker: Worker;
  /** [0] is 1 from when an execution is sent until the worker knows its outcome (shared with the thread). */
  readonly #executing = new Int32Array(new SharedArrayBuffer(4));
  readonly ready: Promise<void>;
  #pending: { resolve: (m: WasmWorkerMessage) => void; reject: (e: Error) => void } | undefined;
  #dead: Error | undefined;
  runs = 0;
  idleSince = 0;

  constructor() {
    this.#worker = new Worker(WORKER_SOURCE, {
      eval: true,
      workerData: this.#executing.buffer,
      execArgv: [],
      stdout: true,
      stderr: true,
      resourceLimits: RESOURCE_LIMITS,
    });
    // The worker's own console (Node's WASI warning) is not a module's output.
    this.#worker.stdout.resume();
    this.#worker.stderr.resume();
    let markReady!: () => void;
    let failStart!: (err: Error) => void;
    this.ready = new Promise<void>((resolve, reject) => {
      markReady = resolve;
      failStart = reject;
    });
    this.ready.catch(() => {});
    this.#worker.on("message", (m: WasmWorkerReply) => {
      if ("ready" in m) {
        markReady();
        return;
      }
      const pending = this.#pending;
      this.#pending = undefined;
      pending?.resolve(m);
    });
    const die = (err: Error) => {
      this.#dead ??= err;
      failStart(this.#dead);
      const pending = this.#pending;
      this.#pending = undefined;
      pending?.reject(this.#dead);
    };
    this.#worker.on("error", die);
    this.#worker.on("exit", (code) => die(new Error(`the worker exited (code ${code})`)));
  }

  /** False once the worker died or was killed. */
  get alive(): boolean {
    return this.#dead === undefined;
  }

  /**
   * True while the outcome of an execution is known to the thread but not yet
   * read here: the worker is as good as given back, once this thread's event
   * loop gets to its answer.
   */
  get answered(): boolean {
    return this.#pending !== undefined && Atomics.load(this.#executing, 0) === 0;
  }

  /** Runs one execution; rejects if the worker dies (or is killed) before it answers. */
  run(data: WasmWorkerData): Promise<WasmWorkerMessage> {
    if (this.#dead) return Promise.reject(this.#dead);
    if (this.#pending) return Promise.reject(new Error("the worker is busy"));
    this.runs++;
    return new Promise((resolve, reject) => {
      this.#pending = { resolve, reject };
      Atomics.store(this.#executing, 0, 1);
      this.#worker.postMessage(data);
    });
  }

  kill(): Promise<void> {
    this.#dead ??= new Error("the worker was terminated");
    return this.#worker.terminate().then(() => {});
  }
}

/**
 * Warm worker threads for the WASM engine, so an execution does not pay for
 * starting a thread and loading the worker script (tens of milliseconds from
 * dist/, about a second under a TypeScript loader). `warm` workers are started
 * at once and replaced when one is killed. When every worker is busy, an
 * execution takes the first one given back, and only once it has waited
 * `growAfterMs` (and no busy worker has already answered, unread) is another
 * started for it: a burst of short executions is served by the workers there
 * are, where starting one per execution in the burst cost more CPU than the
 * executions. Workers beyond the warm ones are stopped again after `idleMs`
 * without work. Isolation is per execution, not per thread: each run gets a
 * fresh WASI and a fresh instance (see wasm-worker.ts), and a worker that was
 * killed, died or ran `runsPerWorker` executions is never reused.
 */
export class WasmWorkerPool {
  readonly #warm: number;
  readonly #idleMs: number;
  readonly #runsPerWorker: number;
  readonly #growAfterMs: number;
  readonly #idle: PooledWasmWorker[] = [];
  /** Workers handed out and not given back yet. */
  readonly #busy = new Set<PooledWasmWorker>();
  /** Executions waiting for a worker, longest first. */
  readonly #waiters: Waiter[] = [];
  #closed = false;
  #pruner: NodeJS.Timeout | undefined;

  constructor(o: WasmWorkerPoolOptions = {}) {
    this.#warm = o.warm ?? DEFAULT_WASM_WARM_WORKERS;
    this.#idleMs = o.idleMs ?? DEFAULT_WASM_IDLE_MS;
    this.#runsPerWorker = o.runsPerWorker ?? DEFAULT_WASM_RUNS_PER_WORKER;
    this.#growAfterMs = o.growAfterMs ?? DEFAULT_WASM_GROW_AFTER_MS;
  }

  /** Starts the warm workers and waits until they are loaded. */
  async start(): Promise<void> {
    this.#refill();
    await Promise.all(this.#idle.map((w) => w.ready.catch(() => {})));
    this.#pruner = setInterval(() => this.#prune(), Math.max(1000, this.#idleMs / 2));
    this.#pruner.unref();
  }

  /** Idle workers now (for tests and status). */
  get idle(): number {
    return this.#idle.length;
  }

  /** Workers now, idle and busy (for tests and status). */
  get size(): number {
    return this.#idle.length + this.#busy.size;
  }

  /**
   * A ready worker for one execution: an idle one, else the first one given
   * back, else (after growAfterMs) a new one. Give it back with {@link release}.
   */
  async acquire(): Promise<PooledWasmWorker> {
    for (;;) {
      if (this.#closed)
        throw new EngineError(ENGINE_CODES.SHOAL_ENGINE_CLOSED, "the WASM worker pool is closed");
      const idle = this.#idle.pop();
      const { worker, started } = idle ? { worker: idle, started: false } : await this.#wait();
      this.#busy.add(worker);
      try {
        await worker.ready;
      } catch (cause) {
        this.#busy.delete(worker);
        if (!started) continue;
        throw new EngineError(ENGINE_CODES.SHOAL_ENGINE_START_FAILED, "cannot start a WASM worker thread", {
          cause,
        });
      }
      if (worker.alive && !this.#closed) return worker;
      this.#busy.delete(worker);
    }
  }

  /** Takes a worker back: to the longest waiting execution or the idle ones if it is healthy, else dropped and replaced. */
  release(worker: PooledWasmWorker): void {
    this.#busy.delete(worker);
    if (this.#closed || !worker.alive || worker.runs >= this.#runsPerWorker) {
      void worker.kill();
      this.#refill();
      return;
    }
    worker.idleSince = Date.now();
    this.#idle.push(worker);
    this.#serve();
  }

  /** Stops every worker; busy ones are killed (their runs fail), waiting executions refused. */
  async close(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#pruner);
    for (const waiter of this.#waiters.splice(0)) {
      clearTimeout(waiter.grow);
      waiter.refuse(new EngineError(ENGINE_CODES.SHOAL_ENGINE_CLOSED, "the WASM worker pool is closed"));
    }
    const all = [...this.#idle.splice(0), ...this.#busy];
    this.#busy.clear();
    await Promise.all(all.map((w) => w.kill()));
  }

  /**
   * Waits for a worker given back, or starts a new one after growAfterMs. Not
   * while a busy worker has already answered: after this thread was busy for
   * longer than growAfterMs, the timers of the executions waiting meanwhile
   * fire before their answers are read, and each would start a thread that
   * the answers make unnecessary a moment later. Each answered worker counts
   * for one waiter, the longest waiting first.
   */
  #wait(): Promise<Handed> {
    return new Promise<Handed>((take, refuse) => {
      const grow = () => {
        let answered = 0;
        for (const w of this.#busy) if (w.answered) answered++;
        const index = this.#waiters.indexOf(waiter);
        if (index < answered) {
          waiter.grow = setTimeout(grow, this.#growAfterMs);
          return;
        }
        this.#waiters.splice(index, 1);
        take({ worker: new PooledWasmWorker(), started: true });
      };
      const waiter: Waiter = { take, refuse, grow: setTimeout(grow, this.#growAfterMs) };
      this.#waiters.push(waiter);
    });
  }

  /** Hands idle workers to waiting executions, longest waiting first. */
  #serve(): void {
    while (this.#waiters.length > 0 && this.#idle.length > 0) {
      const waiter = this.#waiters.shift()!;
      clearTimeout(waiter.grow);
      waiter.take({ worker: this.#idle.pop()!, started: false });
    }
  }

  #refill(): void {
    while (!this.#closed && this.#idle.length + this.#busy.size < this.#warm) {
      this.#idle.unshift(new PooledWasmWorker());
    }
    this.#serve();
  }

  /** Stops workers idle for longer than idleMs, down to the warm ones; the oldest idle go first. */
  #prune(): void {
    const cutoff = Date.now() - this.#idleMs;
    while (
      this.#idle.length + this.#busy.size > this.#warm &&
      (this.#idle[0]?.idleSince ?? Infinity) < cutoff
    ) {
      void this.#idle.shift()!.kill();
    }
  }
}
