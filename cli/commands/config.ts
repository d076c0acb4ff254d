import {
  configKeys,
  configToYaml,
  defaultConfig,
  formatConfigValue,
  getConfigValue,
  resolveConfig,
  setConfigFileValue,
} from "../../core/index.js";
import {
  type ConfigArgs,
  configFileFromArgv,
  configOptionsFromArgv,
  withConfigOptions,
} from "../config-options.js";
import type { CommandModule } from "./index.js";

type Args = ConfigArgs & { output?: unknown } & Record<string, unknown>;

function print(text: string): void {
  process.stdout.write(text.endsWith("\n") ? text : `${text}\n`);
}

/** `shoal config list | get KEY | set KEY VALUE | default`. */
export const configCommand: CommandModule = (cli) =>
  cli.command("config", "show and change the configuration (docs/config.md lists every key)", (yargs) =>
    withConfigOptions(yargs)
      .command(
        "list",
        "every key with its effective value and where it was set",
        () => {},
        async (argv: Args) => {
          const { config, sources } = await resolveConfig(configOptionsFromArgv(argv));
          const rows = configKeys().map((key) => {
            const from = [...sources].filter(([p]) => p === key || p.startsWith(`${key}.`)).map(([, s]) => s);
            return {
              key,
              value: getConfigValue(config, key),
              source: from.length ? from.join(", ") : "default",
            };
          });
          if (argv.output === "json") return print(JSON.stringify(rows, null, 2));
          print(
            rows
              .map(
                (r) =>
                  `${r.key}=${formatConfigValue(r.value)}${r.source === "default" ? "" : `  # ${r.source}`}`,
              )
              .join("\n"),
          );
        },
      )
      .command(
        "get <key>",
        "the effective value of one key, a section (API.TLS) or a map entry (Compute.Labels.zone)",
        (y) => y.positional("key", { type: "string", demandOption: true }),
        async (argv) => {
          const { config } = await resolveConfig(configOptionsFromArgv(argv));
          const value = getConfigValue(config, argv.key);
          if (argv.output === "json") return print(JSON.stringify(value ?? null, null, 2));
          if (value !== null && typeof value === "object" && !Array.isArray(value) && !isLeafKey(argv.key)) {
            const prefix = `${argv.key}.`;
            const lines = configKeys()
              .filter((k) => k.startsWith(prefix))
              .map((k) => `${k}=${formatConfigValue(getConfigValue(config, k))}`);
            return print(lines.join("\n"));
          }
          print(value === undefined ? "" : formatConfigValue(value));
        },
      )
      .command(
        "set <key> <value>",
        "write one key to the config file (--config, $SHOAL_CONFIG or ~/.shoal/config.yaml), keeping its comments",
        (y) =>
          y
            .positional("key", { type: "string", demandOption: true })
            .positional("value", { type: "string", demandOption: true }),
        async (argv) => {
          const { file } = configFileFromArgv(argv);
          await setConfigFileValue(file, argv.key, argv.value);
          if (argv.output === "json")
            return print(JSON.stringify({ key: argv.key, value: argv.value, file }));
          print(`set ${argv.key}=${argv.value} in ${file}`);
        },
      )
      .command(
        "default",
        "the default configuration, as a commented YAML file",
        () => {},
        (argv: Args) => {
          const config = defaultConfig();
          print(argv.output === "json" ? JSON.stringify(config, null, 2) : configToYaml(config));
        },
      )
      .demandCommand(1, "name a config command: list, get, set or default"),
  );

function isLeafKey(keyPath: string): boolean {
  return configKeys().includes(keyPath);
}
