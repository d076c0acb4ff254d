import { EventEmitter } from "node:events";
import { closeSync, promises as fs, open as openCallback, openSync, writeFileSync } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
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

/** Jobs whose counts (see {@link LogStore}) are kept in memory; others are read again from their file when needed. */
export const COUNTED_JOBS = 1000;

/** Bytes read from a log file at a time. */
const READ_CHUNK_BYTES = 64 * 1024;

const NEWLINE = 0x0a;

const openFd = promisify(openCallback);

/** A stored line; undefined for an empty or torn one (see {@link LogStore}). */
function parseLine(text: string): LogEntry | undefined {
  try {
    return text.length > 0 ? (JSON.parse(text) as LogEntry) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The complete lines of `file` from byte `offset`, each with the offset
 * after it; a line still being written is left for a later read.
 */
async function* linesOf(file: FileHandle, offset: number): AsyncGenerator<{ entry: LogEntry; next: number }> {
  let position = offset;
  // The start of a line not ended in the chunks read so far.
  let parts: Buffer[] = [];
  for (;;) {
    // A new buffer each time: the parts kept are views of the last ones.
    const chunk = Buffer.allocUnsafe(READ_CHUNK_BYTES);
    const { bytesRead } = await file.read(chunk, 0, READ_CHUNK_BYTES, position);
    if (bytesRead === 0) return;
    const read = chunk.subarray(0, bytesRead);
    let start = 0;
    for (let end = read.indexOf(NEWLINE); end >= 0; end = read.indexOf(NEWLINE, start)) {
      const text =
        parts.length === 0
          ? read.toString("utf8", start, end)
          : Buffer.concat([...parts, read.subarray(start, end)]).toString("utf8");
      parts = [];
      start = end + 1;
      const entry = parseLine(text);
      if (entry) yield { entry, next: position + start };
    }
    if (start < bytesRead) parts.push(read.subarray(start));
    position += bytesRead;
  }
}

/** The `<execution>/<stream>` a line belongs to, as {@link Counts} counts bytes. */
const streamOf = (entry: LogEntry) => `${entry.ExecutionID}/${entry.Stream}`;

/** What is counted of one job's stored lines: the repeat check and the per-stream caps use them. */
interface Counts {
  /** The highest `Seq` taken per execution. */
  lastSeq: Map<string, number>;
  /** Bytes stored per `<execution>/<stream>`; infinite once a line was dropped for the cap. */
  bytes: Map<string, number>;
  /** The size of the job's file. */
  size: number;
}

/** The counts of a job with no lines. */
const noCounts = (): Counts => ({ lastSeq: new Map(), bytes: new Map(), size: 0 });

/** A line as it is written: where it starts in the job's file, and the offset after it. */
interface WrittenLine {
  entry: LogEntry;
  start: number;
  next: number;
}

/**
 * Most bytes of lines a follower holds in memory while it has not taken
 * them; past it, it reads them from the file instead, when it gets to them.
 */
export const FOLLOWER_QUEUE_BYTES = 1024 * 1024;

/**
 * The lines of one job written while a follower listens, queued in memory
 * up to {@link FOLLOWER_QUEUE_BYTES}; `next()` also ends when a signal aborts.
 */
class WrittenLines {
  readonly #queue: WrittenLine[] = [];
  #head = 0;
  #bytes = 0;
  #overflow = false;
  #wake: () => void = () => {};
  readonly #close: () => void;
  readonly #signals: AbortSignal[];

  constructor(emitter: EventEmitter, jobId: string, signals: AbortSignal[]) {
    this.#signals = signals;
    const onLine = (line: WrittenLine) => {
      if (this.#overflow) return;
      this.#queue.push(line);
      this.#bytes += line.next - line.start;
      if (this.#bytes > FOLLOWER_QUEUE_BYTES) {
        this.#overflow = true;
        this.#queue.length = 0;
        this.#head = 0;
      }
      this.#wake();
    };
    const onAbort = () => this.#wake();
    emitter.on(jobId, onLine);
    for (const s of signals) s.addEventListener("abort", onAbort);
    this.#close = () => {
      emitter.off(jobId, onLine);
      for (const s of signals) s.removeEventListener("abort", onAbort);
    };
  }

  /** The next line written; "overflow" once more came than may be queued; "aborted" once a signal is. */
  async next(): Promise<WrittenLine | "overflow" | "aborted"> {
    for (;;) {
      if (this.#head < this.#queue.length) {
        const line = this.#queue[this.#head++]!;
        this.#bytes -= line.next - line.start;
        if (this.#head === this.#queue.length) {
          this.#queue.length = 0;
          this.#head = 0;
        }
        return line;
      }
      if (this.#overflow) return "overflow";
      if (this.#signals.some((s) => s.aborted)) return "aborted";
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
      });
    }
  }

  close(): void {
    this.#close();
  }
}

/**
 * Execution logs, kept in `DATA-DIR/logs/<job>.ndjson`. Readers stream the
 * file; followers take new lines from memory while they keep up and from the
 * file when they fall behind. Neither holds more than
 * {@link FOLLOWER_QUEUE_BYTES} of a job's output in memory, nor gets further
 * ahead than its client takes.
 *
 * Each line is checked against the job's counts: a line numbered at or below
 * one taken of its execution is a repeat (a result resent with its last
 * lines), and each execution's stdout and stderr are capped. The counts are
 * worked out from the job's file when it is first written to (after a
 * restart, too) and kept for the {@link COUNTED_JOBS} jobs written to last.
 */
export class LogStore {
  readonly #dir: string;
  /** Emits each line written ({@link WrittenLine}) under its job's id. */
  readonly #written = new EventEmitter();
  /** Appends per job are chained so lines keep their order and are checked one at a time. */
  readonly #tails = new Map<string, Promise<void>>();
  readonly #maxStreamBytes: number;
  readonly #countedJobs: number;
  /** Counts of the jobs written to last, least recent first. */
  readonly #counts = new Map<string, Counts>();
  /** Jobs whose file may end in part of a line (a write that failed, or a crash): the next line starts on a new one. */
  readonly #torn = new Set<string>();

  /**
   * `maxStreamBytes`: most bytes of one execution's stdout, and of its
   * stderr, stored; a node keeps and streams no more ({@link MAX_OUTPUT_STREAM_BYTES}),
   * so lines past it come from a node that ignores its limits and are dropped.
   */
  constructor(dataDir: string, maxStreamBytes = MAX_OUTPUT_STREAM_BYTES, countedJobs = COUNTED_JOBS) {
    this.#dir = path.join(dataDir, "logs");
    this.#written.setMaxListeners(0);
    this.#maxStreamBytes = maxStreamBytes;
    this.#countedJobs = countedJobs;
  }

  async init(): Promise<void> {
    await fs.mkdir(this.#dir, { recursive: true, mode: 0o700 });
  }

  /**
   * Stores a line. Past the stream's cap nothing is kept: the first line
   * dropped resolves to "capped", the later ones to "dropped". A line numbered
   * at or below one already taken of its execution is a repeat: not stored.
   */
  append(jobId: string, entry: LogEntry): Promise<"stored" | "capped" | "dropped" | "repeated"> {
    const next = (this.#tails.get(jobId) ?? Promise.resolve()).then(() => this.#store(jobId, entry));
    const settled = next.then(
      () => {},
      () => {},
    );
    this.#tails.set(jobId, settled);
    void settled.then(() => {
      if (this.#tails.get(jobId) === settled) this.#tails.delete(jobId);
    });
    return next;
  }

  async #store(jobId: string, entry: LogEntry): Promise<"stored" | "capped" | "dropped" | "repeated"> {
    const counts = await this.#countsOf(jobId);
    const lastSeq = counts.lastSeq.get(entry.ExecutionID) ?? -1;
    if (entry.Seq <= lastSeq) return "repeated";
    const key = streamOf(entry);
    const before = counts.bytes.get(key) ?? 0;
    counts.lastSeq.set(entry.ExecutionID, entry.Seq);
    const after = before + Buffer.byteLength(entry.Data);
    if (after > this.#maxStreamBytes) {
      counts.bytes.set(key, Number.POSITIVE_INFINITY);
      return before === Number.POSITIVE_INFINITY ? "dropped" : "capped";
    }
    counts.bytes.set(key, after);
    const torn = this.#torn.has(jobId);
    const text = `${torn ? "\n" : ""}${JSON.stringify(entry)}\n`;
    try {
      await this.#appendText(jobId, text, counts.size > 0);
      this.#torn.delete(jobId);
    } catch (err) {
      // Not stored, so not counted (the line may come again, in a resent result): the
      // counts are worked out again from the file, which may now end in part of it.
      this.#counts.delete(jobId);
      this.#torn.add(jobId);
      throw err;
    }
    const start = counts.size + (torn ? 1 : 0);
    counts.size += Buffer.byteLength(text);
    this.#written.emit(jobId, { entry, start, next: counts.size } satisfies WrittenLine);
    return "stored";
  }

  /**
   * Appends to the job's file: opened, written and closed synchronously when
   * it exists (`exists`: it has bytes), as each call takes a few microseconds
   * and its libuv round trip ten times that (docs/compute.md, "Small
   * file-system calls"); a new file is opened on a libuv thread, since
   * creating it may take the file system longer (ext4 without a journal
   * looks for a free inode past every one freed recently).
   */
  async #appendText(jobId: string, text: string, exists: boolean): Promise<void> {
    const file = this.#file(jobId);
    const fd = exists ? openSync(file, "a", 0o600) : await openFd(file, "a", 0o600);
    try {
      writeFileSync(fd, text);
    } finally {
      closeSync(fd);
    }
  }

  /**
   * Says the job was just created here: it has no lines, so its first one is
   * stored without looking for its file (one file-system call fewer per job).
   */
  created(jobId: string): void {
    if (!this.#counts.has(jobId)) this.#keep(jobId, noCounts());
  }

  /** The job's counts: kept ones (now the most recent), else worked out from its file. */
  async #countsOf(jobId: string): Promise<Counts> {
    const kept = this.#counts.get(jobId);
    this.#counts.delete(jobId);
    const counts = kept ?? (await this.#count(jobId));
    this.#keep(jobId, counts);
    return counts;
  }

  /** Keeps a job's counts as the most recent, letting the least recent go past the limit. */
  #keep(jobId: string, counts: Counts): void {
    this.#counts.set(jobId, counts);
    for (const [other] of this.#counts) {
      if (this.#counts.size <= this.#countedJobs) break;
      // A job with appends under way keeps its counts: they are in use.
      if (!this.#tails.has(other)) this.#counts.delete(other);
    }
  }

  async #count(jobId: string): Promise<Counts> {
    const counts = noCounts();
    // A job's first line: no file yet, nothing more to ask.
    const file = await this.#open(jobId);
    if (!file) return counts;
    try {
      let end = 0;
      for await (const { entry, next } of linesOf(file, 0)) {
        counts.lastSeq.set(
          entry.ExecutionID,
          Math.max(entry.Seq, counts.lastSeq.get(entry.ExecutionID) ?? -1),
        );
        const key = streamOf(entry);
        counts.bytes.set(key, (counts.bytes.get(key) ?? 0) + Buffer.byteLength(entry.Data));
        end = next;
      }
      // No append is under way (this runs in the job's chain): bytes past the last line are a torn one.
      counts.size = (await file.stat()).size;
      if (counts.size > end) this.#torn.add(jobId);
    } finally {
      await file.close();
    }
    return counts;
  }

  /** Every stored line of the job, oldest first, read from its file as the caller takes them. */
  async *lines(jobId: string): AsyncGenerator<LogEntry> {
    await this.#tails.get(jobId);
    const file = await this.#open(jobId);
    if (!file) return;
    try {
      for await (const { entry } of linesOf(file, 0)) yield entry;
    } finally {
      await file.close();
    }
  }

  /**
   * The job's stored lines and then each new one as it is written, until
   * `ended` is aborted (the job is final): the lines appended before that are
   * read too, then the iteration ends. It ends at once when `cancelled` is
   * aborted. Reads no further ahead than the caller takes.
   */
  async *follow(jobId: string, ended: AbortSignal, cancelled?: AbortSignal): AsyncGenerator<LogEntry> {
    let offset = 0;
    let file: FileHandle | undefined;
    try {
      while (!cancelled?.aborted) {
        // Listening before reading: a line written during the read is not missed.
        const written = new WrittenLines(this.#written, jobId, [ended, ...(cancelled ? [cancelled] : [])]);
        try {
          const last = ended.aborted;
          if (last) await this.#tails.get(jobId);
          file ??= await this.#open(jobId);
          if (file) {
            for await (const line of linesOf(file, offset)) {
              offset = line.next;
              yield line.entry;
            }
          }
          if (last) return;
          // Caught up with the file: the lines written from now on come from memory,
          // until the follower falls behind (then from the file again) or the end.
          for (;;) {
            const line = await written.next();
            if (typeof line === "string") break;
            if (line.next <= offset) continue; // read from the file already
            if (line.start !== offset) break; // a line between (a torn one): the file has it
            offset = line.next;
            yield line.entry;
          }
        } finally {
          written.close();
        }
      }
    } finally {
      await file?.close();
    }
  }

  /** The job's file, open for reading; undefined when it has no lines yet. */
  async #open(jobId: string): Promise<FileHandle | undefined> {
    return fs.open(this.#file(jobId), "r").catch((err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT") return undefined;
      throw err;
    });
  }

  /** The jobs with stored lines, each with when its lines were last written (ms since the epoch). */
  async jobs(): Promise<Map<string, number>> {
    const names = (await fs.readdir(this.#dir)).filter((n) => n.endsWith(".ndjson"));
    const times = await modifiedTimes(this.#dir, names);
    return new Map([...times].map(([n, at]) => [n.slice(0, -".ndjson".length), at]));
  }

  /** Removes the job's stored lines (after any append under way) and its counts. */
  async remove(jobId: string): Promise<void> {
    await this.#tails.get(jobId);
    this.#counts.delete(jobId);
    this.#torn.delete(jobId);
    await fs.rm(this.#file(jobId), { force: true });
  }

  /** Resolves when every append made so far is written (or failed). */
  async settled(): Promise<void> {
    await Promise.all(this.#tails.values());
  }

  #file(jobId: string): string {
    return path.join(this.#dir, `${jobId}.ndjson`);
  }
}
