import "reflect-metadata";
import path from "node:path";
import { jetstream } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import t from "tap";
import { silentLogger } from "../core/index.js";
import { JobService, type JobServiceOptions } from "../orchestrator/job-service.js";
import { type LogEntry, LogStore } from "../orchestrator/log-store.js";
import { StateStore } from "../orchestrator/state-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";
import { jobRecord } from "./helpers/records.js";

/** A log store whose reads wait for `open()`: the stored lines are being read while the test acts. */
class SlowLogStore extends LogStore {
  open: () => void = () => {};
  readonly #gate = new Promise<void>((resolve) => {
    this.open = resolve;
  });

  override async read(jobId: string): Promise<LogEntry[]> {
    await this.#gate;
    return super.read(jobId);
  }
}

t.test(
  "a job that ends while its stored lines are read still gets them all streamed before the end",
  async (t) => {
    const dir = await tempDir(t, "shoal-job-logs-");
    const nc = await connect({ servers: await startJetStream(t, path.join(dir, "js")) });
    t.teardown(() => nc.close());
    const store = await StateStore.open(jetstream(nc), silentLogger);
    t.teardown(() => store.close());
    const logs = new SlowLogStore(dir);
    await logs.init();
    const line = (Seq: number, Data: string): LogEntry => ({
      Time: Date.now(),
      ExecutionID: "e-1",
      Stream: "stdout",
      Seq,
      Data,
    });
    await logs.append("j-1", line(0, "stored\n"));
    const job = jobRecord("j-1", Date.now(), { State: "Running" });
    store.putJob(job);
    // followLogs needs only the store and the log store.
    const jobs = new JobService({ store, logs, log: silentLogger } as unknown as JobServiceOptions);

    const seen: string[] = [];
    const ended = new Promise<void>((resolve) =>
      jobs.followLogs(
        "j-1",
        (e) => seen.push(e.Data),
        () => {
          seen.push("(end)");
          resolve();
        },
      ),
    );
    await logs.append("j-1", line(1, "live\n"));
    store.putJob({ ...job, State: "Completed" });
    t.same(seen, [], "nothing is sent before the stored lines");
    logs.open();
    await ended;
    t.same(seen, ["stored\n", "live\n", "(end)"]);
  },
);
