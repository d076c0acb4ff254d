/**
 * A worker thread of the WASM engine's pool. It announces `{ ready: true }`
 * once loaded, then runs one execution per message: a fresh WASI preview1
 * instance and a fresh WebAssembly instance (new linear memory) of the
 * compiled module it is given (argv, env, preopens, stdio fds opened by the
 * parent), and answers `{ exitCode }` or `{ error }`. Nothing of one execution
 * survives into the next: a module reaches the outside only through its own
 * WASI object's imports. The parent kills the worker (`worker.terminate()`) on
 * timeout or cancel and starts another in its place.
 *
 * A terminated thread stops only when it is back in JavaScript: node:wasi's
 * poll_oneoff sleeps in native code, so a module asleep for an hour outlived
 * its timeout and cancel by that hour, holding its worker and its node's
 * capacity. A sleep on the realtime or monotonic clock is therefore waited
 * out here with Atomics.wait, which a terminate interrupts at once.
 */

export interface WasmWorkerData {
  module: WebAssembly.Module;
  args: string[];
  env: Record<string, string>;
  preopens: Record<string, string>;
  stdin: number;
  stdout: number;
  stderr: number;
  entrypoint: string;
  maxMemoryBytes: number;
}

export type WasmWorkerMessage = { exitCode: number } | { error: string; trap: boolean };

/** What a pool worker posts: ready once, then one outcome per execution. */
export type WasmWorkerReply = { ready: true } | WasmWorkerMessage;

/**
 * The worker's program. The pool starts it as the source text of this
 * function (`eval`) without the parent's `execArgv`, so a worker never loads
 * a TypeScript loader (about a second of CPU per thread in tests and
 * benchmarks run from source): it must not use anything from module scope.
 *
 * After each execution it closes every descriptor that execution's WASI
 * opened: node:wasi never closes the preopened directories nor what the
 * module left open, not even when the thread exits, so each execution would
 * otherwise leak at least two descriptors from the process.
 */
