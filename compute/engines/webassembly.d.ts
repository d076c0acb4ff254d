// The part of the WebAssembly JS API the wasm engine uses. Node has it as a
// global, but @types/node 20 does not declare it and this project does not
// load the DOM lib (which would). Shapes follow the WebAssembly JS API spec.
declare namespace WebAssembly {
  type ImportExportKind = "function" | "global" | "memory" | "table" | "tag";
  interface ModuleExportDescriptor {
    kind: ImportExportKind;
    name: string;
  }
  type ImportValue = unknown;
  type Imports = Record<string, Record<string, ImportValue>>;
  type Exports = Record<string, unknown>;
  class Module {
    constructor(bytes: BufferSource);
    static exports(module: Module): ModuleExportDescriptor[];
  }
  class Instance {
    constructor(module: Module, imports?: Imports);
    readonly exports: Exports;
  }
  class Memory {
    constructor(descriptor: { initial: number; maximum?: number });
    readonly buffer: ArrayBuffer;
    grow(delta: number): number;
  }
  class RuntimeError extends Error {}
  class CompileError extends Error {}
  type BufferSource = ArrayBufferView | ArrayBuffer;
  function compile(bytes: BufferSource): Promise<Module>;
}
