import { defineCodes, ShoalError } from "./errors.js";

export const JOB_CODES = defineCodes("jobs", {
  SHOAL_JOB_INVALID:
    "A job spec that does not validate; the message names the field path and what was expected.",
});

/** One thing wrong with a job spec, at a field path such as `Tasks[0].Engine.Type`. */
export interface JobSpecProblem {
  /** Field path in the spec's own names (`Tasks[0].Resources.CPU`); empty for the document itself. */
  field: string;
  message: string;
}

/**
 * A job spec that cannot be accepted. `field` and the message name the first
 * problem; `problems` lists every one found, for an HTTP 400 body.
 */
export class JobSpecError extends ShoalError {
  readonly field: string;
  readonly problems: readonly JobSpecProblem[];

  constructor(problems: readonly JobSpecProblem[], options: { cause?: unknown } = {}) {
    const first = problems[0] ?? { field: "", message: "invalid job spec" };
    const more = problems.length > 1 ? ` (and ${problems.length - 1} more problem(s))` : "";
    super(JOB_CODES.SHOAL_JOB_INVALID, `${formatProblem(first)}${more}`, {
      cause: options.cause,
      fix: "correct the job spec; docs/jobs.md describes every field",
    });
    this.field = first.field;
    this.problems = Object.freeze([...problems]);
  }

  override toJSON(): Record<string, unknown> {
    return { ...super.toJSON(), field: this.field, problems: this.problems };
  }
}

/** `Tasks[0].Engine.Type: unknown engine "docker"` — or just the message for the whole document. */
export function formatProblem(p: JobSpecProblem): string {
  return p.field ? `${p.field}: ${p.message}` : p.message;
}
