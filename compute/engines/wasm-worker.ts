/**
 * The WASM engine's worker thread: instantiates one module with WASI
 * preview1 and runs its entrypoint. It gets everything in `workerData`
 * (the compiled module, argv, env, preopens, stdio fds opened by the parent)
 * and reports `{ exitCode }` or `{ error }` by message. The parent kills it
 * with `worker.terminate()` on timeout or cancel.
 */
import { WASI } from "node:wasi";
import { parentPort, workerData } from "node:worker_threads";

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

function run(data: WasmWorkerData): WasmWorkerMessage {
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
  let instance: WebAssembly.Instance;
  try {
    instance = new WebAssembly.Instance(data.module, wasi.getImportObject() as WebAssembly.Imports);
  } catch (err) {
    return { error: `cannot instantiate the module: ${(err as Error).message}`, trap: false };
  }
  const { memory } = instance.exports;
  if (!(memory instanceof WebAssembly.Memory)) return { error: "the module exports no memory", trap: false };
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
}

parentPort!.postMessage(run(workerData as WasmWorkerData));
