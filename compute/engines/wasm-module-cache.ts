import { createHash } from "node:crypto";
import { ENGINE_CODES, EngineError } from "./errors.js";
import { capModuleMemory, WASM_PAGE_BYTES } from "./wasm-module.js";

/** Compiled modules kept. @default 32 */
export const DEFAULT_WASM_CACHED_MODULES = 32;
/** Source bytes of the kept modules, in total. @default 64 MiB */
export const DEFAULT_WASM_CACHED_BYTES = 64 * 1024 * 1024;

export interface WasmModuleCacheOptions {
  /** @default DEFAULT_WASM_CACHED_MODULES */
  maxModules?: number;
  /** @default DEFAULT_WASM_CACHED_BYTES */
  maxBytes?: number;
}

interface Entry {
  module: Promise<WebAssembly.Module>;
  bytes: number;
}

/**
 * Compiled WebAssembly modules by the SHA-256 of their bytes and the memory
 * cap they were compiled under (the cap rewrites the module, see
 * capModuleMemory), least recently used first out. A compiled module is
 * immutable code: every execution still gets its own instance, memory and
 * WASI, so sharing it across jobs shares nothing mutable. Concurrent requests
 * for the same module share one compilation; a module that fails to compile
 * is not kept.
 */
export class WasmModuleCache {
  readonly #maxModules: number;
  readonly #maxBytes: number;
  readonly #entries = new Map<string, Entry>();
  #bytes = 0;

  constructor(o: WasmModuleCacheOptions = {}) {
    this.#maxModules = o.maxModules ?? DEFAULT_WASM_CACHED_MODULES;
    this.#maxBytes = o.maxBytes ?? DEFAULT_WASM_CACHED_BYTES;
  }

  get size(): number {
    return this.#entries.size;
  }

  /**
   * The module compiled with its memory capped at `maxMemoryBytes`, checked
   * to export `memory` and the function `entrypoint`.
   *
   * @throws EngineError SHOAL_ENGINE_MODULE_INVALID or SHOAL_ENGINE_MEMORY_LIMIT
   */
  async get(bytes: Uint8Array, maxMemoryBytes: number, entrypoint: string): Promise<WebAssembly.Module> {
    const pages = Math.floor(maxMemoryBytes / WASM_PAGE_BYTES);
    const key = `${createHash("sha256").update(bytes).digest("hex")}/${pages}`;
    let entry = this.#entries.get(key);
    if (entry) {
      this.#entries.delete(key); // most recently used goes last
      this.#entries.set(key, entry);
    } else {
      const module = compile(capModuleMemory(bytes, maxMemoryBytes));
      entry = { module, bytes: bytes.length };
      this.#entries.set(key, entry);
      this.#bytes += entry.bytes;
      const added = entry;
      module.catch(() => this.#forget(key, added));
      this.#evict();
    }
    const module = await entry.module;
    checkExports(module, entrypoint);
    return module;
  }

  #forget(key: string, entry: Entry): void {
    if (this.#entries.get(key) !== entry) return;
    this.#entries.delete(key);
    this.#bytes -= entry.bytes;
  }

  #evict(): void {
    for (const [key, entry] of this.#entries) {
      if (this.#entries.size <= this.#maxModules && this.#bytes <= this.#maxBytes) return;
      if (this.#entries.size === 1) return; // one module larger than the budget still runs
      this.#forget(key, entry);
    }
  }
}

async function compile(bytes: Uint8Array): Promise<WebAssembly.Module> {
  try {
    return await WebAssembly.compile(bytes);
  } catch (err) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_ENGINE_MODULE_INVALID,
      `invalid WebAssembly module: ${(err as Error).message}`,
      { cause: err },
    );
  }
}

function checkExports(module: WebAssembly.Module, entrypoint: string): void {
  const exports = WebAssembly.Module.exports(module);
  const missing = [
    exports.some((e) => e.name === "memory" && e.kind === "memory") ? undefined : "memory",
    exports.some((e) => e.name === entrypoint && e.kind === "function")
      ? undefined
      : `function ${entrypoint}`,
  ].filter(Boolean);
  if (missing.length > 0) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_ENGINE_MODULE_INVALID,
      `invalid WebAssembly module: it does not export ${missing.join(" or ")}`,
      {
        fix: "build a WASI command module, or set Engine.Params.Entrypoint to one of its exported functions",
      },
    );
  }
}
