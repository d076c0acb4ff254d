import { createHash } from "node:crypto";
import { once } from "node:events";
import { createWriteStream, promises as fs } from "node:fs";
import path from "node:path";
import { pipeline } from "node:stream/promises";
import { type JobSpec, loadJobSpecFile, readFileChecked, ShoalError, wasmJobSpec } from "../../core/index.js";
import type { ExecutionResults, JobEvent, JobView, LogEntry } from "../../orchestrator/index.js";
import { isSafeResultName } from "../../orchestrator/index.js";
import type { ApiClient } from "../api-client.js";
import { listJobs } from "../job-list.js";
import { submitJob } from "../job-submit.js";
import { parseLabelOptions } from "../label-options.js";
import {
  type ApiArgs,
  download as fetchFile,
  printJson,
  printTable,
  withApiOptions,
  withClient,
} from "./api-options.js";
import type { CommandModule } from "./index.js";

type Args = ApiArgs & { output?: unknown } & Record<string, unknown>;

const json = (argv: Args) => argv.output === "json";

function time(ms: number | undefined): string {
  return ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "";
}

function printJob(job: JobView): void {
  process.stdout.write(
    `ID:      ${job.ID}\nName:    ${job.Name}\nType:    ${job.Type}\nState:   ${job.State} (${job.StateMessage})\nCreated: ${time(job.CreateTime)}\n\n`,
  );
  printExecutions(job.Executions);
  for (const e of job.Executions) {
    if (e.Stdout)
      process.stdout.write(`\n--- stdout of ${e.ID} ---\n${e.Stdout}${e.Stdout.endsWith("\n") ? "" : "\n"}`);
    if (e.Stderr)
      process.stdout.write(`\n--- stderr of ${e.ID} ---\n${e.Stderr}${e.Stderr.endsWith("\n") ? "" : "\n"}`);
  }
}

function printExecutions(executions: JobView["Executions"]): void {
  printTable(
    ["EXECUTION", "NODE", "STATE", "EXIT", "MESSAGE"],
    executions.map((e) => [e.ID, e.NodeID, e.State, e.ExitCode, e.StateMessage]),
  );
}

/** Follows a job to its final state through the streaming history endpoint (no polling). */
async function follow(api: ApiClient, id: string, print: boolean): Promise<JobView> {
  for await (const line of api.stream<{ Event?: JobEvent; Job?: JobView }>(
    `/api/v1/orchestrator/jobs/${id}/history`,
    {
      query: { follow: true },
    },
  )) {
    if (line.Event && print) {
      const e = line.Event;
      process.stderr.write(
        `${time(e.Time)}  ${e.ExecutionID ? `${e.ExecutionID} ` : ""}${e.State}: ${e.Message}\n`,
      );
    }
    if (line.Job) return line.Job;
  }
  throw new ShoalError("SHOAL_USAGE", "the job stream ended before the job finished", {
    fix: `check the orchestrator, then run: shoal job describe ${id}`,
  });
}

async function streamLogs(api: ApiClient, id: string, followLive: boolean): Promise<void> {
  for await (const entry of api.stream<LogEntry>(`/api/v1/orchestrator/jobs/${id}/logs`, {
    query: { follow: followLive || undefined },
  })) {
    const out = entry.Stream === "stderr" ? process.stderr : process.stdout;
    // The reader sets the pace (a pager, a slow pipe): the stream waits rather than filling memory.
    if (!out.write(entry.Data)) await once(out, "drain");
  }
}

async function download(
  argv: Args,
  api: ApiClient,
  id: string,
  outDir: string,
): Promise<{ file: string; sha256: string }[]> {
  const { Items } = await api.get<{ Items: ExecutionResults[] }>(`/api/v1/orchestrator/jobs/${id}/results`);
  const written: { file: string; sha256: string }[] = [];
  for (const execution of Items) {
    for (const f of execution.Files) {
      if (!isSafeResultName(f.name))
        throw new ShoalError("SHOAL_USAGE", `refusing result name ${JSON.stringify(f.name)}`);
      const target = path.join(outDir, execution.ExecutionID, f.name);
      await fs.mkdir(path.dirname(target), { recursive: true });
      const stream = await fetchFile(
        argv,
        `orchestrator/jobs/${id}/results/${execution.ExecutionID}/${f.name.split("/").map(encodeURIComponent).join("/")}`,
      );
      const hash = createHash("sha256");
      const tmp = `${target}.part`;
      stream.on("data", (d: Buffer) => hash.update(d));
      await pipeline(stream, createWriteStream(tmp));
      const digest = hash.digest("hex");
      if (digest !== f.sha256) {
        await fs.rm(tmp, { force: true });
        throw new ShoalError(
          "SHOAL_USAGE",
          `${f.name} of ${execution.ExecutionID}: digest ${digest} ≠ ${f.sha256}`,
          {
            fix: "download again; if it persists the stored result is damaged",
          },
        );
      }
      await fs.rename(tmp, target);
      written.push({ file: target, sha256: digest });
    }
  }
  return written;
}

