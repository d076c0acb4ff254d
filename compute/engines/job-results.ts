import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import { formatBytes, MAX_RESULT_TOTAL_BYTES, OUTPUTS_DIR, type ResultPath } from "../../core/index.js";
import { ENGINE_CODES, EngineError } from "./errors.js";
import { HostFileError, isVanished, isWithin, openFileWithin } from "./host-files.js";

/** Largest single result file. @default 64 MiB */
export const DEFAULT_RESULT_MAX_FILE_BYTES = 64 * 1024 * 1024;
/** Largest sum of an execution's result files. @default 256 MiB */
export const DEFAULT_RESULT_MAX_TOTAL_BYTES = MAX_RESULT_TOTAL_BYTES;
/** Most result files per execution. @default 1000 */
export const DEFAULT_RESULT_MAX_FILES = 1000;
/**
 * Largest JSON list of result files (names, sizes, digests of each file and
 * chunk) in a `result` manifest, in UTF-8 bytes: with stdout and stderr (at most
 * 176 KiB of JSON each, MAX_RESULT_OUTPUT_JSON_BYTES) the signed manifest, a
 * third larger in base64url, stays within one NATS message (1 MiB), and so does
 * the execution record that keeps it.
 */
export const MAX_RESULT_MANIFEST_JSON_BYTES = 384 * 1024;
/** Size of the chunks results travel in (each signed with its digest). @default 256 KiB */
export const DEFAULT_RESULT_CHUNK_BYTES = 256 * 1024;

export interface ResultCaps {
  /** @default DEFAULT_RESULT_MAX_FILE_BYTES */
  maxFileBytes?: number;
  /** @default DEFAULT_RESULT_MAX_TOTAL_BYTES */
  maxTotalBytes?: number;
  /** @default DEFAULT_RESULT_MAX_FILES */
  maxFiles?: number;
  /** @default DEFAULT_RESULT_CHUNK_BYTES */
  chunkBytes?: number;
}

export interface ResultFileChunk {
  index: number;
  /** Hex SHA-256 of `data`. */
  sha256: string;
  data: Buffer;
}

export interface CollectedResultFile {
  /** `<ResultPath.Name>` for a file, `<ResultPath.Name>/<relative path>` for files under a directory. */
  name: string;
  /** Where it is on the host. */
  path: string;
  size: number;
  /** Hex SHA-256 of the whole file. */
  sha256: string;
  chunks: ResultFileChunk[];
}

export interface CollectedResults {
  /** Sorted by name. */
  files: CollectedResultFile[];
  /** Names of ResultPaths that the program did not create. */
  missing: string[];
}

interface Budget {
  files: number;
  bytes: number;
  /** JSON characters of the files' manifest entries so far. */
  manifest: number;
}

/**
 * Reads a task's `ResultPaths` from `outputsDir` (`/outputs` in the sandbox):
 * a file becomes one result, a directory every regular file under it. A
 * symlink is followed only when it stays inside `outputsDir`, and a link to a
 * directory is skipped (no cycles); one leading outside refuses the whole
 * collection (SHOAL_RESULT_ESCAPE). Sizes are capped per file and in total
 * (SHOAL_RESULT_TOO_LARGE). Each file comes back in chunks with digests.
 */
export async function collectResults(
  outputsDir: string,
  resultPaths: readonly ResultPath[],
  caps: ResultCaps = {},
): Promise<CollectedResults> {
  if (resultPaths.length === 0) return { files: [], missing: [] };
  const limits = {
    maxFileBytes: caps.maxFileBytes ?? DEFAULT_RESULT_MAX_FILE_BYTES,
    maxTotalBytes: caps.maxTotalBytes ?? DEFAULT_RESULT_MAX_TOTAL_BYTES,
    maxFiles: caps.maxFiles ?? DEFAULT_RESULT_MAX_FILES,
    chunkBytes: caps.chunkBytes ?? DEFAULT_RESULT_CHUNK_BYTES,
  };
  const root = await fs.realpath(outputsDir);
  const found = new Map<string, string>();
  const missing: string[] = [];
  const budget: Budget = { files: 0, bytes: 0, manifest: 0 };
  for (const rp of resultPaths) {
    await listResult(rp, root, found, missing, budget, limits).catch((err: unknown) => {
      throw isVanished(err) ? changed(rp.Name, err) : err;
    });
  }
  const files: CollectedResultFile[] = [];
  for (const name of [...found.keys()].sort())
    files.push(await readChunked(name, found.get(name)!, root, limits));
  return { files, missing };
}

/** Adds the files of one result path to `found`, or its name to `missing`. */
async function listResult(
  rp: ResultPath,
  root: string,
  found: Map<string, string>,
  missing: string[],
  budget: Budget,
  limits: Required<ResultCaps>,
): Promise<void> {
  const rel = path.posix.relative(OUTPUTS_DIR, rp.Path);
  if (rel.startsWith("..") || path.posix.isAbsolute(rel)) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_RESULT_ESCAPE,
      `result path ${rp.Path} is outside ${OUTPUTS_DIR}`,
    );
  }
  const real = await insideRoot(path.join(root, rel), root, rp.Path);
  if (real === undefined) {
    missing.push(rp.Name);
    return;
  }
  const stat = await fs.stat(real);
  if (stat.isDirectory()) await walk(real, rp.Name, root, found, budget, limits);
  else if (stat.isFile()) add(found, rp.Name, real, stat.size, budget, limits);
}

