import { defineCodes, ShoalError } from "../../core/index.js";

export const ENGINE_CODES = defineCodes("engines", {
  SHOAL_ENGINE_EXEC_NOT_ALLOWED:
    "An exec job names a command whose real path this node does not allow-list (Compute.Engines.Exec.Allow), a relative or missing command, or exec is off.",
  SHOAL_ENGINE_EXEC_ALLOW_INVALID:
    "An entry of Compute.Engines.Exec.Allow is not an absolute path to an existing file; the node refuses to start.",
  SHOAL_ENGINE_ENV_NOT_ALLOWED:
    "An exec job sets an environment variable that changes how programs load (LD_*, ...).",
  SHOAL_ENGINE_MODULE_INVALID:
    "The WebAssembly module is not valid, or imports something other than WASI preview1.",
  SHOAL_ENGINE_MODULE_UNAVAILABLE:
    "The node could not get the job's stored module from the orchestrator (refused, not stored, no answer), or what it got does not match the digest the job names.",
  SHOAL_ENGINE_MEMORY_LIMIT: "The WebAssembly module needs more memory than the execution's limit.",
  SHOAL_ENGINE_START_FAILED: "The engine could not start the program (spawn failure).",
  SHOAL_ENGINE_TIMEOUT: "The execution ran past its ExecutionTimeout and was killed.",
  SHOAL_ENGINE_CANCELLED: "The execution was cancelled (job stopped or node shutting down) and was killed.",
  SHOAL_ENGINE_OUTPUT_LIMIT:
    "The program wrote far more to stdout/stderr than kept, and was killed to save the disk.",
  SHOAL_ENGINE_CRASHED: "The program trapped, ran out of memory or its sandbox failed.",
  SHOAL_ENGINE_CLOSED: "An executor was used after close().",
  SHOAL_INPUT_NOT_ALLOWED: "A job input or module names a host path outside Compute.Inputs.AllowedPaths.",
  SHOAL_INPUT_MISSING:
    "A job input or module names a host path that does not exist on this node, is not a regular file or directory, or changed while the node read it.",
  SHOAL_INPUT_TOO_LARGE: "A job's host inputs add up to more than the node copies for one execution.",
  SHOAL_RESULT_ESCAPE: "A result path is a symlink that leads outside the execution's outputs directory.",
  SHOAL_RESULT_TOO_LARGE: "A result file, or all result files together, exceed the node's result size caps.",
  SHOAL_RESULT_CHANGED:
    "A result file was removed, or replaced by a link or something not a regular file, while the node collected it.",
});

export type EngineCode = keyof typeof ENGINE_CODES;

/** A failure of an executor, of preparing inputs or of collecting results; `code` says which. */
export class EngineError extends ShoalError {
  declare readonly code: EngineCode;

  constructor(code: EngineCode, message: string, options: { cause?: unknown; fix?: string } = {}) {
    super(code, message, options);
  }
}

/** The exec engine refused a command: exec is off, or the command's real path is not allow-listed. */
export class ExecNotAllowedError extends EngineError {
  constructor(
    readonly command: string,
    readonly realPath: string | undefined,
    reason: string,
  ) {
    super(ENGINE_CODES.SHOAL_ENGINE_EXEC_NOT_ALLOWED, `exec of ${command} refused: ${reason}`, {
      fix: "the node operator adds the command's absolute path to Compute.Engines.Exec.Allow",
    });
  }
}
