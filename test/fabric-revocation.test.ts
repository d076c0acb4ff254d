import "reflect-metadata";
import t from "tap";
import {
  connectFabric,
  FABRIC_CODES,
  type FabricConnection,
  type FabricStatus,
  type NatsSupervisorStatus,
} from "../fabric/index.js";
import { startTestFabric, type TestIdentity } from "./helpers/nats.js";

/** A bound far beyond "within seconds", only so a regression fails instead of hanging. */
const GENEROUS_MS = 30_000;

function within<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`${what} did not happen within ${GENEROUS_MS} ms`)),
        GENEROUS_MS,
      );
    }),
  ]);
}

/** The next event matching `pred`; the iterator stays open for later calls. */
async function until<T extends { type: string }>(
  events: AsyncIterator<T>,
  pred: (e: T) => boolean,
): Promise<T> {
  for (;;) {
    const { value, done } = await events.next();
    if (done) throw new Error("stream ended");
    if (pred(value)) return value;
  }
}

function listen<T>(stream: AsyncIterable<T>): AsyncIterator<T> {
  return stream[Symbol.asyncIterator]();
}

const fabric = await startTestFabric(t, { jetStream: false });

async function join(id: TestIdentity, diagnoseAfterMs?: number): Promise<FabricConnection> {
  const c = await connectFabric({
    servers: fabric.url,
    caFile: fabric.caFile,
    certFile: id.certFile,
    keyFile: id.keyFile,
    identity: id.spiffeId,
    reconnectTimeWaitMs: 200,
    reconnectJitterMs: 100,
    ...(diagnoseAfterMs ? { diagnoseAfterMs } : {}),
  });
  t.teardown(() => c.close());
  return c;
}

t.test("revoking an identity removes its user and closes its live connection", async (t) => {
  const n1 = await fabric.identity("compute", "n1");
  const conn = await join(n1);
  await conn.flush();
  fabric.identities = fabric.identities.map((i) =>
    i.spiffeId === n1.spiffeId ? { ...i, revoked: true } : i,
  );
  const reloaded = until(listen(fabric.supervisor.status()), (e) => e.type === "reloaded");
  await fabric.supervisor.setIdentities(fabric.identities);
  t.notOk(
    ((await reloaded) as Extract<NatsSupervisorStatus, { type: "reloaded" }>).users.includes(n1.spiffeId),
    "n1 is no longer a broker user",
  );
  const error = await within(conn.closed(), "closing the revoked connection");
  t.equal(error?.code, FABRIC_CODES.SHOAL_NATS_AUTHORIZATION, "closed with the reason");
});

t.test("an expiring certificate is dropped at its notAfter without any call", async (t) => {
  const short = await fabric.identity("compute", "short", {
    notBefore: new Date(Date.now() - 60_000),
    notAfter: new Date(Date.now() + 3_000),
  });
  const conn = await join(short, 300);
  const events = listen(conn.status());
  t.ok(fabric.supervisor.users.users.some((u) => u.user === short.spiffeId));
  await within(
    until(events, (e) => e.type === "disconnected"),
    "closing the expired connection",
  );
  t.notOk(
    fabric.supervisor.users.users.some((u) => u.user === short.spiffeId),
    "no longer a user",
  );
  // The client keeps trying (a renewed certificate file is picked up at reconnect) and says why it cannot.
  const diagnosed = (await within(
    until(events, (e) => e.type === "error"),
    "diagnosing the expired certificate",
  )) as Extract<FabricStatus, { type: "error" }>;
  t.equal(diagnosed.error.code, FABRIC_CODES.SHOAL_TLS_CLIENT_CERT_EXPIRED);
});

t.test("revoking one of two certificates of an identity locks out only that key", async (t) => {
  const a = await fabric.identity("compute", "n5");
  const b = await fabric.identity("compute", "n5");
  const connA = await join(a, 300);
  const events = listen(connA.status());
  fabric.identities = fabric.identities.map((i) =>
    i.publicKeySha256 === a.broker.publicKeySha256 ? { ...i, revoked: true } : i,
  );
  await fabric.supervisor.setIdentities(fabric.identities);
  t.ok(
    fabric.supervisor.users.users.some((u) => u.user === a.spiffeId),
    "the identity stays a user",
  );
  const diagnosed = (await within(
    until(events, (e: FabricStatus) => e.type === "error"),
    "diagnosing the refused key",
  )) as Extract<FabricStatus, { type: "error" }>;
  t.equal(diagnosed.error.code, FABRIC_CODES.SHOAL_NATS_AUTHORIZATION, "the disconnected holder learns why");
  const connB = await join(b);
  await connB.flush();
  t.pass("the other certificate still connects");
});

t.test("a crashed nats-server is restarted on the same port and clients reconnect", async (t) => {
  const n7 = await fabric.identity("compute", "n7");
  const conn = await join(n7);
  const port = fabric.supervisor.port;
  const sup = listen(fabric.supervisor.status());
  const client = listen(conn.status());
  process.kill(fabric.supervisor.pid as number, "SIGKILL");
  const exited = await within(
    until(sup, (e) => e.type === "exited"),
    "noticing the crash",
  );
  t.equal((exited as Extract<NatsSupervisorStatus, { type: "exited" }>).signal, "SIGKILL");
  const ready = await within(
    until(sup, (e) => e.type === "ready"),
    "restarting",
  );
  t.equal((ready as Extract<NatsSupervisorStatus, { type: "ready" }>).port, port);
  await within(
    until(client, (e) => e.type === "reconnected"),
    "reconnecting",
  );
  await conn.flush();
  t.pass("the connection works again");
});

t.test("close is idempotent and closed() resolves without error", async (t) => {
  const n8 = await fabric.identity("compute", "n8");
  const conn = await join(n8);
  const first = conn.close();
  t.equal(conn.close(), first, "same promise");
  t.equal(await first, undefined);
  t.equal(await conn.closed(), undefined);
});
