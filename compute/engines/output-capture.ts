import { performance } from "node:perf_hooks";
import type { EngineRunResult } from "./executor.js";

/** What a program wrote on one stream: the first bytes kept, and whether more was dropped. */
export interface CapturedOutput {
  data: Buffer;
  truncated: boolean;
  /** Everything the program wrote, kept or not. */
  totalBytes: number;
}

/**
 * Keeps the first `cap` bytes of a stream and passes each kept chunk to
 * `onChunk` as it arrives; bytes past the cap are counted and dropped.
 */
export class OutputCapture {
  readonly #cap: number;
  readonly #onChunk: ((chunk: Buffer) => void) | undefined;
  readonly #chunks: Buffer[] = [];
  #kept = 0;
  #total = 0;

  constructor(cap: number, onChunk?: (chunk: Buffer) => void) {
    this.#cap = cap;
    this.#onChunk = onChunk;
  }

  push(chunk: Buffer): void {
    this.#total += chunk.length;
    const room = this.#cap - this.#kept;
    if (room <= 0 || chunk.length === 0) return;
    const kept = chunk.length > room ? Buffer.from(chunk.subarray(0, room)) : chunk;
    this.#chunks.push(kept);
    this.#kept += kept.length;
    this.#onChunk?.(kept);
  }

  result(): CapturedOutput {
    return {
      data: Buffer.concat(this.#chunks),
      truncated: this.#total > this.#kept,
      totalBytes: this.#total,
    };
  }
}

/**
 * The streams and duration of a finished run, as an {@link EngineRunResult}
 * carries them (every engine reports the same way). `started` is a
 * `performance.now()` reading.
 */
export function capturedStreams(
  stdout: OutputCapture,
  stderr: OutputCapture,
  started: number,
): Pick<EngineRunResult, "stdout" | "stdoutTruncated" | "stderr" | "stderrTruncated" | "durationMs"> {
  const out = stdout.result();
  const err = stderr.result();
  return {
    stdout: out.data,
    stdoutTruncated: out.truncated,
    stderr: err.data,
    stderrTruncated: err.truncated,
    durationMs: Math.round(performance.now() - started),
  };
}
