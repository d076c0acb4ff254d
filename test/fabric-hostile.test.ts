import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import { connect } from "@nats-io/transport-node";
import t from "tap";
import {
  connectFabric,
  FABRIC_CODES,
  type FabricError,
  type NatsSupervisorStatus,
  subjects,
} from "../fabric/index.js";
import { initPki, openPki, writeIssued } from "../pki/index.js";
import { joinFabric, startTestFabric } from "./helpers/nats.js";

const fabric = await startTestFabric(t);
const n1 = await fabric.identity("compute", "n1");
await fabric.identity("compute", "n2");
const orch = await fabric.identity("orchestrator", "o1");

/** The next client the broker refuses, as the supervisor decoded it from nats-server's log. */
function nextRejection(): Promise<Extract<NatsSupervisorStatus, { type: "client-rejected" }>["rejection"]> {
  const it = fabric.supervisor.status()[Symbol.asyncIterator]();
  return (async () => {
    for (;;) {
      const { value, done } = await it.next();
      if (done) throw new Error("supervisor closed");
      if (value.type === "client-rejected") {
        await it.return?.();
        return value.rejection;
      }
    }
  })();
}

/** Dials with nats.js directly (no Shoal pre-flight), so the broker itself must refuse. */
async function rawDial(tls: Record<string, string>): Promise<unknown> {
  try {
    const nc = await connect({ servers: fabric.url, tls, timeout: 3000, maxReconnectAttempts: 0 });
    await nc.close();
    return undefined;
  } catch (err) {
    return err;
  }
}

const node = await joinFabric(t, fabric, n1);
const orchestrator = await joinFabric(t, fabric, orch);

t.test("compute n1 cannot read other nodes, shared inboxes, JetStream, KV or result objects", async (t) => {
  for (const subject of [
    "shoal.compute.n2.>",
    "_INBOX.>",
    "_INBOX_n2.>",
    ">",
    "$JS.API.>",
    "$KV.>",
    "$O.>",
    "_INBOX_o1.>",
  ]) {
    await t.rejects(
      node.subscribe(subject),
      { code: FABRIC_CODES.SHOAL_NATS_PERMISSION, operation: "subscribe", subject },
      `subscribe ${subject}`,
    );
  }
});

t.test("compute n1 cannot publish as n2 or pose as the orchestrator", async (t) => {
  for (const subject of [
    "shoal.compute.n2.out.heartbeat",
    "shoal.compute.n2.out.result",
    "shoal.compute.n1.in",
    "shoal.broadcast.revocation",
    "$JS.API.STREAM.LIST",
    "$O.shoal-results.M.x",
    "_INBOX_o1.x",
  ]) {
    await t.rejects(
      node.publishConfirmed(subject, "x"),
      { code: FABRIC_CODES.SHOAL_NATS_PERMISSION, operation: "publish", subject },
      `publish ${subject}`,
    );
  }
});

t.test("the supervisor names the refused subject from the server's log", async (t) => {
  const rejected = nextRejection();
  node.publish("shoal.compute.n2.out.bid", "x");
  const r = await rejected;
  t.equal(r.code, FABRIC_CODES.SHOAL_NATS_PERMISSION);
  t.equal(r.user, n1.spiffeId);
  t.equal(r.subject, "shoal.compute.n2.out.bid");
});

t.test("n1's own subjects work, and it replies to the orchestrator via allow_responses", async (t) => {
  const sub = await node.subscribe(subjects.computeIn("n1"), {
    callback: (_err, msg) => {
      msg.respond(`pong:${msg.string()}`);
    },
  });
  t.teardown(() => sub.unsubscribe());
  const reply = await orchestrator.request(subjects.computeIn("n1"), "ping", 5000);
  t.equal(reply.string(), "pong:ping");
  t.match(reply.subject, /^_INBOX_o1\./, "the reply lands on the orchestrator's own inbox");

  const out = await orchestrator.subscribe(subjects.computeOutAny);
  t.teardown(() => out.unsubscribe());
  await node.publishConfirmed(subjects.computeOut("n1", "heartbeat"), "hb");
  const got = await out[Symbol.asyncIterator]().next();
  t.equal(got.value?.subject, "shoal.compute.n1.out.heartbeat");

  // The node's own requests are answered on _INBOX_n1 by the orchestrator (allow_responses).
  const reg = await orchestrator.subscribe(subjects.computeOut("n1", "register"), {
    callback: (_e, m) => {
      m.respond("ok");
    },
  });
  t.teardown(() => reg.unsubscribe());
  const r = await node.request(subjects.computeOut("n1", "register"), "hi", 5000);
  t.equal(r.string(), "ok");
  t.match(r.subject, /^_INBOX_n1\./);
});

