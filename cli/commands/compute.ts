import { ComputeNode } from "../../compute/index.js";
import { createLogger } from "../../core/index.js";
import { type ConfigArgs, loadConfigFromArgv, withConfigOptions } from "../config-options.js";
import type { CommandModule } from "./index.js";

type ServeArgs = ConfigArgs & { "data-dir"?: string; orchestrators?: string } & Record<string, unknown>;

/**
 * `shoal compute serve`: runs a compute node until SIGTERM/SIGINT, then shuts
 * down gracefully (stop bidding, let executions finish or abort them, keep
 * results in the spool, drain) and exits 0; it exits non-zero with the error
 * when the node cannot start or is stopped by the orchestrator (REJECTED,
 * revoked). A second signal exits at once.
 */
export const computeCommand: CommandModule = (cli) =>
  cli.command("compute", "run a compute node", (yargs) =>
    yargs
      .command(
        "serve",
        "run a compute node: mTLS to the orchestrators, signed job messages, wasm and exec engines",
        (y) =>
          withConfigOptions(y)
            .option("data-dir", {
              type: "string",
              describe:
                "directory for the spool, work directories and TLS files [default: DataDir, ~/.shoal]",
            })
            .option("orchestrators", {
              type: "string",
              describe: "comma-separated NATS URLs, e.g. tls://orch:4222 [default: Compute.Orchestrators]",
            }),
        async (argv: ServeArgs) => {
          const config = await loadConfigFromArgv(argv, {
            "data-dir": "DataDir",
            orchestrators: "Compute.Orchestrators",
          });
          const logger = createLogger({ level: config.Logging.Level, format: config.Logging.Format });
          const node = new ComputeNode({ config, logger });
          let signals = 0;
          const onSignal = (signal: NodeJS.Signals) => {
            signals++;
            if (signals > 1) process.exit(130);
            logger.info({ signal }, "shutting down");
            void node.close();
          };
          process.on("SIGTERM", onSignal);
          process.on("SIGINT", onSignal);
          try {
            await node.start();
            const error = await node.closed();
            if (error) throw error;
          } finally {
            process.off("SIGTERM", onSignal);
            process.off("SIGINT", onSignal);
            logger.flush();
          }
        },
      )
      .demandCommand(1, "name a subcommand: serve"),
  );
