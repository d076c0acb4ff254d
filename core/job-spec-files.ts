import { promises as fs } from "node:fs";
import path from "node:path";
import { readFileChecked } from "./files.js";
import { type JobSpec, type ParseJobSpecOptions, parseJobSpec, readJobSpecDocument } from "./job-spec.js";
import { JobSpecError } from "./job-spec-errors.js";

/**
 * Reads a job spec file (`.json` as JSON, anything else as YAML) the way the
 * CLI submits it: every wasm task whose `EntryModule` is a `localFile` gets the
 * file's bytes inlined (base64), with a relative `SourcePath` taken from the
 * spec file's directory. The orchestrator and nodes then never need the
 * submitter's files. Returns the validated spec.
 *
 * @throws FileReadError when the spec cannot be read;
 *   JobSpecError (`SHOAL_JOB_INVALID`) when the spec is invalid or a module is missing.
 */
export async function loadJobSpecFile(file: string, options: ParseJobSpecOptions = {}): Promise<JobSpec> {
  const format = options.format ?? (file.endsWith(".json") ? "json" : "yaml");
  const doc = readJobSpecDocument(await readFileChecked(file), { ...options, format });
  absolutizeModulePaths(doc, path.dirname(path.resolve(file)));
  const spec = parseJobSpec(doc, options);
  const inlined = structuredClone(spec) as { Tasks: { Engine: JobSpec["Tasks"][number]["Engine"] }[] };
  for (const [i, task] of inlined.Tasks.entries()) {
    if (task.Engine.Type !== "wasm" || task.Engine.Params.EntryModule.Type !== "localFile") continue;
    const modulePath = task.Engine.Params.EntryModule.Params.SourcePath!;
    const stat = await fs.stat(modulePath).catch(() => undefined);
    if (!stat?.isFile()) {
      const hint = modulePath.endsWith(".wasm") ? " (scripts/build-wasm builds the example modules)" : "";
      throw new JobSpecError([
        {
          field: `Tasks[${i}].Engine.Params.EntryModule.Params.SourcePath`,
          message: `${modulePath} is not a file${hint}`,
        },
      ]);
    }
    const content = (await readFileChecked(modulePath)).toString("base64");
    task.Engine.Params.EntryModule = { Type: "inline", Params: { Content: content, Encoding: "base64" } };
  }
  return parseJobSpec(inlined, options);
}

/** Makes a relative module `SourcePath` absolute against the spec's directory, before validation. */
function absolutizeModulePaths(doc: object, baseDir: string): void {
  const tasks = (doc as { Tasks?: unknown }).Tasks;
  if (!Array.isArray(tasks)) return;
  for (const task of tasks) {
    const entry = task?.Engine?.Params?.EntryModule;
    const params = entry?.Params;
    if (
      entry?.Type === "localFile" &&
      typeof params?.SourcePath === "string" &&
      !path.isAbsolute(params.SourcePath)
    ) {
      params.SourcePath = path.resolve(baseDir, params.SourcePath);
    }
  }
}
