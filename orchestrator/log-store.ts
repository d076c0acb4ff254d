import { EventEmitter } from "node:events";
import { closeSync, promises as fs, openSync, writeFileSync } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import path from "node:path";
import { MAX_OUTPUT_STREAM_BYTES, writeFileAtomic } from "../core/index.js";

/** One line of an execution's output, as `GET .../logs` streams it (NDJSON). */
export interface LogEntry {
  Time: number;
  ExecutionID: string;
  Stream: "stdout" | "stderr";
  Seq: number;
  /** The bytes as UTF-8 text. */
  Data: string;
}

/** Jobs whose counts (see {@link LogStore}) are kept in memory; others are worked out again from their lines. */
export const COUNTED_JOBS = 1000;

/** A segment takes no more lines past this size; the next line starts a new one. */
export const SEGMENT_BYTES = 64 * 1024 * 1024;

/** Bytes read from a log file at a time. */
const READ_CHUNK_BYTES = 64 * 1024;

const NEWLINE = 0x0a;

/** `segment-<n>.ndjson`: lines of any jobs, each naming its job. */
const SEGMENT_NAME = /^segment-(\d{1,15})\.ndjson$/;
/** `segment-<n>.index`: where each line of a segment left is (see SegmentIndex). */
const INDEX_NAME = /^segment-(\d{1,15})\.index$/;
/** `<job>.ndjson`: one job's lines, as stores before segments kept them; moved into a segment at start. */
const LEGACY_SUFFIX = ".ndjson";
/** How a segment line starts: the job's id, as a JSON string. */
const JOB_PREFIX = /^\{"JobID":("(?:[^"\\]|\\.)*")/;

/** A stored line; undefined for an empty or torn one (see {@link LogStore}). */
function parseLine(text: string): LogEntry | undefined {
  try {
    return text.length > 0 ? (JSON.parse(text) as LogEntry) : undefined;
  } catch {
    return undefined;
  }
}

/** The job a segment line names; undefined for a torn one. */
function jobOf(text: string): string | undefined {
  const quoted = JOB_PREFIX.exec(text)?.[1];
  if (quoted === undefined) return undefined;
  try {
    const id: unknown = JSON.parse(quoted);
    return typeof id === "string" ? id : undefined;
  } catch {
    return undefined;
  }
}

/** The line (without its newline) that records the removal of a job's lines. */
const removal = (jobId: string) => JSON.stringify({ JobID: jobId, Removed: true });

/** A segment line's entry, without the job's id it carries; undefined for a torn one. */
function parseSegmentLine(text: string): LogEntry | undefined {
  const line = parseLine(text) as (LogEntry & { JobID?: unknown; Removed?: unknown }) | undefined;
  if (!line || line.Removed !== undefined) return undefined;
  const { JobID: _job, ...entry } = line;
  return entry;
}

/**
 * The complete lines of `file` from byte `offset` to `end`, each with where
 * it starts and the offset after it; a line not ended with a newline (still
 * being written, or torn) is left out.
 */
