import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import t from "tap";
import {
  connectFabric,
  FABRIC_CODES,
  type NatsClusterState,
  NatsSupervisor,
  type NatsSupervisorStatus,
  routeCertificateName,
} from "../fabric/index.js";
import { initPki, openPki, writeIssued } from "../pki/index.js";
import { joinFabric, startTestFabric } from "./helpers/nats.js";

const TD = "test.local";

/**
 * Real nats-servers routed into one cluster by the generated `cluster {}`
 * block: messages cross between servers of the same fabric CA, and a route
 * is refused from a server whose certificate is from another CA, or from the
 * fabric CA but without the route name (a node identity certificate).
 */
t.test("servers of one fabric CA route; others are refused with SHOAL_NATS_ROUTE_REJECTED", async (t) => {
  const one = await startTestFabric(t, {
    jetStream: false,
    serverCert: { dns: ["localhost", routeCertificateName(TD)] },
  });
  const serverCert = {
    certFile: path.join(one.dir, "server.crt"),
    keyFile: path.join(one.dir, "server.key"),
  };
  const cluster = (routes: string[], tls = { ...serverCert, caFile: one.caFile }): NatsClusterState => ({
    name: "shoal-test",
    host: "127.0.0.1",
    port: -1,
    routes,
    routeName: routeCertificateName(TD),
    tls,
  });
  // Server one listens for routes (restarted with a route listener on a port nats-server picks).
  await one.supervisor.close();
  const orch = await one.identity("orchestrator", "orch");
  const start = async (dir: string, c: NatsClusterState, tls = { ...serverCert, caFile: one.caFile }) => {
    const s = new NatsSupervisor({
      dir: path.join(one.dir, dir),
      host: "127.0.0.1",
      port: -1,
      serverName: dir,
      tls,
      identities: [orch.broker],
      jetStream: false,
      cluster: c,
    });
    t.teardown(() => s.close());
    await s.start();
    return s;
  };
  const a = await start("a", cluster([]));
  t.ok(a.routePort && a.routePort > 0, "the chosen route port is read back");
  const b = await start("b", cluster([`127.0.0.1:${a.routePort}`]));
  t.match(
    await fs.readFile(b.configFile, "utf8"),
    /verify_and_map: true[\s\S]*user: "nats-route.test.local"/,
  );

  // A message published at b reaches a subscriber at a once the route is up.
  const connect = (url: string) =>
    connectFabric({
      servers: url,
      caFile: one.caFile,
      certFile: orch.certFile,
      keyFile: orch.keyFile,
      identity: orch.spiffeId,
    });
  const [atA, atB] = [await connect(a.url), await connect(b.url)];
  t.teardown(() => Promise.all([atA.close(), atB.close()]));
  const got = new Promise<string>((resolve) => {
    void atA.subscribe("shoal.broadcast.test", { callback: (_e, m) => resolve(m.string()) });
  });
  await atA.nc.flush();
  let delivered: string | undefined;
  void got.then((v) => {
    delivered = v;
  });
  for (let i = 0; i < 100 && delivered === undefined; i++) {
    atB.publish("shoal.broadcast.test", "across the route");
    await new Promise((r) => setTimeout(r, 100));
  }
  t.equal(delivered, "across the route", "routed between the two servers");

  const rejections = async (trigger: () => Promise<unknown>): Promise<NatsSupervisorStatus[]> => {
    const seen: NatsSupervisorStatus[] = [];
    const it = a.status()[Symbol.asyncIterator]();
    const collect = (async () => {
      for (;;) {
        const next = await it.next();
        if (next.done) return;
        if (next.value.type === "route-rejected") {
          seen.push(next.value);
          return;
        }
      }
    })();
    await trigger();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([collect, new Promise((r) => (timer = setTimeout(r, 15_000)))]);
    clearTimeout(timer);
    await it.return?.();
    return seen;
  };

  // Another CA (its certificate even carries the route name).
  const otherDir = path.join(one.dir, "other-pki");
  await initPki(otherDir, { trustDomain: TD });
  const other = await openPki(otherDir);
  await writeIssued(
    path.join(one.dir, "rogue"),
    other.mint({ role: "server", dns: [routeCertificateName(TD)] }),
  );
  const foreignTls = {
    certFile: path.join(one.dir, "rogue.crt"),
    keyFile: path.join(one.dir, "rogue.key"),
    caFile: path.join(otherDir, "ca.crt"),
  };
  const foreign = await rejections(() =>
    start("rogue", cluster([`127.0.0.1:${a.routePort}`], foreignTls), foreignTls),
  );
  t.equal(
    foreign[0]?.type === "route-rejected" && foreign[0].rejection.code,
    FABRIC_CODES.SHOAL_NATS_ROUTE_REJECTED,
  );

  // The fabric CA, but a compute identity certificate (URI SAN only, no route name).
  const node = await one.identity("compute", "n1", { admit: false });
  const nodeTls = { certFile: node.certFile, keyFile: node.keyFile, caFile: one.caFile };
  const sameCa = await rejections(() =>
    start("node-as-route", cluster([`127.0.0.1:${a.routePort}`], nodeTls), nodeTls),
  );
  t.equal(
    sameCa[0]?.type === "route-rejected" && sameCa[0].rejection.code,
    FABRIC_CODES.SHOAL_NATS_ROUTE_REJECTED,
  );
  t.match(sameCa[0]?.type === "route-rejected" ? sameCa[0].rejection.reason : "", /authentication error/);
});

