import "reflect-metadata";
import yargs, { type Argv } from "yargs";
import { isShoalError } from "../core/index.js";
import { commands } from "./commands/index.js";

/** Builds the yargs parser; exported so tests can run commands in-process. */
export function buildCli(argv: string[]): Argv {
  let cli: Argv = yargs(argv)
    .scriptName("shoal")
    .strict()
    .demandCommand(1, "name a command; see shoal --help")
    .option("output", { choices: ["text", "json"] as const, default: "text", describe: "output format" })
    .recommendCommands()
    .help()
    .version(false)
    .fail(false) as unknown as Argv;
  for (const command of commands) cli = command(cli);
  return cli;
}

/** Runs the CLI and returns the process exit code; errors are printed, never thrown. */
export async function main(argv: string[]): Promise<number> {
  try {
    await buildCli(argv).parseAsync();
    return typeof process.exitCode === "number" ? process.exitCode : 0;
  } catch (err) {
    const json = argv.includes("--output=json") || argv.join(" ").includes("--output json");
    if (isShoalError(err)) {
      if (json) process.stderr.write(`${JSON.stringify({ error: err.toJSON() })}\n`);
      else process.stderr.write(`shoal: ${err.code}: ${err.describe()}\n`);
      return 1;
    }
    const message = err instanceof Error ? err.message : String(err);
    const fix = systemErrorFix(err);
    process.stderr.write(`shoal: ${message}\n${fix === undefined ? "" : `  fix: ${fix}\n`}`);
    return 2;
  }
}

/** What to do about an operating system's error that reached the top without a Shoal code. */
const SYSTEM_FIXES: Readonly<Record<string, string>> = {
  ENOSPC: "the disk is full: free space where the data directory is (docs/deploy.md, Monitoring)",
  EDQUOT: "the disk quota is used up: free space where the data directory is, or raise the quota",
  EROFS: "the file system is read-only: give a writable --data-dir",
  EACCES: "run as the user that owns the data directory, or correct its permissions",
};

/** The fix for an error the operating system raised (its `code`), if one is known. */
export function systemErrorFix(err: unknown): string | undefined {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return typeof code === "string" ? SYSTEM_FIXES[code] : undefined;
}
