import { existsSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import type { Argv } from "yargs";
import { type LoadConfigOptions, loadConfig, type ShoalConfig } from "../core/index.js";

/** Where the config file is looked for when neither `--config` nor `SHOAL_CONFIG` names one. */
export const DEFAULT_CONFIG_FILE = path.join(os.homedir(), ".shoal", "config.yaml");

/** The options {@link withConfigOptions} adds. */
export interface ConfigArgs {
  config?: string;
  c?: string[];
}

/**
 * Adds `--config FILE` and repeatable `-c Key=Value` to a command. Daemon
 * commands call it in their builder and {@link loadConfigFromArgv} in their handler.
 */
export function withConfigOptions<T>(yargs: Argv<T>): Argv<T & ConfigArgs> {
  return yargs
    .option("config", {
      type: "string",
      describe: "YAML config file [default: $SHOAL_CONFIG, else ~/.shoal/config.yaml if it exists]",
    })
    .option("c", {
      type: "string",
      array: true,
      nargs: 1,
      describe: "set one config key, e.g. -c API.Port=8443 (repeatable; wins over file and env)",
    }) as Argv<T & ConfigArgs>;
}

/**
 * The config file a command uses: `--config`, else `SHOAL_CONFIG`, else
 * ~/.shoal/config.yaml. `explicit` is false for the default, which may be absent.
 */
export function configFileFromArgv(argv: ConfigArgs, env: NodeJS.ProcessEnv = process.env) {
  const named = argv.config ?? (env.SHOAL_CONFIG || undefined);
  return named === undefined
    ? { file: DEFAULT_CONFIG_FILE, explicit: false }
    : { file: path.resolve(named), explicit: true };
}

/**
 * The loader options for a parsed command line. `flagMap` maps option names to
 * key paths (e.g. `{ "data-dir": "DataDir" }`); such options must have no yargs
 * default, since any value they carry wins over file, env and `-c`.
 */
export function configOptionsFromArgv(
  argv: ConfigArgs & Record<string, unknown>,
  flagMap: Record<string, string> = {},
  env: NodeJS.ProcessEnv = process.env,
): LoadConfigOptions {
  const { file, explicit } = configFileFromArgv(argv, env);
  const flags: Record<string, unknown> = {};
  for (const [option, keyPath] of Object.entries(flagMap)) flags[keyPath] = argv[option];
  return {
    file: explicit || existsSync(file) ? file : undefined,
    env,
    overrides: argv.c ?? [],
    flags,
  };
}

/** Loads the validated, frozen config for a command that used {@link withConfigOptions}. */
export function loadConfigFromArgv(
  argv: ConfigArgs & Record<string, unknown>,
  flagMap: Record<string, string> = {},
  env: NodeJS.ProcessEnv = process.env,
): Promise<ShoalConfig> {
  return loadConfig(configOptionsFromArgv(argv, flagMap, env));
}
