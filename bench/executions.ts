/**
 * A compute node's own cost per execution, the engine left out: the
 * ExecutionManager with a runner that does nothing, its work directory,
 * marker, result spool entry and the entry's removal on acknowledgement, with
 * CONCURRENCY executions in flight. Two rows alternate in each round:
 *
 * - an `exec` job: a work directory made and removed for every execution
 *   (the baseline: every execution was handled so before);
 * - a WASM job without inputs: its work directory given back for the next
 *   execution when it is found as it was made (workDirReusable).
 *
 * Per execution: wall time, and CPU time of the whole process (user + system,
 * the libuv threads included). On ext4, creating inodes while others are
 * deleted at this rate costs kernel time, which is what the second row saves.
 *
 *   npm run bench:executions [-- EXECUTIONS=3000 [CONCURRENCY=8]]
 */
import "reflect-metadata";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { ExecutionManager, failedOutcome, ResultSpool } from "../compute/index.js";
import { type JobSpec, parseJobSpec, silentLogger } from "../core/index.js";

const EXECUTIONS = Number(process.argv[2] ?? 3000);
const CONCURRENCY = Number(process.argv[3] ?? 8);
const ROUNDS = 3;

const root = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-bench-executions-"));
const task = (Engine: unknown) => ({ Name: "main", Engine });
const specs: Record<string, JobSpec> = {
  "exec job: work directory made and removed": parseJobSpec({
    Name: "exec",
    Tasks: [task({ Type: "exec", Params: { Command: "/bin/true" } })],
  }),
  "WASM job: work directory given back": parseJobSpec({
    Name: "wasm",
    // The runner never looks at the module: the smallest valid one.
    Tasks: [
      task({
        Type: "wasm",
        Params: { EntryModule: { Type: "inline", Params: { Content: "AGFzbQEAAAA=" } } },
      }),
    ],
  }),
};
const submitter = { sub: "bench", namespace: "default", method: "password" };

/** Runs EXECUTIONS executions of `spec`, CONCURRENCY at a time; ms of wall and CPU time per execution. */
async function measure(dir: string, spec: JobSpec): Promise<{ wall: number; cpu: number }> {
  const spool = new ResultSpool(path.join(dir, "spool"));
  await spool.init();
  let started = 0;
  let acknowledged = 0;
  let finish!: () => void;
  const finished = new Promise<void>((resolve) => {
    finish = resolve;
  });
  const manager = new ExecutionManager({
    root: path.join(dir, "executions"),
    spool,
    log: silentLogger,
    onLog: () => {},
    onCancelled: () => {},
    runner: async (ctx) => ({
      ...failedOutcome(ctx.executionId, "unused"),
      state: "Completed",
      exitCode: 0,
      files: [],
    }),
    // Acknowledged at once, as an orchestrator that stored it: the entry is removed.
    onResult: (entry, stored) =>
      void stored
        .then(() => spool.remove(entry.result.executionId))
        .then(() => {
          acknowledged++;
          if (started < EXECUTIONS) start();
          else if (acknowledged === EXECUTIONS) finish();
        }),
  });
  const start = () =>
    manager.start({ jobId: "j", executionId: `e-${started++}`, spec, submitter, timeoutMs: 60_000 });
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  for (let i = 0; i < CONCURRENCY; i++) start();
  await finished;
  const wall = performance.now() - t0;
  const cpu = process.cpuUsage(cpu0);
  await manager.drain(1000);
  return { wall: wall / EXECUTIONS, cpu: (cpu.user + cpu.system) / 1000 / EXECUTIONS };
}

const results = new Map<string, { wall: number; cpu: number }[]>();
try {
  for (let round = 0; round < ROUNDS; round++) {
    for (const [name, spec] of Object.entries(specs)) {
      const run = await measure(path.join(root, `${round}-${spec.Name}`), spec);
      results.set(name, [...(results.get(name) ?? []), run]);
    }
  }
} finally {
  await fs.rm(root, { recursive: true, force: true });
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? Number.NaN;
const [baseline] = [...results.values()].map((runs) => median(runs.map((r) => r.cpu)));
console.log(
  `load average ${os
    .loadavg()
    .map((l) => l.toFixed(1))
    .join(" ")} on ${os.cpus().length} cores`,
);
console.log(
  `${EXECUTIONS} executions × ${ROUNDS} rounds, ${CONCURRENCY} in flight, in ${os.tmpdir()}; medians`,
);
console.log(
  `${"row".padEnd(44)}${"wall/exec".padStart(12)}${"CPU/exec".padStart(12)}${"× exec".padStart(9)}`,
);
for (const [name, runs] of results) {
  const cpu = median(runs.map((r) => r.cpu));
  const wall = median(runs.map((r) => r.wall));
  console.log(
    `${name.padEnd(44)}${`${wall.toFixed(3)} ms`.padStart(12)}${`${cpu.toFixed(3)} ms`.padStart(12)}${(cpu / (baseline ?? cpu)).toFixed(2).padStart(9)}`,
  );
}
