import { ENGINE_CODES, EngineError } from "./errors.js";

/** Bytes in one WebAssembly page. */
export const WASM_PAGE_BYTES = 65_536;

const SECTION_IMPORT = 2;
const SECTION_MEMORY = 5;

interface Limits {
  flags: number;
  min: number;
  max: number | undefined;
}

/** A cursor over the module bytes; every read checks bounds so a malformed module is an error, not a crash. */
class Reader {
  constructor(
    readonly bytes: Uint8Array,
    public pos: number,
    readonly end: number,
  ) {}

  byte(): number {
    if (this.pos >= this.end) throw new RangeError("unexpected end of section");
    return this.bytes[this.pos++]!;
  }

  /** Unsigned LEB128, up to 2^53. */
  u(): number {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      const b = this.byte();
      result += (b & 0x7f) * scale;
      if ((b & 0x80) === 0) return result;
      scale *= 128;
    }
    throw new RangeError("LEB128 number too long");
  }

  skip(n: number): void {
    if (n > this.end - this.pos) throw new RangeError("unexpected end of section");
    this.pos += n;
  }

  name(): string {
    const length = this.u();
    const start = this.pos;
    this.skip(length);
    return Buffer.from(this.bytes.subarray(start, start + length)).toString("utf8");
  }

  limits(): Limits {
    const flags = this.byte();
    const min = this.u();
    const max = flags & 0x01 ? this.u() : undefined;
    return { flags, min, max };
  }
}

function leb(n: number): number[] {
  const out: number[] = [];
  let v = n;
  do {
    let b = v % 128;
    v = Math.floor(v / 128);
    if (v > 0) b |= 0x80;
    out.push(b);
  } while (v > 0);
  return out;
}

function invalid(message: string, cause?: unknown): EngineError {
  return new EngineError(ENGINE_CODES.SHOAL_ENGINE_MODULE_INVALID, `invalid WebAssembly module: ${message}`, {
    cause,
    fix: "build the module for wasm32-wasi (WASI preview1) and submit its .wasm file",
  });
}

/**
 * Caps a module's memory at `maxBytes`: refuses a module whose memory starts
 * larger than the cap, imports its memory, or uses 64-bit memory, and rewrites
 * the memory section so that its declared maximum is at most the cap. The
 * engine then enforces the cap itself (`memory.grow` fails past it) instead of
 * trusting the module, because worker `resourceLimits` do not cover
 * WebAssembly memory. Returns the (possibly rewritten) bytes.
 *
 * @throws EngineError SHOAL_ENGINE_MODULE_INVALID or SHOAL_ENGINE_MEMORY_LIMIT
 */
export function capModuleMemory(bytes: Uint8Array, maxBytes: number): Uint8Array {
  const capPages = Math.floor(maxBytes / WASM_PAGE_BYTES);
  try {
    let pos = 8;
    while (pos < bytes.length) {
      const head = new Reader(bytes, pos, bytes.length);
      const id = head.byte();
      const size = head.u();
      const start = head.pos;
      const end = start + size;
      if (end > bytes.length) throw new RangeError("section runs past the end of the module");
      const r = new Reader(bytes, start, end);
      if (id === SECTION_IMPORT) checkImports(r);
      if (id === SECTION_MEMORY) {
        const memories = Array.from({ length: r.u() }, () => r.limits());
        for (const m of memories) {
          if (m.flags & 0x04) throw invalid("64-bit memories are not supported");
          if (m.min > capPages) {
            throw new EngineError(
              ENGINE_CODES.SHOAL_ENGINE_MEMORY_LIMIT,
              `the module's memory starts at ${m.min} pages (${m.min * WASM_PAGE_BYTES} bytes); the limit is ${capPages} pages (${maxBytes} bytes)`,
              { fix: "raise the task's Resources.Memory, or build the module with a smaller initial memory" },
            );
          }
        }
        if (memories.every((m) => m.max !== undefined && m.max <= capPages)) return bytes;
        const body = [...leb(memories.length)];
        for (const m of memories) {
          body.push(m.flags | 0x01, ...leb(m.min), ...leb(Math.min(m.max ?? capPages, capPages)));
        }
        const section = Uint8Array.from([SECTION_MEMORY, ...leb(body.length), ...body]);
        const out = new Uint8Array(pos + section.length + (bytes.length - end));
        out.set(bytes.subarray(0, pos), 0);
        out.set(section, pos);
        out.set(bytes.subarray(end), pos + section.length);
        return out;
      }
      pos = end;
    }
    return bytes;
  } catch (err) {
    if (err instanceof EngineError) throw err;
    throw invalid((err as Error).message, err);
  }
}

function checkImports(r: Reader): void {
  const count = r.u();
  for (let i = 0; i < count; i++) {
    const moduleName = r.name();
    const field = r.name();
    const kind = r.byte();
    if (kind === 0x02)
      throw invalid(`it imports its memory (${moduleName}.${field}); a WASI module defines its own`);
    if (moduleName !== "wasi_snapshot_preview1") {
      throw invalid(`it imports ${moduleName}.${field}; only wasi_snapshot_preview1 is provided`);
    }
    if (kind === 0x00) r.u();
    else if (kind === 0x01) {
      r.byte();
      r.limits();
    } else if (kind === 0x03) r.skip(2);
    else throw invalid(`unsupported import kind ${kind}`);
  }
}
