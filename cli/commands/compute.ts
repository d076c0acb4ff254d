import { ComputeNode, type JoinOptions } from "../../compute/index.js";
import { CORE_CODES, createLogger, ShoalError } from "../../core/index.js";
import { type ConfigArgs, loadConfigFromArgv, withConfigOptions } from "../config-options.js";
import type { CommandModule } from "./index.js";

type ServeArgs = ConfigArgs & {
  "data-dir"?: string;
  orchestrators?: string;
  api?: string;
  join?: string;
  "ca-fingerprint"?: string;
  id?: string;
} & Record<string, unknown>;

/**
 * `--join`/`--ca-fingerprint` (or SHOAL_JOIN_TOKEN/SHOAL_CA_FINGERPRINT, which keep the token out of `ps`).
 * `--ca-fingerprint` alone enrolls without a token: the node waits until an operator approves it.
 */
function joinOptions(argv: ServeArgs): JoinOptions | undefined {
  const token = argv.join ?? process.env.SHOAL_JOIN_TOKEN;
  const caFingerprint = argv["ca-fingerprint"] ?? process.env.SHOAL_CA_FINGERPRINT;
  if (!caFingerprint) {
    if (token) {
      throw new ShoalError(CORE_CODES.SHOAL_USAGE, "--join needs --ca-fingerprint sha256:HEX", {
        fix: "copy the CA fingerprint the orchestrator printed: the node trusts nothing it cannot check against it",
      });
    }
    if (argv.id) {
      throw new ShoalError(CORE_CODES.SHOAL_USAGE, "--id only matters when enrolling", {
        fix: "add --ca-fingerprint sha256:HEX (and --join TOKEN, or wait for `shoal node approve`)",
      });
    }
    return undefined;
  }
  return { caFingerprint, ...(token ? { token } : {}), ...(argv.id ? { nodeId: argv.id } : {}) };
}

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
            })
            .option("join", {
              type: "string",
              describe:
                "join token: enroll into DATA-DIR/tls if no identity is there yet [env SHOAL_JOIN_TOKEN]",
            })
            .option("ca-fingerprint", {
              type: "string",
              describe:
                "sha256:HEX of the fabric root CA, checked before anything is trusted; without --join the node enrolls once an operator runs `shoal node approve ID` [env SHOAL_CA_FINGERPRINT]",
            })
            .option("id", { type: "string", describe: "node id to enroll as [default: the host name]" })
            .option("api", {
              type: "string",
              describe:
                "orchestrator API for enrollment [default: Compute.API, else https://<first orchestrator host>:1234]",
            }),
        async (argv: ServeArgs) => {
          const config = await loadConfigFromArgv(argv, {
            "data-dir": "DataDir",
            orchestrators: "Compute.Orchestrators",
            api: "Compute.API",
          });
          const join = joinOptions(argv);
          const logger = createLogger({ level: config.Logging.Level, format: config.Logging.Format });
          const node = new ComputeNode({ config, logger, ...(join ? { join } : {}) });
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
            try {
              await node.start();
            } catch (err) {
              // Stopped by a signal while starting (e.g. waiting for enrollment approval): a clean stop.
              if (signals === 0) throw err;
              logger.info({ reason: (err as Error).message }, "stopped before the node started");
              return;
            }
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