async function* linesOf(
  file: FileHandle,
  offset: number,
  end = Number.POSITIVE_INFINITY,
): AsyncGenerator<{ text: string; start: number; next: number }> {
  let position = offset;
  // The start of a line not ended in the chunks read so far.
  let parts: Buffer[] = [];
  let partStart = offset;
  while (position < end) {
    // A new buffer each time: the parts kept are views of the last ones.
    const want = Math.min(READ_CHUNK_BYTES, end - position);
    const chunk = Buffer.allocUnsafe(want);
    const { bytesRead } = await file.read(chunk, 0, want, position);
    if (bytesRead === 0) return;
    const read = chunk.subarray(0, bytesRead);
    let from = 0;
    for (let nl = read.indexOf(NEWLINE); nl >= 0; nl = read.indexOf(NEWLINE, from)) {
      const text =
        parts.length === 0
          ? read.toString("utf8", from, nl)
          : Buffer.concat([...parts, read.subarray(from, nl)]).toString("utf8");
      const start = parts.length === 0 ? position + from : partStart;
      parts = [];
      from = nl + 1;
      yield { text, start, next: position + from };
    }
    if (from < bytesRead) {
      if (parts.length === 0) partStart = position + from;
      parts.push(read.subarray(from));
    }
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
}

/** The counts of a job with no lines. */
const noCounts = (): Counts => ({ lastSeq: new Map(), bytes: new Map() });

/** Counts one stored line of a job. */
function countLine(counts: Counts, entry: LogEntry): void {
  counts.lastSeq.set(entry.ExecutionID, Math.max(entry.Seq, counts.lastSeq.get(entry.ExecutionID) ?? -1));
  const key = streamOf(entry);
  counts.bytes.set(key, (counts.bytes.get(key) ?? 0) + Buffer.byteLength(entry.Data));
}

/**
 * Where a job's stored lines are, in order: for each, its segment and its
 * bytes `[start, next)` there (the newline included), three numbers in one
 * array (an object per line cost ~150 bytes of heap).
 */
class Places {
  readonly #n: number[] = [];

  get length(): number {
    return this.#n.length / 3;
  }

  push(segment: number, start: number, next: number): void {
    this.#n.push(segment, start, next);
  }

  segment(i: number): number {
    return this.#n[3 * i]!;
  }

  start(i: number): number {
    return this.#n[3 * i + 1]!;
  }

  next(i: number): number {
    return this.#n[3 * i + 2]!;
  }
}

/** A line as it is written: its entry, its number among the job's lines, and its size. */
interface WrittenLine {
  entry: LogEntry;
  index: number;
  bytes: number;
}

/** A segment's lines in order, as its index keeps them: `[job, start, next]` for a line, `[job]` for a removal. */
type IndexRecord = [string, number, number] | [string];

/** A segment's index: its records, for a segment of `size` bytes. */
interface SegmentIndex {
  size: number;
  records: IndexRecord[];
}

/** Closes the segment's reader, if open (a later read opens it again); never fails. */
async function closeReader(segment: Segment): Promise<void> {
  const reader = segment.reader;
  segment.reader = undefined;
  await reader?.then((r) => r.close()).catch(() => {});
}

/** The records of a segment file, read through. */
async function recordsOf(file: string): Promise<IndexRecord[]> {
  const records: IndexRecord[] = [];
  const handle = await fs.open(file, "r");
  try {
    for await (const { text, start, next } of linesOf(handle, 0)) {
      const jobId = jobOf(text);
      if (jobId !== undefined) records.push(text === removal(jobId) ? [jobId] : [jobId, start, next]);
    }
  } finally {
    await handle.close();
  }
  return records;
}

/** A segment's index when it is there, whole, and made for the segment as it is (`size`); else undefined. */
async function readIndex(file: string, size: number): Promise<IndexRecord[] | undefined> {
  try {
    const index = JSON.parse(await fs.readFile(file, "utf8")) as SegmentIndex;
    return index.size === size && Array.isArray(index.records) ? index.records : undefined;
  } catch {
    return undefined;
  }
}

/** A segment file: the jobs with lines in it, and whether it holds a removal's record. */
interface Segment {
  file: string;
  live: Set<string>;
  removals: boolean;
  /** Open for reading while it is read from; closed when the segment is deleted. */
  reader?: Promise<FileHandle>;
}

/**
 * Most bytes of lines a follower holds in memory while it has not taken
 * them; past it, it reads them from the segments instead, when it gets to them.
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
      this.#bytes += line.bytes;
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
        this.#bytes -= line.bytes;
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
 * Execution logs, kept in `DATA-DIR/logs/segment-<n>.ndjson`: append-only
 * files that take the lines of every job, each line naming its job
 * (`{"JobID":...}` then the entry's fields), one segment after another of up
 * to {@link SEGMENT_BYTES}. Where each job's lines are is kept in memory, and
 * found again at start from each segment's index (`segment-<n>.index`, written
 * once the segment is left), or by reading through a segment that has none
 * matching it (the last one of a process that crashed). A file per job cost a
 * new inode per job, which ext4 without a journal allocates by passing over
 * every inode freed in the last minute or so: 11% of all CPU in bench:jobs'
 * sustained phase, and more the more jobs were removed.
 *
 * Readers read a job's lines from the segments; followers take new lines
 * from memory while they keep up and from the segments when they fall behind.
 * Neither holds more than {@link FOLLOWER_QUEUE_BYTES} of a job's output in
 * memory, nor gets further ahead than its client takes.
 *
 * A removed job's lines stay in their segments, which are deleted once no
 * job with lines there is left; a removal is recorded with a line of its own
 * (`"Removed":true`), so a restart does not find the job again. A segment
 * holding such a record goes only when every older segment has gone.
 *
 * Each line is checked against the job's counts: a line numbered at or below
 * one taken of its execution is a repeat (a result resent with its last
 * lines), and each execution's stdout and stderr are capped. The counts are
 * worked out from the job's lines when it is first written to (after a
 * restart, too) and kept for the {@link COUNTED_JOBS} jobs written to last.
 *
 * A write that fails (a full disk) may leave part of a line at the end of its
 * segment: the next line starts a new segment, and the torn one is never read.
 * Lines are written with synchronous calls (docs/compute.md, "Small
 * file-system calls"); a new segment is created once per SEGMENT_BYTES.
 */
export class LogStore {
  readonly #dir: string;
  /** Emits each line written ({@link WrittenLine}) under its job's id. */
  readonly #written = new EventEmitter();
  /** Appends per job are chained so lines keep their order and are checked one at a time. */
  readonly #tails = new Map<string, Promise<void>>();
  readonly #maxStreamBytes: number;
  readonly #countedJobs: number;
  readonly #segmentBytes: number;
  /** Counts of the jobs written to last, least recent first. */
  readonly #counts = new Map<string, Counts>();
  /** Every stored line of each job, in order, and when the job's lines were last written (ms). */
  readonly #jobs = new Map<string, { places: Places; lastWrite: number }>();
  /** The segments, oldest first. */
  readonly #segments = new Map<number, Segment>();
  /** The segment lines are appended to, while it takes them: its number, descriptor and size. */
  #active: { segment: number; fd: number; size: number } | undefined;
  #nextSegment = 1;
  /** The index writes under way (see #index). */
  #indexing: Promise<void> = Promise.resolve();
  /** The sweep under way, if any (see #sweep). */
  #sweeping: Promise<void> = Promise.resolve();

  /**
   * `maxStreamBytes`: most bytes of one execution's stdout, and of its
   * stderr, stored; a node keeps and streams no more ({@link MAX_OUTPUT_STREAM_BYTES}),
   * so lines past it come from a node that ignores its limits and are dropped.
   */
  constructor(
    dataDir: string,
    maxStreamBytes = MAX_OUTPUT_STREAM_BYTES,
    countedJobs = COUNTED_JOBS,
    segmentBytes = SEGMENT_BYTES,
  ) {
    this.#dir = path.join(dataDir, "logs");
    this.#written.setMaxListeners(0);
    this.#maxStreamBytes = maxStreamBytes;
    this.#countedJobs = countedJobs;
    this.#segmentBytes = segmentBytes;
  }

  /**
   * Finds the lines of every job in the segments (from each one's index, or
   * by reading it through when it has none yet), and moves the files of
   * stores before segments (`<job>.ndjson`) into a new one. Segments no job
   * has lines in any more are deleted, and so are temporary files of index
   * writes a crash interrupted.
   */
  async init(): Promise<void> {
    await fs.mkdir(this.#dir, { recursive: true, mode: 0o700 });
    const names = await fs.readdir(this.#dir);
    const numbered = names
      .map((name) => ({ name, n: Number(SEGMENT_NAME.exec(name)?.[1] ?? Number.NaN) }))
      .filter(({ n }) => Number.isSafeInteger(n))
      .sort((a, b) => a.n - b.n);
    for (const { n } of numbered) await this.#load(n);
    this.#nextSegment = (numbered.at(-1)?.n ?? 0) + 1;
    const segments = new Set(numbered.map(({ n }) => n));
    for (const name of names) {
      const indexOf = Number(INDEX_NAME.exec(name)?.[1] ?? Number.NaN);
      const stray =
        (name.startsWith(".") && name.endsWith(".tmp")) ||
        (Number.isSafeInteger(indexOf) && !segments.has(indexOf));
      if (stray) await fs.rm(path.join(this.#dir, name), { force: true });
      else if (name.endsWith(LEGACY_SUFFIX) && !SEGMENT_NAME.test(name)) {
        await this.#migrate(name.slice(0, -LEGACY_SUFFIX.length), path.join(this.#dir, name));
      }
    }
    await this.#sweep();
  }

  /**
   * One segment's lines and removals, from its index when that matches it,
   * else read through (the segment a stopped process appended to last): its
   * index is then written, as nothing is appended to it again.
   */
  async #load(n: number): Promise<void> {
    const file = this.#segmentFile(n);
    const { size, mtimeMs } = await fs.stat(file);
    let records = await readIndex(this.#indexFile(n), size);
    if (!records) {
      records = await recordsOf(file);
      this.#index(n, { size, records });
    }
    const segment: Segment = { file, live: new Set(), removals: false };
    this.#segments.set(n, segment);
    for (const [jobId, start, next] of records) {
      if (start === undefined || next === undefined) {
        this.#forget(jobId);
        segment.removals = true;
        continue;
      }
      const job = this.#job(jobId);
      job.places.push(n, start, next);
      job.lastWrite = Math.max(job.lastWrite, mtimeMs);
      segment.live.add(jobId);
    }
  }

  /**
   * Writes a segment's index (records read from it when not given), after
   * the ones under way. Never fails: a segment without an index is read
   * through at the next start instead.
   */
  #index(n: number, index?: SegmentIndex): void {
    const file = this.#segmentFile(n);
    this.#indexing = this.#indexing.then(async () => {
      try {
        const made = index ?? { size: (await fs.stat(file)).size, records: await recordsOf(file) };
        await writeFileAtomic(this.#indexFile(n), JSON.stringify(made), 0o600, { fsync: false });
      } catch {
        // Read through at the next start.
      }
    });
  }

  /**
   * Moves a job's file from before segments into the active segment, then
   * deletes it. A line the segments hold already (a start that a crash cut
   * short moved it) is not moved again: the store these files come from took
   * each execution's lines in the order of their numbers.
   */
  async #migrate(jobId: string, file: string): Promise<void> {
    const counts = await this.#countsOf(jobId);
    const handle = await fs.open(file, "r");
    try {
      for await (const { text } of linesOf(handle, 0)) {
        const entry = parseLine(text);
        if (!entry || entry.Seq <= (counts.lastSeq.get(entry.ExecutionID) ?? -1)) continue;
        this.#write(jobId, entry);
        countLine(counts, entry);
      }
    } finally {
      await handle.close();
    }
    await fs.rm(file, { force: true });
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
    const after = before + Buffer.byteLength(entry.Data);
    if (after > this.#maxStreamBytes) {
      counts.lastSeq.set(entry.ExecutionID, entry.Seq);
      counts.bytes.set(key, Number.POSITIVE_INFINITY);
      return before === Number.POSITIVE_INFINITY ? "dropped" : "capped";
    }
    // Not counted unless stored: the line may come again, in a resent result.
    const written = this.#write(jobId, entry);
    counts.lastSeq.set(entry.ExecutionID, entry.Seq);
    counts.bytes.set(key, after);
    this.#written.emit(jobId, written satisfies WrittenLine);
    return "stored";
  }

  /**
   * Appends the job's line to the active segment (a new one when there is
   * none, or it is full) and records where it is. A failed write leaves the
   * segment: the line is not stored, and the next starts a new segment.
   */
  #write(jobId: string, entry: LogEntry): WrittenLine {
    const { segment, start, bytes } = this.#append(`${JSON.stringify({ JobID: jobId, ...entry })}\n`);
    const job = this.#job(jobId);
    job.places.push(segment, start, start + bytes);
    job.lastWrite = Date.now();
    this.#segments.get(segment)!.live.add(jobId);
    return { entry, index: job.places.length - 1, bytes };
  }

  /** The job's places and last write, made empty when it has none yet. */
  #job(jobId: string): { places: Places; lastWrite: number } {
    let job = this.#jobs.get(jobId);
    if (!job) {
      job = { places: new Places(), lastWrite: 0 };
      this.#jobs.set(jobId, job);
    }
    return job;
  }

  /**
   * Appends `text` to the active segment and returns where it went. A line
   * the segment has no room left for starts a new one (`roll`; a removal's
   * record always goes in the active segment), and so does a write that fails.
   */
  #append(text: string, roll = true): { segment: number; start: number; bytes: number } {
    const bytes = Buffer.byteLength(text);
    const active = this.#activeFor(roll ? bytes : 0);
    try {
      writeFileSync(active.fd, text);
    } catch (err) {
      this.#leaveActive();
      throw err;
    }
    const start = active.size;
    active.size += bytes;
    return { segment: active.segment, start, bytes };
  }

  /** The active segment, with room for `bytes` more unless it is empty. */
  #activeFor(bytes: number): { segment: number; fd: number; size: number } {
    if (this.#active && this.#active.size > 0 && this.#active.size + bytes > this.#segmentBytes) {
      this.#leaveActive();
      void this.#sweep(); // never fails
    }
    if (!this.#active) {
      const segment = this.#nextSegment++;
      const file = this.#segmentFile(segment);
      const fd = openSync(file, "a", 0o600);
      this.#segments.set(segment, { file, live: new Set(), removals: false });
      this.#active = { segment, fd, size: 0 };
    }
    return this.#active;
  }

  /** Stops appending to the active segment; the next line starts a new one. */
  #leaveActive(): void {
    if (!this.#active) return;
    closeSync(this.#active.fd);
    this.#index(this.#active.segment);
    this.#active = undefined;
  }

  /** The job's counts: kept ones (now the most recent), else worked out from its lines. */
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
    for await (const entry of this.#read(jobId, 0)) countLine(counts, entry);
    return counts;
  }

  /**
   * The job's lines from its `from`-th, oldest first, as the caller takes
   * them: lines next to each other in a segment are read together.
   */
  async *#read(jobId: string, from: number): AsyncGenerator<LogEntry> {
    const places = this.#jobs.get(jobId)?.places;
    if (!places) return;
    for (let i = from; i < places.length; ) {
      const segment = places.segment(i);
      const start = places.start(i);
      let last = i;
      while (
        last + 1 < places.length &&
        places.segment(last + 1) === segment &&
        places.start(last + 1) === places.next(last) &&
        places.next(last + 1) - start <= READ_CHUNK_BYTES
      )
        last++;
      const reader = await this.#reader(segment);
      // The job was removed while it was read, and its segment deleted.
      if (!reader) return;
      for await (const { text } of linesOf(reader, start, places.next(last))) {
        const entry = parseSegmentLine(text);
        if (entry) yield entry;
      }
      i = last + 1;
    }
  }

  async #reader(n: number): Promise<FileHandle | undefined> {
    const segment = this.#segments.get(n);
    if (!segment) return undefined;
    segment.reader ??= fs.open(segment.file, "r");
    return segment.reader;
  }

  /** Every stored line of the job, oldest first, read as the caller takes them. */
  async *lines(jobId: string): AsyncGenerator<LogEntry> {
    await this.#tails.get(jobId);
    yield* this.#read(jobId, 0);
  }

  /**
   * The job's stored lines and then each new one as it is written, until
   * `ended` is aborted (the job is final): the lines appended before that are
   * read too, then the iteration ends. It ends at once when `cancelled` is
   * aborted. Reads no further ahead than the caller takes.
   */
  async *follow(jobId: string, ended: AbortSignal, cancelled?: AbortSignal): AsyncGenerator<LogEntry> {
    let taken = 0;
    while (!cancelled?.aborted) {
      // Listening before reading: a line written during the read is not missed.
      const written = new WrittenLines(this.#written, jobId, [ended, ...(cancelled ? [cancelled] : [])]);
      try {
        const last = ended.aborted;
        if (last) await this.#tails.get(jobId);
        const stored = this.#jobs.get(jobId)?.places.length ?? 0;
        if (taken < stored) {
          for await (const entry of this.#read(jobId, taken)) {
            taken++;
            yield entry;
            if (taken === stored) break;
          }
        }
        if (last) return;
        // Caught up with the segments: the lines written from now on come from memory,
        // until the follower falls behind (then from the segments again) or the end.
        for (;;) {
          const line = await written.next();
          if (typeof line === "string") break;
          if (line.index < taken) continue; // read already
          if (line.index !== taken) break; // a line between: read it from its segment
          taken++;
          yield line.entry;
        }
      } finally {
        written.close();
      }
    }
  }

  /** The jobs with stored lines, each with when its lines were last written (ms since the epoch). */
  async jobs(): Promise<Map<string, number>> {
    return new Map([...this.#jobs].map(([id, job]) => [id, job.lastWrite]));
  }

  /**
   * Removes the job's stored lines (after any append under way) and its
   * counts: recorded in the active segment, and the segments no job has
   * lines in any more deleted.
   */
  async remove(jobId: string): Promise<void> {
    await this.#tails.get(jobId);
    this.#counts.delete(jobId);
    if (!this.#jobs.has(jobId)) return;
    const { segment } = this.#append(`${removal(jobId)}\n`, false);
    this.#segments.get(segment)!.removals = true;
    this.#forget(jobId);
    await this.#sweep();
  }

  /** Drops the job's places, and its name from the segments it had lines in. */
  #forget(jobId: string): void {
    const places = this.#jobs.get(jobId)?.places;
    for (let i = 0; i < (places?.length ?? 0); i++)
      this.#segments.get(places!.segment(i))?.live.delete(jobId);
    this.#jobs.delete(jobId);
  }

  /**
   * Deletes the segments (but the active one) that no job has lines in, a
   * segment recording removals only once every older one has gone (it keeps
   * their lines from being found again).
   */
  #sweep(): Promise<void> {
    this.#sweeping = this.#sweeping.then(() => this.#sweepOnce());
    return this.#sweeping;
  }

  /** One sweep (they run one at a time); never fails: a segment that cannot be deleted is kept, and tried again. */
  async #sweepOnce(): Promise<void> {
    // An index being written is not left behind by its segment's deletion.
    await this.#indexing;
    let oldest = true;
    for (const [n, segment] of [...this.#segments]) {
      const done = n !== this.#active?.segment && segment.live.size === 0 && (oldest || !segment.removals);
      if (done) {
        await closeReader(segment);
        // The index first: an index without its segment is never read.
        const deleted = await fs
          .rm(this.#indexFile(n), { force: true })
          .then(() => fs.rm(segment.file, { force: true }))
          .then(
            () => true,
            () => false,
          );
        if (deleted) {
          this.#segments.delete(n);
          continue;
        }
      }
      oldest = false;
    }
  }

  /** Closes the files once every append made so far is written (or failed); a later append opens a new segment. */
  async close(): Promise<void> {
    await Promise.all(this.#tails.values());
    await this.#sweeping;
    this.#leaveActive();
    await this.#indexing;
    await Promise.all([...this.#segments.values()].map(closeReader));
  }

  #segmentFile(n: number): string {
    return path.join(this.#dir, `segment-${n}.ndjson`);
  }

  #indexFile(n: number): string {
    return path.join(this.#dir, `segment-${n}.index`);
  }
}