t.test("a reply permission is one-shot: n1 cannot publish to the inbox again", async (t) => {
  let replyTo = "";
  const sub = await node.subscribe(subjects.computeIn("n1"), {
    max: 1,
    callback: (_e, msg) => {
      replyTo = msg.reply ?? "";
      msg.respond("first");
    },
  });
  t.teardown(() => sub.unsubscribe());
  t.equal((await orchestrator.request(subjects.computeIn("n1"), "x", 5000)).string(), "first");
  await t.rejects(node.publishConfirmed(replyTo, "second"), { code: FABRIC_CODES.SHOAL_NATS_PERMISSION });
});

t.test("the orchestrator identity can use JetStream KV over mTLS", async (t) => {
  const { Kvm } = await import("@nats-io/kv");
  const kvm = new Kvm(orchestrator.nc);
  const kv = await kvm.create("shoal-test");
  await kv.put("nodes.n1", "APPROVED");
  t.equal((await kv.get("nodes.n1"))?.string(), "APPROVED");
  const watch = await kv.watch({ key: "nodes.>" });
  await kv.put("nodes.n2", "PENDING");
  for await (const e of watch) {
    if (e.key === "nodes.n2") {
      t.equal(e.string(), "PENDING");
      break;
    }
  }
  watch.stop();
});

t.test("no client certificate is refused", async (t) => {
  const rejected = nextRejection();
  t.ok(await rawDial({ caFile: fabric.caFile }), "the broker refuses the bare TLS client");
  t.equal((await rejected).code, FABRIC_CODES.SHOAL_TLS_NO_CLIENT_CERT);
  const empty = path.join(fabric.dir, "empty.crt");
  await fs.writeFile(empty, "");
  await t.rejects(
    connectFabric({
      servers: fabric.url,
      caFile: fabric.caFile,
      certFile: empty,
      keyFile: empty,
      identity: n1.spiffeId,
    }),
    { code: FABRIC_CODES.SHOAL_TLS_NO_CLIENT_CERT },
  );
});

t.test("a certificate from a foreign CA is refused", async (t) => {
  const foreignDir = path.join(fabric.dir, "foreign");
  await initPki(foreignDir, { trustDomain: "test.local" });
  const foreign = await openPki(foreignDir);
  const prefix = path.join(fabric.dir, "foreign-n1");
  await writeIssued(prefix, foreign.mint({ role: "compute", id: "n1" }));
  const rejected = nextRejection();
  t.ok(await rawDial({ caFile: fabric.caFile, certFile: `${prefix}.crt`, keyFile: `${prefix}.key` }));
  t.equal((await rejected).code, FABRIC_CODES.SHOAL_TLS_CLIENT_UNKNOWN_CA);
  await t.rejects(
    connectFabric({
      servers: fabric.url,
      caFile: fabric.caFile,
      certFile: `${prefix}.crt`,
      keyFile: `${prefix}.key`,
      identity: n1.spiffeId,
    }),
    { code: FABRIC_CODES.SHOAL_TLS_CLIENT_UNKNOWN_CA },
  );
});

