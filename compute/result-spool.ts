import { createHash } from "node:crypto";
import { closeSync, promises as fs, ftruncateSync, openSync, renameSync, writeFileSync } from "node:fs";
import path from "node:path";
import { unlinkIfPresent, writeFileAtomic } from "../core/index.js";
import type { MessageBody } from "../fabric/index.js";
import { COMPUTE_CODES, ComputeError } from "./errors.js";

/** One chunk of a result file, with the hex SHA-256 of its bytes. */
export interface ResultChunk {
  sha256: string;
  data: Uint8Array;
}

/** A result file as the executor's result collector hands it over. */
export interface CollectedFile {
  name: string;
  size: number;
  /** Hex SHA-256 of the whole file. */
  sha256: string;
  chunks: readonly ResultChunk[];
}

/** A result kept on disk until the orchestrator acknowledges it. */
export interface SpooledResult {
  jobId: string;
  /** The `result` manifest exactly as it will be sent; `files[].chunks` are the chunk digests in order. */
  result: MessageBody<"result">;
  /** When the result was spooled (ms since the epoch). */
  spooledAt: number;
}

const MANIFEST_SUFFIX = ".json";
/** Spare manifests kept for reuse: about the results a busy node has unacknowledged at once. */
const MAX_SPARES = 64;
/** Where an entry kept its manifest before manifests moved up beside the chunk directories. */
const LEGACY_MANIFEST = "manifest.json";
const CHUNKS = "chunks";
const HEX_SHA256 = /^[0-9a-f]{64}$/;
/** Execution ids become directory names: no separators, no dot-only names. */
const SAFE_ID = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;

/** True for an execution id that is safe as a single directory name. */
export function isSafeExecutionId(id: string): boolean {
  return SAFE_ID.test(id) && id !== "." && id !== "..";
}

function manifestEntry(
  jobId: string,
  outcome: Omit<MessageBody<"result">, "files">,
  files: MessageBody<"result">["files"],
): SpooledResult {
  return { jobId, result: { ...outcome, files }, spooledAt: Date.now() };
}

