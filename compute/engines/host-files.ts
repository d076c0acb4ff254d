import { constants, promises as fs } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import path from "node:path";

/** Whether real path `p` is `root` or lies under it. */
export function isWithin(p: string, root: string): boolean {
  return p === root || p.startsWith(root.endsWith("/") ? root : `${root}/`);
}

/** Why {@link openFileWithin} refused a path. */
export type HostFileProblem = "outside" | "not-regular";

export class HostFileError extends Error {
  constructor(
    readonly problem: HostFileProblem,
    /** Where the file really is (its directory's real path and its name), when known. */
    readonly real: string,
  ) {
    super(problem === "outside" ? `${real} is outside the allowed paths` : `${real} is not a regular file`);
  }
}

/** A regular file opened by {@link openFileWithin}; the caller closes `handle`. */
export interface OpenedFile {
  handle: FileHandle;
  /** Its size when it was opened: read no more than this. */
  size: number;
  /** Its real path. */
  real: string;
}

/** The path an open descriptor refers to (Linux: /proc/self/fd). */
function openedPath(handle: FileHandle): Promise<string> {
  return fs.readlink(`/proc/self/fd/${handle.fd}`);
}

/**
 * Opens the regular file `p` for reading, such that what is read is what
 * was checked, even while someone else renames, links or replaces parts of
 * the path meanwhile (a check of the path followed by an open of the path
 * would read whatever the path leads to by then):
 *
 * - its directory is opened first (following links, but only ever opening
 *   a directory), and the real path of that open directory must lie within
 *   one of `roots`;
 * - the file is opened inside that very directory without following a link
 *   (a link put there since is refused) and without blocking (a FIFO would
 *   otherwise hang the open until a writer came);
 * - what was opened must be a regular file.
 *
 * Throws {@link HostFileError} when what it opened is outside `roots` or
 * not a regular file; the open's own error (see {@link isVanished}) when a
 * part of the path is gone or was replaced by a link.
 */
export async function openFileWithin(p: string, roots: readonly string[]): Promise<OpenedFile> {
  const name = path.basename(p);
  const dir = await fs.open(path.dirname(p), constants.O_RDONLY | constants.O_DIRECTORY);
  try {
    const real = path.join(await openedPath(dir), name);
    if (!roots.some((root) => isWithin(real, root))) throw new HostFileError("outside", real);
    const handle = await fs.open(
      `/proc/self/fd/${dir.fd}/${name}`,
      constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK | constants.O_NOCTTY,
    );
    const stat = await handle.stat().catch(async (err: unknown) => {
      await handle.close();
      throw err;
    });
    if (!stat.isFile()) {
      await handle.close();
      throw new HostFileError("not-regular", real);
    }
    return { handle, size: stat.size, real };
  } finally {
    await dir.close();
  }
}

/**
 * Whether `err` says a path that was there a moment before is gone: ENOENT,
 * or what an O_NOFOLLOW open or a directory open gives when a link or a
 * non-directory was put in the way (ELOOP, ENOTDIR).
 */
export function isVanished(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === "ENOENT" || code === "ELOOP" || code === "ENOTDIR";
}

/** Reads at most `limit` bytes from the start of an open file (fewer if it ends first). */
export async function readUpTo(handle: FileHandle, limit: number): Promise<Buffer> {
  const buf = Buffer.alloc(limit);
  let filled = 0;
  while (filled < limit) {
    const { bytesRead } = await handle.read(buf, filled, limit - filled, filled);
    if (bytesRead === 0) break;
    filled += bytesRead;
  }
  return filled === limit ? buf : buf.subarray(0, filled);
}
