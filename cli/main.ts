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
    process.stderr.write(`shoal: ${message}\n`);
    return 2;
  }
}
