import type { Argv } from "yargs";
import { configCommand } from "./config.js";

/** A command module adds its commands to the parser. One line per module here. */
export type CommandModule = (cli: Argv) => Argv;

export const commands: CommandModule[] = [configCommand];
