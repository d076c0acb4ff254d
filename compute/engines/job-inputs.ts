import { promises as fs } from "node:fs";
import path from "node:path";
import {
  DEFAULT_MAX_MODULE_BYTES,
  decodeInlineContent,
  formatBytes,
  INPUTS_DIR,
  type InputSource,
  isWasmModule,
  type Source,
} from "../../core/index.js";
import { ENGINE_CODES, EngineError } from "./errors.js";
import {
  HostFileError,
  isVanished,
  isWithin,
  type OpenedFile,
  openFileWithin,
  readUpTo,
} from "./host-files.js";

/** Bytes read and written at a time when a host input is copied. */
const COPY_CHUNK_BYTES = 1 << 20;

/** Bytes of host inputs copied for one execution. @default 1 GiB */
export const DEFAULT_MAX_INPUT_BYTES = 2 ** 30;

export interface InputOptions {
  /** `Compute.Inputs.AllowedPaths`: host directories (or files) jobs may read. Empty: none. */
  allowedPaths: readonly string[];
  /** @default DEFAULT_MAX_INPUT_BYTES */
  maxTotalBytes?: number;
}

/** One input as placed in the inputs directory. */
export interface PreparedInput {
  target: string;
  /** Where it now is on the host. */
  path: string;
  bytes: number;
}

/** Linux's switch that keeps users from hard-linking files they do not own. */
export const PROTECTED_HARDLINKS_FILE = "/proc/sys/fs/protected_hardlinks";

/**
 * Whether the kernel keeps users from hard-linking into a directory files
 * they do not own (`fs.protected_hardlinks`): a hard link inside an allowed
 * input directory is that directory's file, wherever else the file lives.
 * Undefined when the switch cannot be read (not Linux).
 */
export async function hardLinksProtected(file = PROTECTED_HARDLINKS_FILE): Promise<boolean | undefined> {
  const value = await fs.readFile(file, "utf8").catch(() => undefined);
  return value === undefined ? undefined : value.trim() !== "0";
}

/** The real paths of the allow-list entries that exist. */
async function realRoots(allowedPaths: readonly string[]): Promise<string[]> {
  const roots = await Promise.all(allowedPaths.map((p) => fs.realpath(p).catch(() => undefined)));
  return roots.filter((r): r is string => r !== undefined);
}

/** The real path of `sourcePath` if it lies under an allowed root; throws INPUT_NOT_ALLOWED / INPUT_MISSING otherwise. */
async function allowedRealPath(sourcePath: string, roots: readonly string[], what: string): Promise<string> {
  if (roots.length === 0) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_INPUT_NOT_ALLOWED,
      `${what} ${sourcePath} refused: this node allows no host paths`,
      {
        fix: "send the data inline, or the node operator sets Compute.Inputs.AllowedPaths",
      },
    );
  }
  let real: string;
  try {
    real = await fs.realpath(sourcePath);
  } catch (err) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_INPUT_MISSING,
      `${what} ${sourcePath} does not exist on this node`,
      {
        cause: err,
        fix: "check the path, or constrain the job to nodes that have it",
      },
    );
  }
  if (!roots.some((root) => isWithin(real, root))) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_INPUT_NOT_ALLOWED,
      `${what} ${sourcePath}${real === sourcePath ? "" : ` (really ${real})`} is outside Compute.Inputs.AllowedPaths`,
      { fix: "use a path under the node's Compute.Inputs.AllowedPaths" },
    );
  }
  return real;
}

/**
 * Opens host file `p` (a real path under one of `roots`) with {@link openFileWithin},
 * so the bytes read are those of a regular file still under `roots`, even if
 * the path was changed since it was checked; its refusals as this module's codes.
 */
