import { EventEmitter } from "node:events";
import { promises as fs } from "node:fs";
import path from "node:path";
import { MAX_OUTPUT_STREAM_BYTES, modifiedTimes } from "../core/index.js";

/** One line of an execution's output, as `GET .../logs` streams it (NDJSON). */
export interface LogEntry {
  Time: number;
  ExecutionID: string;
  Stream: "stdout" | "stderr";
  Seq: number;
  /** The bytes as UTF-8 text. */
  Data: string;
}

/**
 * Execution logs, kept in `DATA-DIR/logs/<job>.ndjson` for later and fanned
 * out live to followers (`job logs --follow`) as they arrive.
 */
export class LogStore {
  readonly #dir: string;
  readonly #emitter = new EventEmitter();
  /** Appends per job are chained so lines keep their order. */
  readonly #tails = new Map<string, Promise<void>>();
  readonly #maxStreamBytes: number;
  /** Bytes stored per `<execution>/<stream>`, against `maxStreamBytes`. */
  readonly #stored = new Map<string, number>();
  /**
   * The highest `Seq` taken per execution: a node numbers its lines in the order it
   * sends them, so one at or below it is a repeat (a result resent with its last lines).
   */
  readonly #lastSeq = new Map<string, number>();

  /**
   * `maxStreamBytes`: most bytes of one execution's stdout, and of its
   * stderr, stored; a node keeps and streams no more ({@link MAX_OUTPUT_STREAM_BYTES}),
   * so lines past it come from a node that ignores its limits and are dropped.
   */
  constructor(dataDir: string, maxStreamBytes = MAX_OUTPUT_STREAM_BYTES) {
    this.#dir = path.join(dataDir, "logs");
    this.#emitter.setMaxListeners(0);
    this.#maxStreamBytes = maxStreamBytes;
  }

  async init(): Promise<void> {
    await fs.mkdir(this.#dir, { recursive: true, mode: 0o700 });
  }

  /**
   * Stores and fans out a line. Past the stream's cap nothing is kept: the
   * first line dropped resolves to "capped", the later ones to "dropped". A line
   * numbered at or below one already taken of its execution is a repeat: not stored.
   */
  async append(jobId: string, entry: LogEntry): Promise<"stored" | "capped" | "dropped" | "repeated"> {
    if (entry.Seq <= (this.#lastSeq.get(entry.ExecutionID) ?? -1)) return "repeated";
    this.#lastSeq.set(entry.ExecutionID, entry.Seq);
    const key = `${entry.ExecutionID}/${entry.Stream}`;
    const before = this.#stored.get(key) ?? 0;
    const stored = before + Buffer.byteLength(entry.Data);
    if (stored > this.#maxStreamBytes) {
      this.#stored.set(key, Number.POSITIVE_INFINITY);
      return before === Number.POSITIVE_INFINITY ? "dropped" : "capped";
    }
    this.#stored.set(key, stored);
    this.#emitter.emit(jobId, entry);
    const prev = this.#tails.get(jobId) ?? Promise.resolve();
    const next = prev.then(() =>
      fs.appendFile(this.#file(jobId), `${JSON.stringify(entry)}\n`, { mode: 0o600 }),
    );
    const settled = next.catch(() => {});
    this.#tails.set(jobId, settled);
    void settled.then(() => {
      if (this.#tails.get(jobId) === settled) this.#tails.delete(jobId);
    });
    await next;
    return "stored";
  }

  /** Every stored line of the job, oldest first. */
  async read(jobId: string): Promise<LogEntry[]> {
    await this.#tails.get(jobId);
    const text = await fs.readFile(this.#file(jobId), "utf8").catch(() => "");
    return text
      .split("\n")
      .filter((l) => l.length > 0)
      .map((l) => JSON.parse(l) as LogEntry);
  }

  /** The jobs with stored lines, each with when its lines were last written (ms since the epoch). */
  async jobs(): Promise<Map<string, number>> {
    const names = (await fs.readdir(this.#dir)).filter((n) => n.endsWith(".ndjson"));
    const times = await modifiedTimes(this.#dir, names);
    return new Map([...times].map(([n, at]) => [n.slice(0, -".ndjson".length), at]));
  }

  /** Removes the job's stored lines (after any append under way) and what was counted of its executions'. */
  async remove(jobId: string, executionIds: readonly string[] = []): Promise<void> {
    for (const id of executionIds) {
      this.#lastSeq.delete(id);
      for (const stream of ["stdout", "stderr"]) this.#stored.delete(`${id}/${stream}`);
    }
    await this.#tails.get(jobId);
    await fs.rm(this.#file(jobId), { force: true });
  }

  /** Calls `listener` for each new line of the job; returns the unsubscribe function. */
  follow(jobId: string, listener: (entry: LogEntry) => void): () => void {
    this.#emitter.on(jobId, listener);
    return () => this.#emitter.off(jobId, listener);
  }

  #file(jobId: string): string {
    return path.join(this.#dir, `${jobId}.ndjson`);
  }
}
