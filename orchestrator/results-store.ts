import { createHash, randomBytes } from "node:crypto";
import { createReadStream, promises as fs } from "node:fs";
import path from "node:path";
import { Readable } from "node:stream";
import type { ReadableStream } from "node:stream/web";
import type { JetStreamManager } from "@nats-io/jetstream";
import type { ObjectStore } from "@nats-io/obj";
import { FileWriteError, MAX_RESULT_TOTAL_BYTES, modifiedTimes } from "../core/index.js";
import type { MessageBody } from "../fabric/protocol.js";
import type { ExecutionRecord, ResultFile } from "./records.js";
import { objectChunks, objectInfo, purgeObject } from "./stored-objects.js";

/** The object store a cluster's orchestrators keep every result file in (`OBJ_shoal-results`). */
export const RESULTS_BUCKET = "shoal-results";

/** Largest single result chunk accepted (the node's chunks are far smaller). */
export const MAX_CHUNK_BYTES = 4 * 1024 * 1024;

/** A cluster's object store, of result files or modules (written through `objects`, read through `jsm`). */
export interface SharedObjects {
  objects: ObjectStore;
  jsm: JetStreamManager;
}

/** Why a result manifest was not stored; sent back in result-reply `reason`. */
export class ResultRejected extends Error {}

/**
 * A result this orchestrator cannot store for a reason of its own (a full
 * disk, say), not the node's: no reply is sent, so the node keeps the result
 * and sends it again later, where a {@link ResultRejected} counts against it.
 */
export class ResultNotStored extends Error {}

const SEGMENT = /^[A-Za-z0-9._-]+$/;

/** True for a relative result path that cannot leave its directory. */
export function isSafeResultName(name: string): boolean {
  if (name.length === 0 || name.length > 255) return false;
  return name.split("/").every((s) => SEGMENT.test(s) && s !== "." && s !== "..");
}