/** {@link openFileWithin}'s refusal of a result file as a result error; any other error as it is. */
function refusal(name: string, err: unknown): unknown {
  if (err instanceof HostFileError && err.problem === "outside") {
    return new EngineError(
      ENGINE_CODES.SHOAL_RESULT_ESCAPE,
      `result ${name} leads outside ${OUTPUTS_DIR} (to ${err.real})`,
      { cause: err, fix: "write results as regular files under /outputs" },
    );
  }
  return err instanceof HostFileError || isVanished(err) ? changed(name, err) : err;
}

function changed(name: string, cause: unknown): EngineError {
  return new EngineError(
    ENGINE_CODES.SHOAL_RESULT_CHANGED,
    `result ${name} changed while it was collected (removed, or replaced by a link or a non-file)`,
    { cause, fix: "write results as regular files under /outputs, and leave them be once the program ends" },
  );
}

/** The real path of `p` if it exists and stays inside `root`; undefined if it does not exist. */
async function insideRoot(p: string, root: string, shown: string): Promise<string | undefined> {
  let real: string;
  try {
    real = await fs.realpath(p);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
  if (!isWithin(real, root)) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_RESULT_ESCAPE,
      `result ${shown} leads outside ${OUTPUTS_DIR} (to ${real})`,
      {
        fix: "write results as regular files under /outputs",
      },
    );
  }
  return real;
}

function add(
  found: Map<string, string>,
  name: string,
  real: string,
  size: number,
  budget: Budget,
  limits: Required<ResultCaps>,
): void {
  if (found.has(name)) return;
  if (size > limits.maxFileBytes) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_RESULT_TOO_LARGE,
      `result ${name} is ${formatBytes(size)}; a result file may be at most ${formatBytes(limits.maxFileBytes)}`,
      { fix: "write smaller results, or split them over several files and jobs" },
    );
  }
  budget.files++;
  budget.bytes += size;
  if (budget.files > limits.maxFiles || budget.bytes > limits.maxTotalBytes) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_RESULT_TOO_LARGE,
      `results exceed ${limits.maxFiles} files or ${formatBytes(limits.maxTotalBytes)} in total`,
      { fix: "return fewer or smaller files" },
    );
  }
  // The entry as the manifest will carry it: name, size, and the hex SHA-256 of the file and of each chunk.
  const digests = 1 + Math.ceil(size / limits.chunkBytes);
  budget.manifest += Buffer.byteLength(JSON.stringify({ name, size })) + digests * 67 + 24;
  if (budget.manifest > MAX_RESULT_MANIFEST_JSON_BYTES) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_RESULT_TOO_LARGE,
      `the list of ${budget.files} result files is more than ${formatBytes(MAX_RESULT_MANIFEST_JSON_BYTES)} as JSON (names and digests): a signed result travels in one NATS message`,
      { fix: "return fewer files (e.g. one archive of them) or shorter names" },
    );
  }
  found.set(name, real);
}

async function walk(
  dir: string,
  prefix: string,
  root: string,
  found: Map<string, string>,
  budget: Budget,
  limits: Required<ResultCaps>,
): Promise<void> {
  const entries = await fs.readdir(dir, { withFileTypes: true });
  entries.sort((a, b) => (a.name < b.name ? -1 : 1));
  for (const entry of entries) {
    const p = path.join(dir, entry.name);
    const name = `${prefix}/${entry.name}`;
    if (entry.isDirectory()) await walk(p, name, root, found, budget, limits);
    else if (entry.isFile()) add(found, name, p, (await fs.lstat(p)).size, budget, limits);
    else if (entry.isSymbolicLink()) {
      const real = await insideRoot(p, root, path.posix.join(OUTPUTS_DIR, path.relative(root, p)));
      const stat = real === undefined ? undefined : await fs.stat(real);
      if (real !== undefined && stat?.isFile()) add(found, name, real, stat.size, budget, limits);
    }
  }
}

/**
 * Reads a result file in digested chunks. It is opened with {@link openFileWithin},
 * so what is read is a regular file still inside `root` even if a program
 * left running changed the outputs since they were listed.
 */
async function readChunked(
  name: string,
  real: string,
  root: string,
  limits: Required<ResultCaps>,
): Promise<CollectedResultFile> {
  const { handle, size: openedSize } = await openFileWithin(real, [root]).catch((err: unknown) => {
    throw refusal(name, err);
  });
  try {
    if (openedSize > limits.maxFileBytes) {
      throw new EngineError(
        ENGINE_CODES.SHOAL_RESULT_TOO_LARGE,
        `result ${name} grew past the limit while it was collected`,
      );
    }
    const whole = createHash("sha256");
    const chunks: ResultFileChunk[] = [];
    let size = 0;
    for (;;) {
      const buf = Buffer.alloc(limits.chunkBytes);
      let filled = 0;
      while (filled < buf.length) {
        const { bytesRead } = await handle.read(buf, filled, buf.length - filled, size + filled);
        if (bytesRead === 0) break;
        filled += bytesRead;
      }
      if (filled === 0) break;
      const data = filled === buf.length ? buf : Buffer.from(buf.subarray(0, filled));
      whole.update(data);
      chunks.push({ index: chunks.length, sha256: createHash("sha256").update(data).digest("hex"), data });
      size += filled;
      if (size > limits.maxFileBytes) {
        throw new EngineError(
          ENGINE_CODES.SHOAL_RESULT_TOO_LARGE,
          `result ${name} grew past the limit while it was collected`,
        );
      }
      if (filled < buf.length) break;
    }
    return { name, path: real, size, sha256: whole.digest("hex"), chunks };
  } finally {
    await handle.close();
  }
}
