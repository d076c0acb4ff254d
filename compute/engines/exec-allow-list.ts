import { promises as fs } from "node:fs";
import path from "node:path";
import { ENGINE_CODES, EngineError } from "./errors.js";

/** Whether an exec command may run, and the real path to run if so; `reason` follows "the command". */
export type ExecCommandCheck =
  | { ok: true; realPath: string }
  | { ok: false; reason: string; realPath?: string | undefined };

/**
 * The allow-list decision, a pure function: `command` (as the job wrote it)
 * may run only when it is absolute and its real path — looked up by the
 * caller, `undefined` when it does not exist — is one of `allowed` (real
 * paths). A symlink is judged by what it leads to, never by its own name.
 */
export function checkExecCommand(
  allowed: readonly string[],
  command: string,
  realPath: string | undefined,
): ExecCommandCheck {
  if (!path.isAbsolute(command)) {
    return { ok: false, reason: "is not an absolute path" };
  }
  if (realPath === undefined) {
    return { ok: false, reason: "does not exist on this node" };
  }
  if (!allowed.includes(realPath)) {
    const via = realPath === command ? "" : ` (it resolves to ${realPath})`;
    return { ok: false, reason: `is not in Compute.Engines.Exec.Allow${via}`, realPath };
  }
  return { ok: true, realPath };
}

/** The real path of an absolute `file`, or undefined when it (or a link on the way) does not exist. */
export async function realPathOf(file: string): Promise<string | undefined> {
  if (!path.isAbsolute(file)) return undefined;
  return fs.realpath(file).catch(() => undefined);
}

/**
 * `Compute.Engines.Exec.Allow` resolved to real paths once, when the node
 * starts: a link in the list allows the file it leads to at that moment, and
 * a later change of the link needs a restart to take effect. Empty: the exec
 * engine is off.
 */
export class ExecAllowList {
  /** The real paths of the allowed programs, in the configured order. */
  readonly realPaths: readonly string[];

  private constructor(realPaths: readonly string[]) {
    this.realPaths = Object.freeze([...new Set(realPaths)]);
  }

  /** An empty list: exec is off. */
  static readonly OFF = new ExecAllowList([]);

  /**
   * Resolves every entry to its real path.
   *
   * @throws EngineError SHOAL_ENGINE_EXEC_ALLOW_INVALID for an entry that is relative,
   * does not exist or is not a regular file (the node refuses to start).
   */
  static async resolve(entries: readonly string[]): Promise<ExecAllowList> {
    const realPaths = await Promise.all(
      entries.map(async (entry, i) => {
        const invalid = (why: string, cause?: unknown) =>
          new EngineError(
            ENGINE_CODES.SHOAL_ENGINE_EXEC_ALLOW_INVALID,
            `Compute.Engines.Exec.Allow[${i}] ${JSON.stringify(entry)} ${why}`,
            {
              cause,
              fix: "list absolute paths of programs installed on this node, or remove the entry",
            },
          );
        if (!path.isAbsolute(entry)) throw invalid("is not an absolute path");
        let real: string;
        try {
          real = await fs.realpath(entry);
        } catch (err) {
          throw invalid("does not exist on this node", err);
        }
        const stat = await fs.stat(real);
        if (!stat.isFile()) throw invalid(`resolves to ${real}, which is not a file`);
        return real;
      }),
    );
    return new ExecAllowList(realPaths);
  }

  /** False when the list is empty (exec is off). */
  get enabled(): boolean {
    return this.realPaths.length > 0;
  }

  /** Looks up the command's real path now and checks it against the list. */
  async check(command: string): Promise<ExecCommandCheck> {
    return checkExecCommand(this.realPaths, command, await realPathOf(command));
  }
}
