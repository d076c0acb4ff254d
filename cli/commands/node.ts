import type { NodeView } from "../../orchestrator/index.js";
import { parseLabelOptions } from "../label-options.js";
import { type ApiArgs, printJson, printTable, withApiOptions, withClient } from "./api-options.js";
import type { CommandModule } from "./index.js";

type Args = ApiArgs & { output?: unknown } & Record<string, unknown>;

function call(argv: Args, method: string, path: string, body?: unknown): Promise<Record<string, unknown>> {
  return withClient(argv, (api) =>
    api.request<Record<string, unknown>>(method, `/api/v1/${path}`, body === undefined ? {} : { body }),
  );
}

function show(argv: Args, node: NodeView): void {
  if (argv.output === "json") {
    printJson(node);
    return;
  }
  const labels = Object.entries(node.Labels)
    .map(([k, v]) => `${k}=${v}`)
    .join(",");
  process.stdout.write(
    `ID:       ${node.ID}\nApproval: ${node.Approval}\nHealth:   ${node.Health}\nEngines:  ${node.Engines.join(",")}\nCPU:      ${node.Capacity.cpu}\nMemory:   ${node.Capacity.memory}\nLabels:   ${labels}\nVersion:  ${node.Version}\nLastSeen: ${new Date(node.LastSeen).toISOString()}\n${node.LowDisk === undefined ? "" : `LowDisk:  ${node.LowDisk} (no jobs go there)\n`}`,
  );
}

/** `shoal node list | describe | approve | reject | delete`. */
export const nodeCommand: CommandModule = (cli) =>
  cli.command("node", "compute nodes known to the orchestrator", (yargs) => {
    const byId = (y: typeof yargs) => y.positional("id", { type: "string", demandOption: true });
    return withApiOptions(yargs)
      .command(
        "list",
        "every node with its approval and health",
        () => {},
        async (argv: Args) => {
          const { Items } = (await call(argv, "GET", "orchestrator/nodes")) as { Items: NodeView[] };
          if (argv.output === "json") return printJson(Items);
          printTable(
            ["ID", "APPROVAL", "HEALTH", "ENGINES", "CPU", "LABELS"],
            Items.map((n) => [
              n.ID,
              n.Approval,
              n.Health,
              n.Engines.join(","),
              n.Capacity.cpu,
              Object.entries(n.Labels)
                .map(([k, v]) => `${k}=${v}`)
                .join(","),
            ]),
          );
        },
      )
      .command("describe <id>", "one node", byId, async (argv: Args) =>
        show(argv, (await call(argv, "GET", `orchestrator/nodes/${argv.id}`)).Node as NodeView),
      )
      .command(
        "approve <id>",
        "let a PENDING node take jobs; for an enrollment request (no join token), issue its certificate",
        (y) =>
          byId(y).option("label", {
            type: "string",
            array: true,
            describe:
              "k=v label given to a node enrolling without a token, as a join token's would be; repeatable",
          }),
        async (argv: Args) => {
          const labels = parseLabelOptions(argv.label);
          const body = Object.keys(labels).length > 0 ? { Labels: labels } : undefined;
          show(
            argv,
            (await call(argv, "POST", `orchestrator/nodes/${argv.id}/approve`, body)).Node as NodeView,
          );
        },
      )
      .command(
        "reject <id>",
        "refuse a node work (its executions move elsewhere)",
        byId,
        async (argv: Args) =>
          show(argv, (await call(argv, "POST", `orchestrator/nodes/${argv.id}/reject`)).Node as NodeView),
      )
      .command(
        "delete <id>",
        "revoke a node's identity (its connection closes, it may not enroll again) and forget it",
        byId,
        async (argv: Args) => {
          const r = await call(argv, "DELETE", `orchestrator/nodes/${argv.id}`);
          if (argv.output === "json") printJson(r);
          else process.stdout.write(`${argv.id} deleted\n`);
        },
      )
      .demandCommand(1, "name a subcommand; see shoal node --help");
  });