export function wasmWorkerMain(): void {
  const { WASI } = require("node:wasi") as typeof import("node:wasi");
  const { parentPort, workerData } = require("node:worker_threads") as typeof import("node:worker_threads");
  type WasiSyscalls = Record<string, (...args: number[]) => number>;
  /** WASI's "no error" and "not supported", and the first descriptor after stdio (where the preopens start). */
  const ESUCCESS = 0;
  const ENOTSUP = 58;
  const FIRST_FD = 3;
  /** The syscalls that give the module a new descriptor. */
  const OPENING = new Set(["path_open", "sock_accept"]);

  const EINVAL = 28;
  /** poll_oneoff's structures (WASI preview1): a subscription and an event, and their fields used here. */
  const SUBSCRIPTION_SIZE = 48;
  const EVENT_SIZE = 32;
  const EVENTTYPE_CLOCK = 0;
  const CLOCK_REALTIME = 0;
  const CLOCK_MONOTONIC = 1;
  const SUBCLOCKFLAGS_ABSTIME = 1;
  const sleeper = new Int32Array(new SharedArrayBuffer(4));

  /**
   * poll_oneoff when every subscription is a clock on the realtime or monotonic
   * clock (a sleep): waits until the first one is due, then reports each one due
   * by then. Anything else (descriptors, CPU-time clocks, memory out of bounds)
   * is left to node:wasi: undefined.
   */
  const sleep = (
    memory: WebAssembly.Memory,
    subscriptions: number,
    events: number,
    count: number,
    written: number,
  ): number | undefined => {
    const view = new DataView(memory.buffer);
    const fits = (at: number, size: number) => at >= 0 && at + size <= view.byteLength;
    if (count === 0) return EINVAL;
    if (
      !fits(subscriptions, count * SUBSCRIPTION_SIZE) ||
      !fits(events, count * EVENT_SIZE) ||
      !fits(written, 4)
    )
      return undefined;
    const start = process.hrtime.bigint();
    const due: bigint[] = [];
    for (let i = 0; i < count; i++) {
      const at = subscriptions + i * SUBSCRIPTION_SIZE;
      const clock = view.getUint32(at + 16, true);
      if (
        view.getUint8(at + 8) !== EVENTTYPE_CLOCK ||
        (clock !== CLOCK_REALTIME && clock !== CLOCK_MONOTONIC)
      )
        return undefined;
      const timeout = view.getBigUint64(at + 24, true);
      if ((view.getUint16(at + 40, true) & SUBCLOCKFLAGS_ABSTIME) === 0) {
        due.push(start + timeout);
      } else {
        // The monotonic clock is node:wasi's (uv_hrtime, as process.hrtime); realtime is the wall clock.
        const now =
          clock === CLOCK_MONOTONIC
            ? start
            : BigInt(Math.round((performance.timeOrigin + performance.now()) * 1e6));
        due.push(start + (timeout > now ? timeout - now : 0n));
      }
    }
    let first = due[0]!;
    for (const d of due) if (d < first) first = d;
    for (let left = first - start; left > 0n; left = first - process.hrtime.bigint()) {
      Atomics.wait(sleeper, 0, 0, Number(left) / 1e6);
    }
    const now = process.hrtime.bigint();
    let n = 0;
    for (let i = 0; i < count; i++) {
      if (due[i]! > now) continue;
      const event = events + n++ * EVENT_SIZE;
      new Uint8Array(memory.buffer, event, EVENT_SIZE).fill(0);
      view.setBigUint64(event, view.getBigUint64(subscriptions + i * SUBSCRIPTION_SIZE, true), true);
      view.setUint8(event + 10, EVENTTYPE_CLOCK);
    }
    view.setUint32(written, n, true);
    return ESUCCESS;
  };

  const execute = (
    wasi: InstanceType<typeof WASI>,
    syscalls: WasiSyscalls,
    data: WasmWorkerData,
    onStart: (memory: WebAssembly.Memory) => void,
  ): WasmWorkerMessage => {
    let instance: WebAssembly.Instance;
    try {
      instance = new WebAssembly.Instance(data.module, { wasi_snapshot_preview1: syscalls });
    } catch (err) {
      return { error: `cannot instantiate the module: ${(err as Error).message}`, trap: false };
    }
    const { memory } = instance.exports;
    if (!(memory instanceof WebAssembly.Memory))
      return { error: "the module exports no memory", trap: false };
    if (memory.buffer.byteLength > data.maxMemoryBytes) {
      return {
        error: `the module's memory (${memory.buffer.byteLength} bytes) is over the limit`,
        trap: false,
      };
    }
    const entry = instance.exports[data.entrypoint];
    if (typeof entry !== "function")
      return { error: `the module exports no function ${data.entrypoint}`, trap: false };
    try {
      onStart(memory);
      // wasi.start() insists on `_start`; a view with the chosen entrypoint as `_start` runs any export.
      return {
        exitCode: wasi.start({ exports: { memory, _start: entry } } as unknown as WebAssembly.Instance),
      };
    } catch (err) {
      return {
        error: `${(err as Error).name}: ${(err as Error).message}`,
        trap: err instanceof WebAssembly.RuntimeError,
      };
    }
  };

  const run = (data: WasmWorkerData): WasmWorkerMessage => {
    const wasi = new WASI({
      version: "preview1",
      args: data.args,
      env: data.env,
      preopens: data.preopens,
      stdin: data.stdin,
      stdout: data.stdout,
      stderr: data.stderr,
      returnOnExit: true,
    });
    const syscalls = wasi.wasiImport as WasiSyscalls;
    // WASI hands out the lowest free descriptor, so every one this execution
    // can hold is below FIRST_FD + preopens + successful opens.
    let opened = Object.keys(data.preopens).length;
    // Every import is a plain JS function around WASI's own: V8 instantiates a module
    // whose imports are native API functions about five times slower (0.25 against
    // 0.05 ms for a three-import module here), and a wrapper costs a JS call per syscall.
    const counted: WasiSyscalls = {};
    for (const name in syscalls) {
      const call = syscalls[name]!;
      counted[name] = OPENING.has(name)
        ? (...args) => {
            const errno = call(...args);
            if (errno === ESUCCESS) opened++;
            return errno;
          }
        : (...args) => call(...args);
    }
    // Descriptors 0–2 are the parent's (its stdin and stream spools, reused by the
    // next execution), and node:wasi acts on the host descriptor behind them: a close
    // would make the parent close a number the process may have reused for something
    // else, and clearing O_APPEND would leave the next execution writing at whatever
    // offset this one left. A module's close of one is a no-op; renumbering onto or
    // from one and changing its flags are refused.
    const fdClose = syscalls.fd_close!;
    const fdRenumber = syscalls.fd_renumber!;
    const fdSetFlags = syscalls.fd_fdstat_set_flags!;
    counted.fd_close = (fd) => (fd < FIRST_FD ? ESUCCESS : fdClose(fd));
    counted.fd_renumber = (from, to) => (from < FIRST_FD || to < FIRST_FD ? ENOTSUP : fdRenumber(from, to));
    counted.fd_fdstat_set_flags = (fd, flags) => (fd < FIRST_FD ? ENOTSUP : fdSetFlags(fd, flags));
    let memory: WebAssembly.Memory | undefined;
    const pollOneoff = syscalls.poll_oneoff!;
    counted.poll_oneoff = (subscriptions, events, count, written) =>
      (memory && sleep(memory, subscriptions, events, count, written)) ??
      pollOneoff(subscriptions, events, count, written);
    let started = false;
    try {
      return execute(wasi, counted, data, (m) => {
        memory = m;
        started = true;
      });
    } finally {
      // fd_close needs a started WASI; one that never started gets an empty program.
      if (!started) {
        const empty = { exports: { memory: new WebAssembly.Memory({ initial: 0 }), _start() {} } };
        wasi.start(empty as unknown as WebAssembly.Instance);
      }
      for (let fd = FIRST_FD; fd < FIRST_FD + opened; fd++) syscalls.fd_close!(fd);
    }
  };

  const port = parentPort!;
  // Set by the parent when it sends an execution, cleared here once its outcome is known.
  const executing = new Int32Array(workerData as SharedArrayBuffer);
  port.on("message", (data: WasmWorkerData) => {
    const outcome = run(data);
    Atomics.store(executing, 0, 0);
    port.postMessage(outcome satisfies WasmWorkerReply);
  });
  port.postMessage({ ready: true } satisfies WasmWorkerReply);
}