t.test("an expired certificate is refused", async (t) => {
  const expired = await fabric.identity("compute", "old", {
    notBefore: new Date(Date.now() - 3 * 86400_000),
    notAfter: new Date(Date.now() - 86400_000),
    admit: false,
  });
  const rejected = nextRejection();
  t.ok(await rawDial({ caFile: fabric.caFile, certFile: expired.certFile, keyFile: expired.keyFile }));
  t.equal((await rejected).code, FABRIC_CODES.SHOAL_TLS_CLIENT_CERT_EXPIRED);
  const err = (await connectFabric({
    servers: fabric.url,
    caFile: fabric.caFile,
    certFile: expired.certFile,
    keyFile: expired.keyFile,
    identity: expired.spiffeId,
  }).catch((e) => e)) as FabricError;
  t.equal(err.code, FABRIC_CODES.SHOAL_TLS_CLIENT_CERT_EXPIRED);
  t.ok(err.fix, "with a fix");
});

t.test("a not-yet-valid certificate is refused with its own code", async (t) => {
  const future = await fabric.identity("compute", "future", {
    notBefore: new Date(Date.now() + 86400_000),
    notAfter: new Date(Date.now() + 3 * 86400_000),
    admit: false,
  });
  await t.rejects(
    connectFabric({
      servers: fabric.url,
      caFile: fabric.caFile,
      certFile: future.certFile,
      keyFile: future.keyFile,
      identity: future.spiffeId,
    }),
    { code: FABRIC_CODES.SHOAL_TLS_CLIENT_CERT_NOT_YET_VALID },
  );
});

t.test("a server-auth-only certificate is refused (no clientAuth EKU)", async (t) => {
  const serverOnly = await fabric.identity("compute", "srvonly", { extKeyUsage: ["serverAuth"] });
  const rejected = nextRejection();
  t.ok(await rawDial({ caFile: fabric.caFile, certFile: serverOnly.certFile, keyFile: serverOnly.keyFile }));
  t.equal((await rejected).code, FABRIC_CODES.SHOAL_TLS_CLIENT_EKU);
  await t.rejects(
    connectFabric({
      servers: fabric.url,
      caFile: fabric.caFile,
      certFile: serverOnly.certFile,
      keyFile: serverOnly.keyFile,
      identity: serverOnly.spiffeId,
    }),
    { code: FABRIC_CODES.SHOAL_TLS_CLIENT_EKU },
  );
});

t.test("a valid certificate of an identity the broker does not know is an authorization error", async (t) => {
  const stranger = await fabric.identity("compute", "stranger", { admit: false });
  await t.rejects(
    connectFabric({
      servers: fabric.url,
      caFile: fabric.caFile,
      certFile: stranger.certFile,
      keyFile: stranger.keyFile,
      identity: stranger.spiffeId,
      connectTimeoutMs: 2000,
    }),
    { code: FABRIC_CODES.SHOAL_NATS_AUTHORIZATION },
  );
});

t.test("a key that is not the certificate's, or another identity's certificate, is named", async (t) => {
  await t.rejects(
    connectFabric({
      servers: fabric.url,
      caFile: fabric.caFile,
      certFile: n1.certFile,
      keyFile: orch.keyFile,
      identity: n1.spiffeId,
    }),
    { code: FABRIC_CODES.SHOAL_TLS_CLIENT_KEY_MISMATCH },
  );
  await t.rejects(
    connectFabric({
      servers: fabric.url,
      caFile: fabric.caFile,
      certFile: n1.certFile,
      keyFile: n1.keyFile,
      identity: orch.spiffeId,
    }),
    { code: FABRIC_CODES.SHOAL_TLS_CLIENT_IDENTITY },
  );
});

t.test("nothing listening is named with the address, not a bare CONNECTION_REFUSED", async (t) => {
  const port = fabric.supervisor.port === 1 ? 2 : 1;
  const err = (await connectFabric({
    servers: `tls://127.0.0.1:${port}`,
    caFile: fabric.caFile,
    certFile: n1.certFile,
    keyFile: n1.keyFile,
    identity: n1.spiffeId,
  }).catch((e) => e)) as FabricError;
  t.equal(err.code, FABRIC_CODES.SHOAL_NATS_UNREACHABLE);
  t.match(err.message, `127.0.0.1:${port}`);
  t.match(err.message, /ECONNREFUSED/);
});
