import { createLogger, SHOAL_VERSION } from "../../core/index.js";
import { Orchestrator } from "../../orchestrator/index.js";
import { type ConfigArgs, loadConfigFromArgv, withConfigOptions } from "../config-options.js";
import type { CommandModule } from "./index.js";

type ServeArgs = ConfigArgs & { "data-dir"?: string } & Record<string, unknown>;

/**
 * `shoal orchestrator serve`: runs until SIGTERM/SIGINT, then shuts down
 * gracefully (refuse new work, drain, close transports, flush logs) and exits 0;
 * a second signal exits at once. SIGHUP reloads the API certificate.
 */
export const orchestratorCommand: CommandModule = (cli) =>
  cli.command("orchestrator", "run the orchestrator daemon", (yargs) =>
    yargs
      .command(
        "serve",
        "run the orchestrator: built-in PKI, supervised nats-server, HTTPS API",
        (y) =>
          withConfigOptions(y).option("data-dir", {
            type: "string",
            describe: "directory for state, PKI and the nats-server store [default: DataDir, ~/.shoal]",
          }),
        async (argv: ServeArgs) => {
          const config = await loadConfigFromArgv(argv, { "data-dir": "DataDir" });
          const logger = createLogger({ level: config.Logging.Level, format: config.Logging.Format });
          const daemon = new Orchestrator({ config, logger, version: SHOAL_VERSION });
          let signals = 0;
          const onSignal = (signal: NodeJS.Signals) => {
            signals++;
            if (signals > 1) process.exit(130);
            logger.info({ signal }, "shutting down");
            void daemon.close();
          };
          const onHangup = () => {
            logger.info({ signal: "SIGHUP" }, "reloading certificates");
            void daemon.reload();
          };
          process.on("SIGTERM", onSignal);
          process.on("SIGINT", onSignal);
          process.on("SIGHUP", onHangup);
          await daemon.start();
          const error = await daemon.closed();
          process.off("SIGTERM", onSignal);
          process.off("SIGINT", onSignal);
          process.off("SIGHUP", onHangup);
          logger.flush();
          if (error) throw error;
        },
      )
      .demandCommand(1, "name a subcommand: serve"),
  );
