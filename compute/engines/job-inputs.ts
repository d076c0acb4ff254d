import { constants, promises as fs } from "node:fs";
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

/** The real paths of the allow-list entries that exist. */
async function realRoots(allowedPaths: readonly string[]): Promise<string[]> {
  const roots = await Promise.all(allowedPaths.map((p) => fs.realpath(p).catch(() => undefined)));
  return roots.filter((r): r is string => r !== undefined);
}

function isWithin(p: string, root: string): boolean {
  return p === root || p.startsWith(root.endsWith("/") ? root : `${root}/`);
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
    const real = await allowedRealPath(
      source.Params.SourcePath ?? "",
      await realRoots(options.allowedPaths),
      "module",
    );
    const stat = await fs.stat(real);
    if (!stat.isFile() || stat.size > maxBytes) {
      throw new EngineError(
        ENGINE_CODES.SHOAL_ENGINE_MODULE_INVALID,
        `module ${real} is ${stat.isFile() ? `${formatBytes(stat.size)}, over ${formatBytes(maxBytes)}` : "not a file"}`,
      );
    }
    bytes = await fs.readFile(real);
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
      const stat = await fs.stat(real);
      if (input.Source.Type === "localFile" && !stat.isFile()) {
        throw new EngineError(ENGINE_CODES.SHOAL_INPUT_MISSING, `input ${real} is not a regular file`);
      }
      if (input.Source.Type === "localDirectory" && !stat.isDirectory()) {
        throw new EngineError(ENGINE_CODES.SHOAL_INPUT_MISSING, `input ${real} is not a directory`);
      }
      bytes = stat.isFile()
        ? await copyFile(real, dest, mode, budget, input.Target)
        : await copyTree(real, dest, mode, roots, budget, input.Target);
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

async function copyFile(src: string, dest: string, mode: number, budget: { left: number }, target: string) {
  const { size } = await fs.stat(src);
  take(budget, size, target);
  await fs.mkdir(path.dirname(dest), { recursive: true });
  await fs.copyFile(src, dest, constants.COPYFILE_EXCL);
  await fs.chmod(dest, mode);
  return size;
}

async function copyTree(
  src: string,
  dest: string,
  mode: number,
  roots: readonly string[],
  budget: { left: number },
  target: string,
): Promise<number> {
  await fs.mkdir(dest, { recursive: true });
  let total = 0;
  for (const entry of await fs.readdir(src, { withFileTypes: true })) {
    const from = path.join(src, entry.name);
    const to = path.join(dest, entry.name);
    if (entry.isDirectory()) total += await copyTree(from, to, mode, roots, budget, target);
    else if (entry.isFile()) total += await copyFile(from, to, mode, budget, target);
    else if (entry.isSymbolicLink()) {
      const real = await allowedRealPath(from, roots, "input link");
      if (!(await fs.stat(real)).isFile()) {
        throw new EngineError(
          ENGINE_CODES.SHOAL_INPUT_NOT_ALLOWED,
          `input link ${from} does not lead to a regular file`,
        );
      }
      total += await copyFile(real, to, mode, budget, target);
    } else {
      throw new EngineError(ENGINE_CODES.SHOAL_INPUT_NOT_ALLOWED, `input ${from} is not a file or directory`);
    }
  }
  return total;
}
