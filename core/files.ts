import { randomBytes } from "node:crypto";
import { constants, promises as fs } from "node:fs";
import path from "node:path";
import { CORE_CODES, ShoalError } from "./errors.js";

export class FileReadError extends ShoalError {
  constructor(
    readonly path: string,
    cause: unknown,
  ) {
    const reason = (cause as NodeJS.ErrnoException)?.code ?? String(cause);
    super(CORE_CODES.SHOAL_FILE_READ, `cannot read ${path}: ${reason}`, {
      cause,
      fix: "check that the file exists and that this user may read it",
    });
  }
}

export class FileWriteError extends ShoalError {
  constructor(
    readonly path: string,
    cause: unknown,
  ) {
    const reason = (cause as NodeJS.ErrnoException)?.code ?? String(cause);
    super(CORE_CODES.SHOAL_FILE_WRITE, `cannot write ${path}: ${reason}`, {
      cause,
      fix: "check the directory's permissions and free space",
    });
  }
}

/** Reads a file, turning I/O failures into a {@link FileReadError} that names it. */
export async function readFileChecked(file: string): Promise<Buffer> {
  try {
    return await fs.readFile(file);
  } catch (err) {
    throw new FileReadError(file, err);
  }
}

/** Unlinks `file`; one that is not there is fine (unlike `fs.rm` with `force`, no stat first). */
export async function unlinkIfPresent(file: string): Promise<void> {
  await fs.unlink(file).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== "ENOENT") throw err;
  });
}

/**
 * When each entry `names` of `dir` was last modified (ms since the epoch),
 * by name; an entry gone meanwhile is left out.
 */
export async function modifiedTimes(dir: string, names: readonly string[]): Promise<Map<string, number>> {
  const stats = await Promise.all(names.map((n) => fs.stat(path.join(dir, n)).catch(() => undefined)));
  return new Map(names.flatMap((n, i) => (stats[i] ? [[n, stats[i].mtimeMs] as const] : [])));
}

/**
 * Writes `data` to `file` atomically: a temporary file in the same directory,
 * fsync, chmod, then rename. A crash or error leaves the old file (or none),
 * never a partial one. `mode` defaults to 0644; use 0600 for secrets.
 *
 * `fsync: false` skips the fsync: the file then survives a crash of this
 * process (the kernel has the bytes once write() returns) but not necessarily
 * a crash of the machine, where it may be missing or empty after the reboot.
 * Only for files whose loss the reader detects and recovers from.
 */
export async function writeFileAtomic(
  file: string,
  data: string | Uint8Array,
  mode = 0o644,
  { fsync = true }: { fsync?: boolean } = {},
): Promise<void> {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${randomBytes(6).toString("hex")}.tmp`);
  let handle: fs.FileHandle | undefined;
  try {
    handle = await fs.open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, mode);
    // Together: the chmod only restores bits the umask took (the file never has more
    // than `mode`), and each call waits its turn on a libuv thread and the event loop.
    await Promise.all([handle.writeFile(data), handle.chmod(mode)]);
    if (fsync) await handle.sync();
    await handle.close();
    handle = undefined;
    await fs.rename(tmp, file);
  } catch (err) {
    await handle?.close().catch(() => {});
    await fs.rm(tmp, { force: true }).catch(() => {});
    throw new FileWriteError(file, err);
  }
}

/**
 * Creates `dir` (0700) if needed and removes the temporary files that
 * {@link writeFileAtomic} leaves there when a process dies mid-write.
 */
export async function prepareAtomicDir(dir: string): Promise<void> {
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  const leftovers = (await fs.readdir(dir)).filter((name) => name.endsWith(".tmp"));
  await Promise.all(leftovers.map((name) => fs.rm(path.join(dir, name), { force: true })));
}

/**
 * Runs `fn` while holding an exclusive lock on `lockFile` (created with O_EXCL,
 * removed afterwards). Another process waiting for the lock retries for up to
 * `timeoutMs`; a lock older than `staleMs` is taken over (its holder crashed).
 */
export async function withFileLock<T>(
  lockFile: string,
  fn: () => Promise<T>,
  { timeoutMs = 10_000, staleMs = 30_000 } = {},
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (let attempt = 0; ; attempt++) {
    try {
      const h = await fs.open(lockFile, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
      await h.writeFile(String(process.pid));
      await h.close();
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw new FileWriteError(lockFile, err);
      const st = await fs.stat(lockFile).catch(() => undefined);
      if (st && Date.now() - st.mtimeMs > staleMs) {
        await fs.rm(lockFile, { force: true });
        continue;
      }
      if (Date.now() > deadline) throw new FileWriteError(lockFile, new Error("lock held too long"));
      await new Promise((r) => setTimeout(r, Math.min(5 + attempt * 2, 50) * Math.random() + 2));
    }
  }
  try {
    return await fn();
  } finally {
    await fs.rm(lockFile, { force: true });
  }
}
