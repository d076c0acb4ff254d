import { execFile } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import type { Test } from "tap";
import { type EngineRunRequest, WasmExecutor } from "../../compute/engines/index.js";
import { parseJobSpec, type Task } from "../../core/index.js";

export const MiB = 1024 * 1024;
export const repo = path.resolve(import.meta.dirname, "../..");
export const FD_WRITE = `(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))`;
export const PROC_EXIT = `(import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))`;
export const LOOP = `(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))`;

/** WASM test fixtures in a temp dir removed at the end of the test file. */
export async function wasmFixtures(t: Test) {
  const root = await mkdtemp(path.join(os.tmpdir(), "shoal-wasm-"));
  t.teardown(() => rm(root, { recursive: true, force: true }));
  let n = 0;
  return {
    /** Compiles WAT text (or a .wat file) with wabt's wat2wasm, as scripts/build-wasm does. */
    async wat(source: string): Promise<Buffer> {
      const file = source.endsWith(".wat") ? source : path.join(root, `m${n++}.wat`);
      if (file !== source) await writeFile(file, source);
      const out = path.join(root, `m${n++}.wasm`);
      await promisify(execFile)("wat2wasm", [file, "-o", out]);
      return readFile(out);
    },
    /** A request with fresh work, inputs and outputs directories. */
    async request(task: Task, over: Partial<EngineRunRequest> = {}): Promise<EngineRunRequest> {
      const workDir = path.join(root, `exec-${n++}`);
      await mkdir(path.join(workDir, "inputs"), { recursive: true });
      await mkdir(path.join(workDir, "outputs"), { recursive: true });
      return {
        executionId: `e${n}`,
        task,
        workDir,
        inputsDir: path.join(workDir, "inputs"),
        outputsDir: path.join(workDir, "outputs"),
        timeoutMs: 20_000,
        limits: { maxMemoryBytes: 16 * MiB, maxStdoutBytes: MiB, maxStderrBytes: MiB },
        ...over,
      };
    },
  };
}

/** A validated wasm task running `module` inline. */
export function wasmTask(
  module: Buffer,
  params: Record<string, unknown> = {},
  extra: Record<string, unknown> = {},
): Task {
  return parseJobSpec({
    Name: "t",
    Tasks: [
      {
        Name: "main",
        Engine: {
          Type: "wasm",
          Params: {
            EntryModule: { Type: "inline", Params: { Content: module.toString("base64") } },
            ...params,
          },
        },
        ...extra,
      },
    ],
  }).Tasks[0]!;
}

/**
 * The fixtures plus a default {@link WasmExecutor} closed at the end of the
 * test file, and a signal that never aborts: what the WASM engine tests share.
 */
export async function wasmHarness(t: Test) {
  const fx = await wasmFixtures(t);
  const wasm = new WasmExecutor();
  t.teardown(() => wasm.close());
  return { wat: fx.wat, request: fx.request, task: wasmTask, wasm, never: new AbortController().signal };
}
