import type { Argv } from "yargs";
import { agentCommand } from "./agent.js";
import { authCommand } from "./auth.js";
import { computeCommand } from "./compute.js";
import { configCommand } from "./config.js";
import { jobCommand } from "./job.js";
import { nodeCommand } from "./node.js";
import { orchestratorCommand } from "./orchestrator.js";
import { pkiCommand } from "./pki.js";
import { policyCommand } from "./policy.js";

/** A command module adds its commands to the parser. One line per module here. */
export type CommandModule = (cli: Argv) => Argv;

export const commands: CommandModule[] = [
  configCommand,
  orchestratorCommand,
  computeCommand,
  jobCommand,
  nodeCommand,
  agentCommand,
  policyCommand,
  authCommand,
  pkiCommand,
];
