import { type ApiArgs, printJson, withApiOptions, withClient } from "./api-options.js";
import type { CommandModule } from "./index.js";

type Args = ApiArgs & { output?: unknown } & Record<string, unknown>;

async function show(argv: Args, path: string): Promise<void> {
  const r = await withClient(argv, (api) => api.get<Record<string, unknown>>(`/api/v1/${path}`));
  if (argv.output === "json") return printJson(r);
  for (const [k, v] of Object.entries(r))
    process.stdout.write(`${k}: ${typeof v === "string" ? v : JSON.stringify(v)}
`);
}

/** `shoal agent alive | version | node`: the orchestrator's own status. */
export const agentCommand: CommandModule = (cli) =>
  cli.command("agent", "the orchestrator agent's status", (yargs) =>
    withApiOptions(yargs)
      .command(
        "alive",
        "is the API up",
        () => {},
        (argv: Args) => show(argv, "agent/alive"),
      )
      .command(
        "version",
        "the orchestrator's version",
        () => {},
        (argv: Args) => show(argv, "agent/version"),
      )
      .command(
        "node",
        "the orchestrator's identity and endpoints",
        () => {},
        (argv: Args) => show(argv, "agent/node"),
      )
      .demandCommand(1, "name a subcommand: alive, version or node"),
  );