async function openHostFile(p: string, roots: readonly string[], what: string): Promise<OpenedFile> {
  try {
    return await openFileWithin(p, roots);
  } catch (err) {
    if (!(err instanceof HostFileError)) throw err;
    if (err.problem === "outside") {
      throw new EngineError(
        ENGINE_CODES.SHOAL_INPUT_NOT_ALLOWED,
        `${what} ${p} now leads to ${err.real}, outside Compute.Inputs.AllowedPaths`,
        { cause: err, fix: "use a path under the node's Compute.Inputs.AllowedPaths" },
      );
    }
    throw new EngineError(ENGINE_CODES.SHOAL_INPUT_MISSING, `${what} ${p} is not a regular file`, {
      cause: err,
    });
  }
}

/** Runs `read` of host path `p`; a path removed, or a part of it replaced, meanwhile is SHOAL_INPUT_MISSING. */
async function whileUnchanged<T>(what: string, p: string, read: () => Promise<T>): Promise<T> {
  try {
    return await read();
  } catch (err) {
    if (!isVanished(err)) throw err;
    throw new EngineError(
      ENGINE_CODES.SHOAL_INPUT_MISSING,
      `${what} ${p} changed while it was read (removed, or a part of its path replaced)`,
      { cause: err, fix: "leave host inputs unchanged while jobs read them" },
    );
  }
}

/**
 * The bytes of a wasm task's `EntryModule`: decoded inline base64, a `stored`
 * module got through `stored` (by its digest), or a `localFile` read from the
 * node when under `allowedPaths`. Checks the WebAssembly header.
 */
export async function resolveEntryModule(
  source: Source,
  options: {
    allowedPaths: readonly string[];
    maxBytes?: number;
    stored?: (digest: string) => Promise<Buffer>;
  },
): Promise<Buffer> {
  const maxBytes = options.maxBytes ?? DEFAULT_MAX_MODULE_BYTES;
  let bytes: Buffer;
  if (source.Type === "inline") {
    bytes = decodeInlineContent(source.Params, "base64");
  } else if (source.Type === "stored") {
    if (!options.stored) {
      throw new EngineError(
        ENGINE_CODES.SHOAL_ENGINE_MODULE_UNAVAILABLE,
        `module ${source.Params.Digest}: this engine cannot fetch stored modules`,
      );
    }
    bytes = await options.stored(source.Params.Digest ?? "");
  } else {
    const roots = await realRoots(options.allowedPaths);
    const real = await allowedRealPath(source.Params.SourcePath ?? "", roots, "module");
    const file = await whileUnchanged("module", real, () => openHostFile(real, roots, "module"));
    try {
      if (file.size > maxBytes) {
        throw new EngineError(
          ENGINE_CODES.SHOAL_ENGINE_MODULE_INVALID,
          `module ${real} is ${formatBytes(file.size)}, over ${formatBytes(maxBytes)}`,
        );
      }
      bytes = await readUpTo(file.handle, file.size);
    } finally {
      await file.handle.close();
    }
  }
  if (!isWasmModule(bytes)) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_ENGINE_MODULE_INVALID,
      "the entry module is not WebAssembly (no \\0asm v1 header)",
    );
  }
  return bytes;
}

/** Host path for a sandbox target under `/inputs`; targets were validated by parseJobSpec, checked again here. */
function hostTarget(inputsDir: string, target: string): string {
  const rel = path.posix.relative(INPUTS_DIR, target);
  if (rel.startsWith("..") || path.posix.isAbsolute(rel)) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_INPUT_NOT_ALLOWED,
      `input target ${target} is outside ${INPUTS_DIR}`,
    );
  }
  return path.join(inputsDir, rel);
}

/**
 * Places a task's inputs in `inputsDir` (a fresh, empty directory): inline
 * content written to files, `localFile`/`localDirectory` copied from the host
 * when their real path lies under `allowedPaths`. Copies, never links, so a
 * job cannot change the host's files; inputs without `ReadWrite` are made
 * read-only (0444). Inside a copied directory, a symlink is followed only to a
 * regular file under the allowed paths; anything else refuses the input.
 */
