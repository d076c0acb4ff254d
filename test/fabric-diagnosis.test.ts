import "reflect-metadata";
import path from "node:path";
import t from "tap";
import { connectFabric, FABRIC_CODES, type FabricError } from "../fabric/index.js";
import { initPki, openPki, writeIssued } from "../pki/index.js";
import { startTestFabric, type TestFabric, type TestIdentity } from "./helpers/nats.js";

/** The error a client of `fabric` with `identity` gets when it dials (these tests expect one). */
async function refusal(fabric: TestFabric, identity: TestIdentity): Promise<FabricError> {
  return (await connectFabric({
    servers: fabric.url,
    caFile: fabric.caFile,
    certFile: identity.certFile,
    keyFile: identity.keyFile,
    identity: identity.spiffeId,
    connectTimeoutMs: 2000,
  }).catch((e) => e)) as FabricError;
}

// Client-side diagnosis of a broker the client cannot trust: the NATS client sees
// a timeout or a bare TLS error, Shoal's probe names the cause and the fix.

t.test("dialing an address the server certificate does not cover names it and the SANs", async (t) => {
  // The server certificate covers localhost and 127.0.0.1 only; the broker listens on 127.0.0.2.
  const fabric = await startTestFabric(t, { host: "127.0.0.2", jetStream: false });
  const n1 = await fabric.identity("compute", "n1");
  const err = await refusal(fabric, n1);
  t.equal(err.code, FABRIC_CODES.SHOAL_TLS_SAN_MISMATCH);
  t.match(err.message, "not 127.0.0.2");
  t.match(err.message, "127.0.0.1");
  t.match(err.message, "localhost");
  t.match(err.fix, "--ip 127.0.0.2");
  t.same(err.details.host, "127.0.0.2");
});

t.test("an expired server certificate is named as the server's", async (t) => {
  const fabric = await startTestFabric(t, {
    jetStream: false,
    serverCert: {
      notBefore: new Date(Date.now() - 3 * 86400_000),
      notAfter: new Date(Date.now() - 86400_000),
    },
  });
  const n1 = await fabric.identity("compute", "n1");
  const err = await refusal(fabric, n1);
  t.equal(err.code, FABRIC_CODES.SHOAL_TLS_SERVER_CERT_EXPIRED);
});

t.test("a server from another CA than the client's CA file is named", async (t) => {
  const fabric = await startTestFabric(t, { jetStream: false });
  // A client of another fabric: its certificate and CA file agree with each other, not with this server.
  const otherDir = path.join(fabric.dir, "other");
  await initPki(otherDir, { trustDomain: "test.local" });
  const other = await openPki(otherDir);
  const prefix = path.join(fabric.dir, "other-n1");
  await writeIssued(prefix, other.mint({ role: "compute", id: "n1" }));
  const err = (await connectFabric({
    servers: fabric.url,
    caFile: path.join(otherDir, "ca.crt"),
    certFile: `${prefix}.crt`,
    keyFile: `${prefix}.key`,
    identity: "spiffe://test.local/compute/n1",
    connectTimeoutMs: 2000,
  }).catch((e) => e)) as FabricError;
  t.equal(err.code, FABRIC_CODES.SHOAL_TLS_SERVER_UNKNOWN_CA);
  t.match(err.message, "ca.crt");
});
