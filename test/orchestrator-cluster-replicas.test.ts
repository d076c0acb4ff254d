import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { connect, type NatsConnection, TimeoutError } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { silentLogger } from "../core/index.js";
import { raiseOnOperatorCluster, raiseReplicas } from "../orchestrator/cluster.js";
import { freePort, spawnTied, tempDir } from "./helpers/cluster.js";

/**
 * A cluster grown to more orchestrators raises the copies of the buckets
 * made while it had fewer (nats-server 2.9 moves a stream from two copies to
 * three in place, its messages kept), and never lowers them.
 */

/** `count` JetStream servers routed into one cluster (plain TCP: only the replica count is under test); one URL. */
async function routedServers(t: Test, count: number): Promise<string> {
  const dir = await tempDir(t, "shoal-replicas-");
  const clientPorts = await Promise.all(Array.from({ length: count }, freePort));
  const routePorts = await Promise.all(Array.from({ length: count }, freePort));
  const routes = routePorts.map((p) => `nats-route://127.0.0.1:${p}`).join(", ");
  for (const [i, port] of clientPorts.entries()) {
    const conf = path.join(dir, `s${i}.conf`);
    await fs.writeFile(
      conf,
      `listen: 127.0.0.1:${port}\nserver_name: s${i}\njetstream { store_dir: "${path.join(dir, `s${i}`)}" }\n` +
        (count > 1
          ? `cluster { name: replicas, listen: 127.0.0.1:${routePorts[i]}, routes: [${routes}] }\n`
          : ""),
    );
    const child = spawnTied("nats-server", ["-c", conf], { stdio: "ignore" });
    const exited = new Promise((resolve) => child.once("exit", resolve));
    t.teardown(async () => {
      child.kill("SIGTERM");
      await exited;
    });
  }
  return `127.0.0.1:${clientPorts[0]}`;
}

/** `attempt` until it resolves, 50 times at most, 200 ms apart: the servers route and elect a leader within seconds. */
async function untilReady<T>(attempt: () => Promise<T>): Promise<T> {
  for (let i = 0; ; i++) {
    try {
      return await attempt();
    } catch (err) {
      if (i >= 50) throw err;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

t.test("the copies of the cluster's streams are raised to the count wanted, never lowered", async (t) => {
  const server = await routedServers(t, 3);
  const nc = await untilReady(() => connect({ servers: server }));
  t.teardown(() => nc.close());
  const js = jetstream(nc);
  // The meta leader is elected a moment after the servers route.
  const kv = await untilReady(() => new Kvm(js).create("shoal-jobs", { replicas: 2 }));
  await kv.put("j-1", "kept");
  const jsm = await js.jetstreamManager();
  const info = () => jsm.streams.info("KV_shoal-jobs");
  t.equal((await info()).config.num_replicas, 2);
  // Every update request the servers get (no accounts here: a plain subscriber sees them).
  let updates = 0;
  const spy = nc.subscribe("$JS.API.STREAM.UPDATE.>", {
    callback: () => {
      updates++;
    },
  });
  t.teardown(() => spy.unsubscribe());

  t.same(await raiseReplicas(nc, [await info()], 3, silentLogger), ["KV_shoal-jobs"]);
  t.equal((await info()).config.num_replicas, 3, "raised to three copies");
  t.equal((await kv.get("j-1"))?.string(), "kept", "its messages kept");
  await nc.flush();
  t.equal(updates, 1);
  t.same(
    await raiseReplicas(nc, [await info()], 3, silentLogger),
    [],
    "a stream with its count is left alone",
  );
  t.same(await raiseReplicas(nc, [await info()], 2, silentLogger), [], "never lowered");
  await nc.flush();
  t.equal(updates, 1, "and nothing is sent for them");
  t.equal((await info()).config.num_replicas, 3);
});

/**
 * An operator-run JetStream (external NATS) of `servers` servers, two buckets
 * made with one copy each as the orchestrator makes them there, then
 * {@link raiseOnOperatorCluster} (or {@link raiseReplicas} to `wanted`): the
 * copies each bucket ends with, and how many update requests the servers got.
 */
async function onOperatorServers(
  t: Test,
  servers: number,
  wanted?: number,
  through: (nc: NatsConnection) => NatsConnection = (nc) => nc,
) {
  const server = await routedServers(t, servers);
  const nc = await untilReady(() => connect({ servers: server }));
  t.teardown(() => nc.close());
  const js = jetstream(nc);
  for (const bucket of ["shoal-jobs", "shoal-nodes"]) {
    await untilReady(() => new Kvm(js).create(bucket, { replicas: 1 }));
  }
  let updates = 0;
  const spy = nc.subscribe("$JS.API.STREAM.UPDATE.>", {
    callback: () => {
      updates++;
    },
  });
  t.teardown(() => spy.unsubscribe());
  const jsm = await js.jetstreamManager();
  const infos = () => Promise.all(["KV_shoal-jobs", "KV_shoal-nodes"].map((s) => jsm.streams.info(s)));
  const raised =
    wanted === undefined
      ? await raiseOnOperatorCluster(through(nc), await infos(), silentLogger)
      : await raiseReplicas(through(nc), await infos(), wanted, silentLogger);
  await nc.flush();
  const copies = (await infos()).map((info) => info.config.num_replicas);
  return { raised, copies, updates };
}

t.test("an operator's clustered JetStream gives the buckets three copies", async (t) => {
  const { raised, copies, updates } = await onOperatorServers(t, 3);
  t.same(raised, ["KV_shoal-jobs", "KV_shoal-nodes"]);
  t.same(copies, [3, 3]);
  t.equal(updates, 2);
});

t.test("an operator's cluster of two servers gives two copies, three refused once", async (t) => {
  const { raised, copies, updates } = await onOperatorServers(t, 2);
  t.same(raised, ["KV_shoal-jobs", "KV_shoal-nodes"]);
  t.same(copies, [2, 2]);
  t.equal(updates, 3, "three asked for once, then two for each bucket");
});

t.test("a raise that gets no answer in time is asked again, not taken for a refusal", async (t) => {
  // The first update request fails as a timeout would (servers busy electing leaders), unsent.
  let failed = 0;
  const busy = (nc: NatsConnection) =>
    new Proxy(nc, {
      get(target, key, receiver) {
        if (key !== "request") return Reflect.get(target, key, receiver);
        return (subject: string, ...rest: unknown[]) =>
          subject.startsWith("$JS.API.STREAM.UPDATE.") && failed++ === 0
            ? Promise.reject(new TimeoutError())
            : (target.request as (...a: unknown[]) => unknown).call(target, subject, ...rest);
      },
    });
  const { raised, copies, updates } = await onOperatorServers(t, 3, undefined, busy);
  t.equal(failed, 3, "one failed, then one for each stream");
  t.same(raised, ["KV_shoal-jobs", "KV_shoal-nodes"]);
  t.same(copies, [3, 3], "three copies, not two");
  t.equal(updates, 2);
});

t.test("an operator's single server is left alone", async (t) => {
  const { raised, copies, updates } = await onOperatorServers(t, 1);
  t.same(raised, []);
  t.same(copies, [1, 1]);
  t.equal(updates, 0, "nothing is asked of it");
});

t.test(
  "a raise the servers refuse stops at the first stream: start-up waits one request at most",
  async (t) => {
    const { raised, copies, updates } = await onOperatorServers(t, 2, 3);
    t.same(raised, []);
    t.same(copies, [1, 1], "both keep their count until a later start");
    t.equal(updates, 1, "three copies asked for once, not for each stream");
  },
);