/** `shoal job run | list | describe | logs | stop | executions | history | get`. */
export const jobCommand: CommandModule = (cli) =>
  cli.command("job", "submit and follow jobs", (yargs) =>
    withApiOptions(yargs)
      .command(
        "run [spec]",
        "submit a job from a YAML/JSON spec, or a WASM module with --wasm",
        (y) =>
          y
            .positional("spec", { type: "string", describe: "job spec file (YAML or JSON)" })
            .option("wasm", { type: "string", describe: "run this WASM module (arguments after --)" })
            .option("name", {
              type: "string",
              describe: "job name for --wasm [default: the module's file name]",
            })
            .option("wait", {
              type: "boolean",
              describe: "follow the job to its final state; exit non-zero unless Completed",
            })
            .option("follow", {
              type: "boolean",
              describe: "stream the job's logs while it runs (implies --wait)",
            })
            .parserConfiguration({ "populate--": true }),
        async (argv: Args) => {
          const args = ((argv["--"] as string[] | undefined) ?? []).map(String);
          let spec: JobSpec;
          if (argv.wasm && argv.spec)
            throw new ShoalError("SHOAL_USAGE", "give a spec file or --wasm, not both");
          if (typeof argv.wasm === "string") {
            const module = await readFileChecked(argv.wasm);
            const name =
              (argv.name as string | undefined) ??
              path
                .basename(argv.wasm)
                .replace(/\.wasm$/, "")
                .replace(/[^A-Za-z0-9._-]/g, "-");
            spec = wasmJobSpec({ name, module, args });
          } else if (typeof argv.spec === "string") {
            spec = await loadJobSpecFile(argv.spec);
          } else {
            throw new ShoalError("SHOAL_USAGE", "name a job spec file or --wasm MODULE.wasm", {
              fix: "shoal job run job.yaml, or shoal job run --wasm hello.wasm -- ARGS",
            });
          }
          await withClient(argv, async (api) => {
            const JobID = await submitJob(api, spec);
            if (!argv.wait && !argv.follow) {
              if (json(argv)) printJson({ JobID });
              else process.stdout.write(`${JobID}\n`);
              return;
            }
            if (!json(argv)) process.stderr.write(`job ${JobID} submitted\n`);
            const logs = argv.follow ? streamLogs(api, JobID, true) : Promise.resolve();
            const job = await follow(api, JobID, !json(argv));
            await logs;
            if (json(argv)) printJson(job);
            else if (!argv.follow) printJob(job);
            if (job.State !== "Completed") {
              if (!json(argv)) process.stderr.write(`job ${JobID} ended ${job.State}: ${job.StateMessage}\n`);
              process.exitCode = 1;
            }
          });
        },
      )
      .command(
        "list",
        "list jobs, newest first",
        (y) =>
          y
            .option("state", { type: "string", describe: "only jobs in this state" })
            .option("label", {
              type: "string",
              array: true,
              describe: "only jobs with this label (k=v, repeatable)",
            })
            .option("limit", { type: "number", default: 100, describe: "at most this many" }),
        async (argv: Args) =>
          withClient(argv, async (api) => {
            const Items = await listJobs(api, {
              state: argv.state as string | undefined,
              labels: parseLabelOptions(argv.label),
              limit: argv.limit as number,
            });
            if (json(argv)) return printJson(Items);
            printTable(
              ["ID", "NAME", "TYPE", "STATE", "CREATED"],
              Items.map((j) => [j.ID, j.Name, j.Type, j.State, time(j.CreateTime)]),
            );
          }),
      )
      .command(
        "describe <id>",
        "a job with its executions and their output",
        (y) => y.positional("id", { type: "string", demandOption: true }),
        async (argv: Args) =>
          withClient(argv, async (api) => {
            const { Job } = await api.get<{ Job: JobView }>(`/api/v1/orchestrator/jobs/${argv.id}`);
            if (json(argv)) printJson(Job);
            else printJob(Job);
          }),
      )
      .command(
        "logs <id>",
        "the job's output; --follow streams it until the job ends",
        (y) =>
          y
            .positional("id", { type: "string", demandOption: true })
            .option("follow", { type: "boolean", alias: "f" }),
        async (argv: Args) =>
          withClient(argv, (api) => streamLogs(api, String(argv.id), Boolean(argv.follow))),
      )
      .command(
        "stop <id>",
        "stop a job",
        (y) => y.positional("id", { type: "string", demandOption: true }),
        async (argv: Args) =>
          withClient(argv, async (api) => {
            const r = await api.delete<{ JobID: string; State: string }>(
              `/api/v1/orchestrator/jobs/${argv.id}`,
            );
            if (json(argv)) printJson(r);
            else process.stdout.write(`${r.JobID} ${r.State}\n`);
          }),
      )
      .command(
        "executions <id>",
        "the job's executions",
        (y) => y.positional("id", { type: "string", demandOption: true }),
        async (argv: Args) =>
          withClient(argv, async (api) => {
            const { Items } = await api.get<{ Items: JobView["Executions"] }>(
              `/api/v1/orchestrator/jobs/${argv.id}/executions`,
            );
            if (json(argv)) printJson(Items);
            else printExecutions(Items);
          }),
      )
      .command(
        "history <id>",
        "the job's state changes",
        (y) => y.positional("id", { type: "string", demandOption: true }),
        async (argv: Args) =>
          withClient(argv, async (api) => {
            const { Items } = await api.get<{ Items: JobEvent[] }>(
              `/api/v1/orchestrator/jobs/${argv.id}/history`,
            );
            if (json(argv)) return printJson(Items);
            printTable(
              ["TIME", "EXECUTION", "STATE", "MESSAGE"],
              Items.map((e) => [time(e.Time), e.ExecutionID, e.State, e.Message]),
            );
          }),
      )
      .command(
        "get <id>",
        "download the job's result files into DIR/<execution>/, checking each digest",
        (y) =>
          y
            .positional("id", { type: "string", demandOption: true })
            .option("out", { type: "string", demandOption: true }),
        async (argv: Args) =>
          withClient(argv, async (api) => {
            const files = await download(argv, api, String(argv.id), String(argv.out));
            if (json(argv)) return printJson(files);
            for (const f of files) process.stdout.write(`${f.file}  sha256:${f.sha256}\n`);
          }),
      )
      .demandCommand(1, "name a subcommand; see shoal job --help"),
  );