function sha256(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** Accepts `sha256:HEX` or bare hex, as nodes may send either. */
function bareDigest(d: string): string {
  return d.startsWith("sha256:") ? d.slice(7) : d;
}

/**
 * Result files under `DATA-DIR/results/<job>/<execution>/`. Chunks are staged
 * on disk as they arrive (each checked against its own digest); the manifest
 * then names, per file, the digests of its chunks in order and of the whole
 * file. A file is stored only if every chunk is present and matches and the
 * assembled file matches too; the execution's directory appears by one rename,
 * so a crash leaves either all its files or none.
 *
 * In a cluster the verified files are also put in the replicated object store
 * {@link RESULTS_BUCKET} (`<job>/<execution>/<name>`) before the commit
 * resolves, so any orchestrator serves them, and they outlive the disk of the
 * one that stored them. Reads try the local copy first.
 */
export class ResultsStore {
  readonly #root: string;
  readonly #staging: string;

  readonly #shared: SharedObjects | undefined;
  readonly #maxStagedBytes: number;
  readonly #shortfall: (() => Promise<string | undefined>) | undefined;
  /** Per execution, the bytes staged and each chunk's size (by its file), so a resent chunk counts once. */
  readonly #staged = new Map<string, { bytes: number; sizes: Map<string, number> }>();
  /** Per execution, why staging one of its chunks failed here, until its manifest comes. */
  readonly #unstaged = new Map<string, Error>();

  /**
   * `maxStagedBytes`: most bytes of chunks staged for one execution, so a node
   * that never sends its manifest cannot fill this disk (default: a node's
   * own cap on its results, {@link MAX_RESULT_TOTAL_BYTES}, and a chunk).
   * `shortfall`: what room is missing on this disk (DiskSpace), if any; while
   * something is, chunks are not staged, as if they could not be written.
   */
  constructor(
    dataDir: string,
    shared?: SharedObjects,
    {
      maxStagedBytes = MAX_RESULT_TOTAL_BYTES + MAX_CHUNK_BYTES,
      shortfall,
    }: { maxStagedBytes?: number; shortfall?: () => Promise<string | undefined> } = {},
  ) {
    this.#root = path.join(dataDir, "results");
    this.#staging = path.join(this.#root, ".staging");
    this.#shared = shared;
    this.#maxStagedBytes = maxStagedBytes;
    this.#shortfall = shortfall;
  }

  /** Chunks staged before a restart are dropped: a node resends a whole result whose manifest failed. */
  async init(): Promise<void> {
    await fs.rm(this.#staging, { recursive: true, force: true });
    await fs.mkdir(this.#staging, { recursive: true, mode: 0o700 });
  }

  /**
   * Stages one chunk after checking its digest; returns false (and keeps
   * nothing) for a bad one, or one past the execution's staging cap. One that
   * cannot be written (a full disk, or less room than `shortfall` wants) leaves
   * nothing either, throws, and makes the execution's next {@link commit}
   * throw {@link ResultNotStored}.
   */
  async stageChunk(chunk: MessageBody<"result-chunk">): Promise<boolean> {
    if (!isSafeResultName(chunk.file)) return false;
    const short = await this.#shortfall?.();
    if (short !== undefined)
      this.#unstage(chunk.executionId, new Error(`no room for result files: ${short}`));
    const data = Buffer.from(chunk.data, "base64");
    if (data.length > MAX_CHUNK_BYTES || sha256(data) !== bareDigest(chunk.sha256)) return false;
    const target = this.#chunkPath(chunk.executionId, chunk.file, chunk.index);
    const staged = this.#staged.get(chunk.executionId) ?? { bytes: 0, sizes: new Map<string, number>() };
    const bytes = staged.bytes - (staged.sizes.get(target) ?? 0) + data.length;
    if (bytes > this.#maxStagedBytes) return false;
    staged.bytes = bytes;
    staged.sizes.set(target, data.length);
    this.#staged.set(chunk.executionId, staged);
    const dir = this.#stagingDir(chunk.executionId);
    try {
      await fs.mkdir(dir, { recursive: true, mode: 0o700 });
      await fs.writeFile(target, data, { mode: 0o600 });
    } catch (err) {
      // A part written before the failure would fill the disk and fail the manifest as a bad chunk.
      await fs.rm(target, { force: true }).catch(() => {});
      staged.bytes -= data.length;
      staged.sizes.delete(target);
      this.#unstage(chunk.executionId, new FileWriteError(target, err));
    }
    return true;
  }

  /** Records why a chunk of the execution was not staged, for its manifest ({@link commit}), and throws it. */
  #unstage(executionId: string, failure: Error): never {
    this.#unstaged.set(executionId, failure);
    throw failure;
  }

  /**
   * Assembles and verifies the files of a manifest, then moves them into
   * place. Throws {@link ResultRejected} naming the first problem. Storing the
   * same execution twice (a node resending after a lost acknowledgement) keeps
   * the first copy.
   */
  async commit(jobId: string, manifest: MessageBody<"result">): Promise<ResultFile[]> {
    const unstaged = this.#unstaged.get(manifest.executionId);
    if (unstaged) {
      // The node sends every chunk again with its next attempt.
      this.#unstaged.delete(manifest.executionId);
      throw new ResultNotStored(`a chunk could not be staged: ${unstaged.message}`);
    }
    const finalDir = this.executionDir(jobId, manifest.executionId);
    const files: ResultFile[] = manifest.files.map((f) => ({ name: f.name, size: f.size, sha256: f.sha256 }));
    if (await exists(finalDir)) {
      await this.#share(jobId, manifest.executionId, files);
      return files;
    }
    const tmpDir = `${finalDir}.${randomBytes(6).toString("hex")}.tmp`;
    try {
      await fs.mkdir(tmpDir, { recursive: true, mode: 0o700 });
      for (const f of manifest.files) {
        if (!isSafeResultName(f.name))
          throw new ResultRejected(`unsafe result file name ${JSON.stringify(f.name)}`);
        const hash = createHash("sha256");
        const target = path.join(tmpDir, f.name);
        await fs.mkdir(path.dirname(target), { recursive: true, mode: 0o700 });
        const out = await fs.open(target, "w", 0o600);
        let size = 0;
        try {
          for (const [index, digest] of f.chunks.entries()) {
            const data = await fs
              .readFile(this.#chunkPath(manifest.executionId, f.name, index))
              .catch(() => undefined);
            if (!data) throw new ResultRejected(`${f.name}: chunk ${index} missing`);
            if (sha256(data) !== bareDigest(digest)) {
              throw new ResultRejected(`${f.name}: chunk ${index} does not match its digest`);
            }
            hash.update(data);
            size += data.length;
            await out.write(data);
          }
          await out.sync();
        } finally {
          await out.close();
        }
        if (size !== f.size) throw new ResultRejected(`${f.name}: ${size} bytes, manifest says ${f.size}`);
        if (hash.digest("hex") !== bareDigest(f.sha256)) {
          throw new ResultRejected(`${f.name}: file does not match its digest`);
        }
      }
      await fs.mkdir(path.dirname(finalDir), { recursive: true, mode: 0o700 });
      await fs.rename(tmpDir, finalDir);
    } catch (err) {
      await fs.rm(tmpDir, { recursive: true, force: true });
      if (err instanceof ResultRejected) throw err;
      throw new ResultNotStored(`cannot store the result files: ${(err as Error).message}`, { cause: err });
    }
    await this.discardStaged(manifest.executionId);
    await this.#share(jobId, manifest.executionId, files);
    return files;
  }

  /** Puts the stored files in the cluster's object store, unless they are there already (a resend). */
  async #share(jobId: string, executionId: string, files: readonly ResultFile[]): Promise<void> {
    const shared = this.#shared?.objects;
    if (!shared) return;
    for (const f of files) {
      const name = sharedName(jobId, executionId, f.name);
      const info = await shared.info(name);
      if (info && !info.deleted && info.size === f.size) continue;
      const local = createReadStream(path.join(this.executionDir(jobId, executionId), f.name));
      await shared.put({ name }, Readable.toWeb(local) as ReadableStream<Uint8Array>);
    }
  }

  async discardStaged(executionId: string): Promise<void> {
    this.#staged.delete(executionId);
    this.#unstaged.delete(executionId);
    await fs.rm(this.#stagingDir(executionId), { recursive: true, force: true });
  }

  executionDir(jobId: string, executionId: string): string {
    return path.join(this.#root, jobId, executionId);
  }

  /** A stored result file, or undefined. */
  async open(
    jobId: string,
    executionId: string,
    file: ResultFile,
  ): Promise<{ size: number; stream: Readable } | undefined> {
    if (!isSafeResultName(file.name)) return undefined;
    const local = path.join(this.executionDir(jobId, executionId), file.name);
    const st = await fs.stat(local).catch(() => undefined);
    if (st?.isFile()) return { size: st.size, stream: createReadStream(local) };
    // Stored by another orchestrator of the cluster (or this disk lost it): the object store's copy.
    if (!this.#shared) return undefined;
    const info = await objectInfo(
      this.#shared.jsm,
      RESULTS_BUCKET,
      sharedName(jobId, executionId, file.name),
    );
    if (!info || info.deleted) return undefined;
    const expected = { size: file.size, sha256: bareDigest(file.sha256) };
    return { size: info.size, stream: Readable.from(objectChunks(this.#shared.jsm, info, expected)) };
  }

  /** The jobs with result files on this disk, each with when its directory last changed (ms since the epoch). */
  async jobs(): Promise<Map<string, number>> {
    const entries = await fs.readdir(this.#root, { withFileTypes: true });
    const names = entries.filter((e) => e.isDirectory() && !e.name.startsWith(".")).map((e) => e.name);
    return modifiedTimes(this.#root, names);
  }

  /** Removes the job's result files from this disk. */
  async removeLocal(jobId: string): Promise<void> {
    // The id names a directory directly under results/ (never .staging, never a path).
    if (!SEGMENT.test(jobId) || jobId.startsWith(".")) return;
    await fs.rm(path.join(this.#root, jobId), { recursive: true, force: true });
  }

  /**
   * Removes the result files of the job's executions from the cluster's
   * object store, by purging their chunks and description, so no delete
   * marker stays behind.
   */
  async removeShared(jobId: string, executions: readonly ExecutionRecord[]): Promise<void> {
    const jsm = this.#shared?.jsm;
    if (!jsm) return;
    for (const e of executions) {
      for (const f of e.Results ?? [])
        await purgeObject(jsm, RESULTS_BUCKET, sharedName(jobId, e.ID, f.name));
    }
  }

  #stagingDir(executionId: string): string {
    return path.join(this.#staging, executionId);
  }

  #chunkPath(executionId: string, file: string, index: number): string {
    return path.join(this.#stagingDir(executionId), `${sha256(Buffer.from(file)).slice(0, 32)}.${index}`);
  }
}

function sharedName(jobId: string, executionId: string, name: string): string {
  return `${jobId}/${executionId}/${name}`;
}

async function exists(p: string): Promise<boolean> {
  return fs.stat(p).then(
    () => true,
    () => false,
  );
}
