import "reflect-metadata";
import { jetstream } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import t from "tap";
import { silentLogger } from "../core/index.js";
import type { JobRecord } from "../orchestrator/records.js";
import { StateStore } from "../orchestrator/state-store.js";
import { startJetStream, tempDir } from "./helpers/cluster.js";
import { testNodeService } from "./helpers/node-service.js";

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
  const dir = await tempDir(t, "shoal-state-");
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

t.test(
  "in a cluster an orchestrator loads only the jobs it accepted (and their executions and history)",
  async (t) => {
    const url = await startJetStream(t, await tempDir(t, "shoal-state-owner-"));
    const nc = await connect({ servers: url });
    t.teardown(() => nc.close());
    const a = await StateStore.open(jetstream(nc), silentLogger, { owner: "orch-a" });
    a.putJob({ ...job("j-a", 1), Orchestrator: "orch-a" });
    a.putJob({ ...job("j-b", 2), Orchestrator: "orch-b" });
    a.putJob(job("j-legacy", 3));
    for (const id of ["j-a", "j-b"]) {
      a.putExecution({
        ID: `e-${id}`,
        JobID: id,
        NodeID: "n1",
        State: "Running",
        StateMessage: "running",
        Resources: { cpu: 0.1, memory: 1 },
        CreateTime: 1,
        ModifyTime: 1,
      });
      a.appendEvent({ Time: 1, JobID: id, Type: "JobStateUpdate", State: "Pending", Message: "submitted" });
    }
    await a.flush();

    const b = await StateStore.open(jetstream(nc), silentLogger, { owner: "orch-b" });
    t.same([...b.jobs.values()].map((j) => j.ID).sort(), ["j-b", "j-legacy"], "its own and unowned jobs");
    t.same(
      [...b.executions.values()].map((e) => e.ID),
      ["e-j-b"],
    );
    t.equal(b.events.get("j-a"), undefined);
    t.equal((await b.executions.stored("e-j-a"))?.JobID, "j-a", "the other's rows stay in KV");
    const single = await StateStore.open(jetstream(nc), silentLogger);
    t.equal(single.jobs.size, 3, "without an owner everything loads");
  },
);

t.test("in a cluster a register adopts the approval another orchestrator stored", async (t) => {
  const url = await startJetStream(t, await tempDir(t, "shoal-state-approval-"));
  const nc = await connect({ servers: url });
  t.teardown(() => nc.close());
  const service = async (owner: string) => {
    const store = await StateStore.open(jetstream(nc), silentLogger, { owner });
    return { store, nodes: testNodeService(t, store) };
  };
  const [a, b] = [await service("orch-a"), await service("orch-b")];
  const register = {
    nodeId: "n1",
    chainPem: "",
    labels: {},
    capacity: { cpu: 1, memory: 1 },
    engines: ["wasm"],
    version: "test",
    executions: [],
  };
  t.equal(a.nodes.register("n1", register, "").Approval, "PENDING");
  t.equal(b.nodes.register("n1", register, "", await b.store.nodes.stored("n1")).Approval, "PENDING");
  await a.nodes.approve("n1", "admin");
  t.equal(
    b.nodes.register("n1", register, "", await b.store.nodes.stored("n1")).Approval,
    "APPROVED",
    "approved at A, so B answers the node's next register with APPROVED",
  );
});
