import "reflect-metadata";
import { execFile } from "node:child_process";
import { promises as fs } from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import t from "tap";
import type { ApiResponseError } from "../cli/api-client.js";
import { type OrchestratorHandle, startOrchestratorCluster, tempDir, waitUntil } from "./helpers/cluster.js";
import { getJob, scrapeMetrics, submitJob, wasmEngine, writeSpec } from "./helpers/e2e-jobs.js";
import { fillBut, smallDisk, whySmallDisksCannot } from "./helpers/small-disk.js";

/**
 * One full disk in a cluster of three orchestrators, for real: C's data
 * directory is a 16 MiB tmpfs, and jobs submitted at A fill it through
 * JetStream's copies. nats-server 2.9.10 then hangs at C, and while C leads a
 * stream, no orchestrator can write to it. C's watchdog sees that its
 * JetStream does not answer and that its disk is the cause, and starts its
 * server again (without writing its config file, for which there is no room);
 * A and B, whose disks have room, never do. Needs root to mount (skipped
 * otherwise).
 */
const run = promisify(execFile);
const skip = await whySmallDisksCannot();
if (skip) {
  t.plan(0, `full-disk tests skipped: ${skip}`);
} else {
  t.setTimeout(300_000);
  t.test(
    "a clustered orchestrator whose disk fills starts its own server again; the others go on",
    async (t) => {
      const root = await tempDir(t, "shoal-cluster-disk-");
      const { a, b, c } = await startOrchestratorCluster(
        t,
        root,
        ["a", "b", "c"],
        // Nothing kept free: the disk fills up for real.
        () => ["-c", "Orchestrator.Storage.MinFree=0"],
        (dirs) => smallDisk(t, dirs[2]!, "16m"),
      );
      // Each job record carries 60 KB of input, which every server stores.
      const spec = await writeSpec(
        root,
        "heavy",
        wasmEngine(path.resolve("dist/wasm/hello.wasm")),
        `InputSources: [{Alias: text, Target: /inputs/in.txt, Source: {Type: inline, Params: {Content: "${"x".repeat(60_000)}"}}}]`,
        `Constraints: [{Key: pool, Operator: "=", Values: [nowhere]}]`,
      );
      const stored: string[] = [await submitJob(a, spec)];
      const serverOfC = () =>
        run("pgrep", ["-f", path.join(c.dataDir, "nats", "nats.conf")]).then(
          (r) => r.stdout.trim(),
          () => "",
        );
      const first = await serverOfC();
      const filler = await fillBut(c.dataDir, 150_000);

      // Submitted at A until C's server, out of room, hangs and C starts it again.
      const restarted = c.proc.waitFor(/stopping nats-server to start it again/, 120_000);
      let seen = false;
      void restarted.then(() => {
        seen = true;
      });
      for (let i = 0; i < 40 && !seen; i++) {
        const id = await submitJob(a, spec).catch((e: ApiResponseError) => e);
        if (typeof id === "string") stored.push(id);
        // Refused within 20 s, before the client's 30 s run out, while writes wait on C.
        else t.match(id, { status: 503, code: "SHOAL_ORCH_STATE_STORE" }, "not stored, and told so");
      }
      await restarted;
      t.match(
        c.proc.stderr(),
        /JetStream did not answer 3 times in a row \(\S+ has \d+\.\d MiB free, less than the least JetStream is left \(4\.0 MiB\)\)/,
        "C names its disk as the cause",
      );

      await waitUntil("C's server runs again, on its full disk", async () => {
        const now = await serverOfC();
        return now !== "" && now !== first ? now : undefined;
      });

      // With C's disk still full, A and B store jobs: C leads nothing any more.
      const storedAt = (o: OrchestratorHandle, name: string) =>
        waitUntil(`a job is stored at ${name}`, () => submitJob(o, spec).catch(() => undefined), 90_000, 500);
      for (let i = 0; i < 3; i++) stored.push(await storedAt(a, "A"), await storedAt(b, "B"));

      // Room again: C stores jobs too (its server may hang once more, and is started again), and
      // every job acknowledged on the way is there, read at C.
      await fs.rm(filler);
      stored.push(await storedAt(c, "C"));
      for (const id of stored) {
        // Queued by its owner once the store took the write (a job submitted late may still be Pending).
        const job = await waitUntil(
          `C reads ${id} Queued`,
          async () => {
            const j = await getJob(c, id).catch(() => undefined);
            return j?.State === "Queued" ? j : undefined;
          },
          60_000,
          500,
        );
        t.equal(job.State, "Queued", `${id} is kept`);
      }
      for (const [name, o] of [
        ["A", a],
        ["B", b],
      ] as const) {
        const metrics = await scrapeMetrics(o, await o.adminToken());
        t.equal(
          metrics.value("shoal_nats_server_restarts_total"),
          0,
          `${name}, with room, never restarts its server`,
        );
      }
      const atC = await scrapeMetrics(c, await c.adminToken());
      t.ok((atC.value("shoal_nats_server_restarts_total") ?? 0) >= 1, "C counts its restarts");
    },
  );
}