function sha256Hex(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/**
 * Results waiting for the orchestrator's acknowledgement, under
 * `DATA-DIR/spool/`: an entry is its manifest `<executionId>.json`, written
 * atomically, and only when the result has files, the directory
 * `<executionId>/chunks/<sha256>` (content addressed) written before it. An
 * entry counts only once its manifest exists, so a crash half-way through
 * leaves nothing that is sent; such leftovers are swept by
 * {@link ResultSpool.list}. An entry is deleted only after the orchestrator
 * replied `stored: true`. Most results have no files: their entry is one file,
 * no directory to create and remove.
 *
 * A manifest taken out of the spool is kept as a spare (`.spare-N.tmp`, up to
 * MAX_SPARES) while there is room, and a later manifest is written over a
 * spare's bytes, in place, then renamed into place: no inode is created or
 * freed and no file is truncated to nothing per result. On this kind of disk
 * (ext4 without a journal) each of those costs: a new file's inode is looked
 * for past every inode freed in the last minute or so, and a file truncated to
 * nothing and written again is flushed when it is closed (`auto_da_alloc`). Spares
 * count as temporary files: a restart sweeps them. Writing over a spare and
 * the renames are synchronous calls: each takes a few microseconds, its
 * libuv round trip ten times that (docs/compute.md, "Small file-system calls").
 *
 * Nothing is fsynced: an entry survives a crash of the node's process (the
 * kernel holds the bytes before the result is sent), not necessarily a crash
 * of the machine. After one, an entry may be missing (the orchestrator then
 * learns at registration that the node does not hold the execution and
 * reschedules it, as JetStream KV, which does not fsync each write either,
 * would lose its own last writes), have an empty manifest (removed, same
 * outcome), or have chunks that no longer match their digests (reported as a
 * Failed execution by the delivery).
 */
export class ResultSpool {
  readonly #root: string;
  /** Spare manifest files, ready to be written over (see the class comment). */
  readonly #spares: string[] = [];
  #spareNames = 0;

  /** @param root the spool directory, normally `DATA-DIR/spool` */
  constructor(root: string) {
    this.#root = root;
  }

  get root(): string {
    return this.#root;
  }

  async init(): Promise<void> {
    await this.#io(this.#root, () => fs.mkdir(this.#root, { recursive: true, mode: 0o700 }));
  }

  /**
   * Stores a finished execution's outcome and files. Checks every chunk
   * against its digest and every file against its size and digest first, so
   * the spool never holds something the orchestrator would refuse.
   * Returns the manifest to send.
   */
  async put(
    jobId: string,
    outcome: Omit<MessageBody<"result">, "files">,
    files: readonly CollectedFile[],
  ): Promise<SpooledResult> {
    const executionId = outcome.executionId;
    this.#assertId(executionId);
    const dir = path.join(this.#root, executionId);
    if (files.length === 0) return this.#write(jobId, outcome, files, dir);
    const chunkDir = path.join(dir, CHUNKS);
    await this.#io(chunkDir, () => fs.mkdir(chunkDir, { recursive: true, mode: 0o700 }));
    try {
      return await this.#write(jobId, outcome, files, dir);
    } catch (err) {
      await fs.rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /**
   * Starts storing a finished execution's result; resolves to its manifest as
   * soon as it may be sent, with `stored`, which settles once the entry is on
   * disk. A result with files is sent from its spooled chunks, so it resolves
   * after {@link put}. A result without files is sent while its manifest is
   * written: a crash of the process before the write completes loses it exactly
   * as a crash just before spooling would (the orchestrator learns at the next
   * registration that the node does not hold it), and a lost connection loses
   * nothing, because the node keeps what it has not had acknowledged.
   */
  async begin(
    jobId: string,
    outcome: Omit<MessageBody<"result">, "files">,
    files: readonly CollectedFile[],
  ): Promise<{ entry: SpooledResult; stored: Promise<void> }> {
    if (files.length > 0) return { entry: await this.put(jobId, outcome, files), stored: Promise.resolve() };
    this.#assertId(outcome.executionId);
    const entry = manifestEntry(jobId, outcome, []);
    const stored = this.#writeManifest(entry);
    stored.catch(() => {}); // the caller handles it; not unhandled meanwhile
    return { entry, stored };
  }

  async #write(
    jobId: string,
    outcome: Omit<MessageBody<"result">, "files">,
    files: readonly CollectedFile[],
    dir: string,
  ): Promise<SpooledResult> {
    const executionId = outcome.executionId;
    const chunkDir = path.join(dir, CHUNKS);
    const manifestFiles: MessageBody<"result">["files"] = [];
    for (const file of files) {
      const whole = createHash("sha256");
      let size = 0;
      const digests: string[] = [];
      for (const chunk of file.chunks) {
        const digest = sha256Hex(chunk.data);
        if (digest !== bareDigest(chunk.sha256)) {
          throw new ComputeError(
            COMPUTE_CODES.SHOAL_COMPUTE_SPOOL,
            `result ${file.name} of ${executionId}: a chunk does not match its digest`,
            { fix: "this is a bug in the result collector; report it with the log" },
          );
        }
        whole.update(chunk.data);
        size += chunk.data.length;
        digests.push(digest);
        await writeFileAtomic(path.join(chunkDir, digest), chunk.data, 0o600, { fsync: false });
      }
      if (size !== file.size || whole.digest("hex") !== bareDigest(file.sha256)) {
        throw new ComputeError(
          COMPUTE_CODES.SHOAL_COMPUTE_SPOOL,
          `result ${file.name} of ${executionId}: chunks do not add up to the file's size and digest`,
          { fix: "this is a bug in the result collector; report it with the log" },
        );
      }
      manifestFiles.push({ name: file.name, size, sha256: bareDigest(file.sha256), chunks: digests });
    }
    const entry = manifestEntry(jobId, outcome, manifestFiles);
    await this.#writeManifest(entry);
    return entry;
  }

  /**
   * Writes an entry's manifest atomically: over a spare's bytes then renamed
   * into place, or, with no spare, through a new temporary file.
   */
  async #writeManifest(entry: SpooledResult): Promise<void> {
    const manifest = this.#manifest(entry.result.executionId);
    const data = Buffer.from(JSON.stringify(entry));
    const spare = this.#spares.pop();
    if (spare !== undefined) {
      try {
        overwrite(spare, data);
        renameSync(spare, manifest);
        return;
      } catch {
        await fs.rm(spare, { force: true }).catch(() => {});
      }
    }
    await writeFileAtomic(manifest, data, 0o600, { fsync: false });
  }

  /** Takes a manifest out of the spool: kept as a spare while there is room, else unlinked. */
  async #retireManifest(manifest: string): Promise<void> {
    if (this.#spares.length >= MAX_SPARES) return unlinkIfPresent(manifest);
    const spare = path.join(this.#root, `.spare-${this.#spareNames++}.tmp`);
    try {
      renameSync(manifest, spare);
      this.#spares.push(spare);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
  }

  /**
   * Every complete entry, oldest first. Chunk directories without a manifest
   * (a crash while spooling or removing), temporary files of interrupted
   * manifest writes and spares of an earlier process are removed; an entry of the older layout
   * (`<executionId>/manifest.json`) gets its manifest moved up; an unreadable
   * manifest is reported by `onBroken` and its entry left in place for the operator.
   */
  async list(onBroken: (executionId: string, err: unknown) => void = () => {}): Promise<SpooledResult[]> {
    const dirents = await this.#io(this.#root, () => fs.readdir(this.#root, { withFileTypes: true }));
    const ids = new Set<string>();
    for (const d of dirents) {
      if (d.isFile() && d.name.endsWith(MANIFEST_SUFFIX)) {
        const id = d.name.slice(0, -MANIFEST_SUFFIX.length);
        if (isSafeExecutionId(id)) ids.add(id);
      }
    }
    for (const d of dirents) {
      const where = path.join(this.#root, d.name);
      if (d.isFile() && d.name.startsWith(".") && d.name.endsWith(".tmp")) {
        if (!this.#spares.includes(where)) await fs.rm(where, { force: true });
      } else if (d.isDirectory() && isSafeExecutionId(d.name) && !ids.has(d.name)) {
        const moved = await fs.rename(path.join(where, LEGACY_MANIFEST), this.#manifest(d.name)).then(
          () => true,
          () => false,
        );
        if (moved) ids.add(d.name);
        else await fs.rm(where, { recursive: true, force: true });
      }
    }
    const entries: SpooledResult[] = [];
    for (const id of ids) {
      let text: string;
      try {
        text = await fs.readFile(this.#manifest(id), "utf8");
      } catch (err) {
        onBroken(id, err);
        continue;
      }
      if (text.length === 0) {
        // Manifests are not fsynced: a machine crash can leave one empty, which means never written.
        await this.remove(id);
        continue;
      }
      try {
        const entry = JSON.parse(text) as SpooledResult;
        if (entry.result?.executionId !== id) throw new Error("manifest names another execution");
        entries.push(entry);
      } catch (err) {
        onBroken(id, err);
      }
    }
    return entries.sort((a, b) => a.spooledAt - b.spooledAt);
  }

  /** Whether a complete entry (a non-empty manifest) is spooled for the execution. */
  async has(executionId: string): Promise<boolean> {
    this.#assertId(executionId);
    const st = await fs.stat(this.#manifest(executionId)).catch(() => undefined);
    return st !== undefined && st.size > 0;
  }

  /** The bytes of one spooled chunk, checked against its digest. */
  async readChunk(executionId: string, digest: string): Promise<Buffer> {
    this.#assertId(executionId);
    if (!HEX_SHA256.test(digest)) {
      throw new ComputeError(
        COMPUTE_CODES.SHOAL_COMPUTE_SPOOL,
        `not a chunk digest: ${JSON.stringify(digest)}`,
      );
    }
    const file = path.join(this.#root, executionId, CHUNKS, digest);
    const data = await this.#io(file, () => fs.readFile(file));
    if (sha256Hex(data) !== digest) {
      throw new ComputeError(COMPUTE_CODES.SHOAL_COMPUTE_SPOOL, `spooled chunk ${file} is corrupt`, {
        fix: "the disk changed the file; the result will be reported as failed",
      });
    }
    return data;
  }

  /**
   * Forgets an acknowledged result: the manifest first, so a crash in between
   * leaves only chunks to sweep. Idempotent. `chunks: false` says the entry was
   * spooled without files, so there is no directory to remove (an `fs.rm` of one
   * that is not there still costs a stat).
   */
  async remove(executionId: string, { chunks = true }: { chunks?: boolean } = {}): Promise<void> {
    this.#assertId(executionId);
    const manifest = this.#manifest(executionId);
    await this.#io(manifest, () => this.#retireManifest(manifest));
    if (!chunks) return;
    const dir = path.join(this.#root, executionId);
    await this.#io(dir, () => fs.rm(dir, { recursive: true, force: true }));
  }

  #manifest(executionId: string): string {
    return path.join(this.#root, `${executionId}${MANIFEST_SUFFIX}`);
  }

  #assertId(executionId: string): void {
    if (!isSafeExecutionId(executionId)) {
      throw new ComputeError(
        COMPUTE_CODES.SHOAL_COMPUTE_SPOOL,
        `unsafe execution id ${JSON.stringify(executionId)}`,
      );
    }
  }

  async #io<T>(file: string, op: () => Promise<T>): Promise<T> {
    try {
      return await op();
    } catch (err) {
      if (err instanceof ComputeError) throw err;
      throw new ComputeError(
        COMPUTE_CODES.SHOAL_COMPUTE_SPOOL,
        `spool ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`,
        { cause: err, fix: "check the data directory's permissions and free space" },
      );
    }
  }
}

/**
 * Writes `data` over `file`'s bytes from its start and cuts what is left
 * after them: never truncated to nothing first (see ResultSpool on auto_da_alloc).
 */
function overwrite(file: string, data: Buffer): void {
  const fd = openSync(file, "r+");
  try {
    writeFileSync(fd, data);
    ftruncateSync(fd, data.length);
  } finally {
    closeSync(fd);
  }
}

/** Accepts `sha256:HEX` or bare hex. */
function bareDigest(digest: string): string {
  return digest.startsWith("sha256:") ? digest.slice(7) : digest;
}