/**
 * nats-server 2.9 does not carry the streams of a server that ran alone into
 * a cluster (it lists none of them and treats them as orphans), so a
 * supervised server whose store holds such streams is not started with a
 * cluster: the orchestrator's state stays on disk, whole.
 */
t.test(
  "a store written without a cluster is refused for a cluster with SHOAL_NATS_STANDALONE_STORE",
  async (t) => {
    const fabric = await startTestFabric(t, { serverCert: { dns: ["localhost", routeCertificateName(TD)] } });
    const orch = await fabric.identity("orchestrator", "orch");
    const conn = await joinFabric(t, fabric, orch);
    const kv = await new Kvm(jetstream(conn.nc)).create("shoal-jobs");
    await kv.put("j-1", "stored alone");
    await conn.close();
    await fabric.supervisor.close();

    const dir = path.join(fabric.dir, "nats");
    const tls = {
      certFile: path.join(fabric.dir, "server.crt"),
      keyFile: path.join(fabric.dir, "server.key"),
      caFile: fabric.caFile,
    };
    const clustered = new NatsSupervisor({
      dir,
      host: "127.0.0.1",
      port: -1,
      serverName: "orch-1",
      tls,
      identities: [orch.broker],
      cluster: {
        name: "shoal-test",
        host: "127.0.0.1",
        port: -1,
        routes: [],
        routeName: routeCertificateName(TD),
        tls,
      },
    });
    t.teardown(() => clustered.close());
    await t.rejects(clustered.start(), {
      code: FABRIC_CODES.SHOAL_NATS_STANDALONE_STORE,
      message: /KV_shoal-jobs/,
    });

    // Alone again, the server finds the state as it was.
    const alone = new NatsSupervisor({ dir, host: "127.0.0.1", port: -1, tls, identities: [orch.broker] });
    t.teardown(() => alone.close());
    await alone.start();
    const again = await connectFabric({
      servers: alone.url,
      caFile: fabric.caFile,
      certFile: orch.certFile,
      keyFile: orch.keyFile,
      identity: orch.spiffeId,
    });
    t.teardown(() => again.close());
    const entry = await (await new Kvm(jetstream(again.nc)).open("shoal-jobs")).get("j-1");
    t.equal(entry?.string(), "stored alone");
  },
);
