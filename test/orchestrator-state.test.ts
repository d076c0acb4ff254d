import "reflect-metadata";
import { spawn } from "node:child_process";
import { promises as fs } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { jetstream } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import t from "tap";
import { silentLogger } from "../core/index.js";
import type { JobRecord } from "../orchestrator/records.js";
import { StateStore } from "../orchestrator/state-store.js";

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

/** A plain loopback nats-server with JetStream in `dir`, for state-store tests (no fabric involved). */
async function startJetStream(t: { teardown: (fn: () => void) => void }, dir: string): Promise<string> {
  const port = await freePort();
  const child = spawn("nats-server", ["-js", "-a", "127.0.0.1", "-p", String(port), "-sd", dir], {
    stdio: "ignore",
  });
  t.teardown(() => {
    child.kill("SIGTERM");
  });
  const url = `127.0.0.1:${port}`;
  for (let i = 0; i < 100; i++) {
    const nc = await connect({ servers: url, reconnect: false }).catch(() => undefined);
    if (nc) {
      await nc.close();
      return url;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error("nats-server did not start");
}

function job(id: string, createTime: number): JobRecord {
  return {
    ID: id,
    Name: id,
    Namespace: "default",
    Type: "batch",
    Spec: { Name: id },
    Submitter: { sub: "anonymous", namespace: "default", method: "anonymous" },
    State: "Pending",
    StateMessage: "submitted",
    Count: 1,
    Retries: 0,
    CreateTime: createTime,
    ModifyTime: createTime,
  };
}

t.test("state survives a reconnect: memory first, KV behind, coalesced writes", async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-state-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const url = await startJetStream(t, dir);

  const nc = await connect({ servers: url });
  const store = await StateStore.open(jetstream(nc), silentLogger);
  const seen: string[] = [];
  const unwatch = store.watchJob("j-1", (c) => seen.push(c.type));
  let j = job("j-1", 1);
  store.putJob(j);
  j = store.setJobState(j, "Queued", "waiting for a node");
  j = store.setJobState(j, "Running", "placed");
  store.putExecution({
    ID: "e-1",
    JobID: "j-1",
    NodeID: "n1",
    State: "Running",
    StateMessage: "running",
    Resources: { cpu: 0.1, memory: 1024 },
    CreateTime: 2,
    ModifyTime: 2,
  });
  store.putJob(job("j-2", 3));
  store.jobs.delete("j-2");
  await store.flush();
  unwatch();
  t.same(seen, ["job", "job", "event", "job", "event", "execution"], "watchers see every change in order");
  t.equal(j.QueuedSince !== undefined, true, "queueing is timestamped");
  await nc.close();

  // A fresh process reads the same state back.
  const nc2 = await connect({ servers: url });
  t.teardown(() => nc2.close());
  const again = await StateStore.open(jetstream(nc2), silentLogger);
  t.equal(again.jobs.get("j-1")?.State, "Running");
  t.notOk(again.jobs.has("j-2"), "a deleted key stays deleted");
  t.same(
    again.history("j-1").map((e) => e.State),
    ["Queued", "Running"],
  );
  t.same(
    again.executionsOf("j-1").map((e) => e.ID),
    ["e-1"],
    "the job → executions index is rebuilt",
  );
});