export async function prepareInputs(
  inputsDir: string,
  inputSources: readonly InputSource[],
  options: InputOptions,
): Promise<PreparedInput[]> {
  const roots = await realRoots(options.allowedPaths);
  const budget = { left: options.maxTotalBytes ?? DEFAULT_MAX_INPUT_BYTES };
  const prepared: PreparedInput[] = [];
  for (const input of inputSources) {
    const dest = hostTarget(inputsDir, input.Target);
    const mode = input.Source.Params.ReadWrite ? 0o644 : 0o444;
    let bytes: number;
    if (input.Source.Type === "inline") {
      const data = decodeInlineContent(input.Source.Params);
      take(budget, data.length, input.Target);
      await fs.mkdir(path.dirname(dest), { recursive: true });
      await fs.writeFile(dest, data, { flag: "wx", mode });
      bytes = data.length;
    } else {
      const real = await allowedRealPath(input.Source.Params.SourcePath ?? "", roots, "input");
      bytes = await whileUnchanged("input", real, async () => {
        const stat = await fs.stat(real);
        if (input.Source.Type === "localFile" && !stat.isFile()) {
          throw new EngineError(ENGINE_CODES.SHOAL_INPUT_MISSING, `input ${real} is not a regular file`);
        }
        if (input.Source.Type === "localDirectory" && !stat.isDirectory()) {
          throw new EngineError(ENGINE_CODES.SHOAL_INPUT_MISSING, `input ${real} is not a directory`);
        }
        const copy = { mode, roots, budget, target: input.Target };
        return stat.isFile() ? await copyFile(real, dest, copy) : await copyTree(real, dest, copy);
      });
    }
    prepared.push({ target: input.Target, path: dest, bytes });
  }
  return prepared;
}

function take(budget: { left: number }, bytes: number, target: string): void {
  budget.left -= bytes;
  if (budget.left < 0) {
    throw new EngineError(
      ENGINE_CODES.SHOAL_INPUT_TOO_LARGE,
      `inputs exceed this node's limit at ${target}`,
      {
        fix: "send less data, or split the job",
      },
    );
  }
}

/** One host input being copied: its files' mode, the allowed roots, the bytes left, its `Target`. */
interface HostCopy {
  mode: number;
  roots: readonly string[];
  budget: { left: number };
  target: string;
}

/**
 * Copies host file `src` (under one of `roots`) to `dest`, a new file: the
 * bytes of the regular file opened, no more than its size when opened.
 */
async function copyFile(src: string, dest: string, copy: HostCopy): Promise<number> {
  const file = await openHostFile(src, copy.roots, "input");
  try {
    take(copy.budget, file.size, copy.target);
    await fs.mkdir(path.dirname(dest), { recursive: true });
    const out = await fs.open(dest, "wx", copy.mode);
    try {
      const buf = Buffer.alloc(Math.min(file.size, COPY_CHUNK_BYTES));
      for (let at = 0; at < file.size; ) {
        const { bytesRead } = await file.handle.read(buf, 0, Math.min(buf.length, file.size - at), at);
        if (bytesRead === 0) break;
        await out.writeFile(buf.subarray(0, bytesRead));
        at += bytesRead;
      }
      await out.chmod(copy.mode);
    } finally {
      await out.close();
    }
    return file.size;
  } finally {
    await file.handle.close();
  }
}

async function copyTree(src: string, dest: string, copy: HostCopy): Promise<number> {
  await fs.mkdir(dest, { recursive: true });
  let total = 0;
  for (const entry of await fs.readdir(src, { withFileTypes: true })) {
    const from = path.join(src, entry.name);
    const to = path.join(dest, entry.name);
    if (entry.isDirectory()) total += await copyTree(from, to, copy);
    else if (entry.isFile()) total += await copyFile(from, to, copy);
    else if (entry.isSymbolicLink()) {
      const real = await allowedRealPath(from, copy.roots, "input link");
      if (!(await fs.stat(real)).isFile()) {
        throw new EngineError(
          ENGINE_CODES.SHOAL_INPUT_NOT_ALLOWED,
          `input link ${from} does not lead to a regular file`,
        );
      }
      total += await copyFile(real, to, copy);
    } else {
      throw new EngineError(ENGINE_CODES.SHOAL_INPUT_NOT_ALLOWED, `input ${from} is not a file or directory`);
    }
  }
  return total;
}
