import "reflect-metadata";
import type { AddressInfo } from "node:net";
import tls from "node:tls";
import t from "tap";
import { type IssuedCertificate, verifyCertificate } from "../pki/index.js";
import { freshPki } from "./helpers/pki.js";

/** What each side saw of one mTLS connection attempt. */
interface Outcome {
  /** Bytes the client received: the server only writes after it accepted the client. */
  data: string;
  clientError?: string;
  serverSaw?: { authorized: boolean; error: string | null; san?: string };
  serverRejected: boolean;
}

async function connect(
  server: IssuedCertificate,
  client: IssuedCertificate,
  caPem: string,
  opts: { servername?: string; rejectUnauthorized?: boolean } = {},
): Promise<Outcome> {
  const outcome: Outcome = { data: "", serverRejected: false };
  const srv = tls.createServer(
    {
      cert: server.certPem,
      key: server.keyPem!,
      ca: caPem,
      requestCert: true,
      rejectUnauthorized: opts.rejectUnauthorized ?? true,
    },
    (sock) => {
      const peer = sock.getPeerCertificate();
      outcome.serverSaw = {
        authorized: sock.authorized,
        error: sock.authorizationError ? String(sock.authorizationError) : null,
        ...(peer.subjectaltname ? { san: peer.subjectaltname } : {}),
      };
      sock.end("hello");
    },
  );
  srv.on("tlsClientError", () => {
    outcome.serverRejected = true;
  });
  await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
  try {
    await new Promise<void>((resolve) => {
      const sock = tls.connect({
        host: "127.0.0.1",
        port: (srv.address() as AddressInfo).port,
        servername: opts.servername ?? "localhost",
        ca: caPem,
        cert: client.certPem,
        key: client.keyPem!,
      });
      sock.on("data", (d) => {
        outcome.data += d;
      });
      sock.on("error", (err: NodeJS.ErrnoException) => {
        outcome.clientError = err.code ?? err.message;
      });
      sock.on("close", () => resolve());
    });
  } finally {
    await new Promise((resolve) => srv.close(resolve));
  }
  return outcome;
}

t.test("a server and a compute certificate from the PKI complete an mTLS handshake", async (t) => {
  const { pki } = await freshPki(t);
  const server = await pki.issue({ role: "server" });
  const client = await pki.issue({ role: "compute", id: "edge-1" });
  const out = await connect(server, client, pki.caCertPem);
  t.equal(out.clientError, undefined);
  t.equal(out.data, "hello");
  t.same(out.serverSaw, { authorized: true, error: null, san: "URI:spiffe://shoal.local/compute/edge-1" });
});

t.test("a client certificate from a foreign CA is refused by the server", async (t) => {
  const { pki } = await freshPki(t);
  const { pki: other } = await freshPki(t);
  const server = await pki.issue({ role: "server" });
  const client = await other.issue({ role: "compute", id: "edge-1" });
  const refused = await connect(server, client, pki.caCertPem);
  t.equal(refused.data, "", "the server never accepted the client");
  t.ok(refused.serverRejected);
  const seen = await connect(server, client, pki.caCertPem, { rejectUnauthorized: false });
  t.equal(seen.serverSaw?.error, "UNABLE_TO_GET_ISSUER_CERT_LOCALLY");
  const ours = verifyCertificate(client.certPem, { caPem: pki.caCertPem, role: "compute" });
  t.same(!ours.ok && ours.failures.map((f) => f.code), ["SHOAL_PKI_UNTRUSTED"], "verify agrees");
});

t.test("a client certificate without the clientAuth EKU is refused", async (t) => {
  const { pki } = await freshPki(t);
  const server = await pki.issue({ role: "server" });
  const client = await pki.issue({ role: "compute", id: "edge-1", extKeyUsage: ["serverAuth"] });
  const refused = await connect(server, client, pki.caCertPem);
  t.equal(refused.data, "");
  t.ok(refused.serverRejected);
  const seen = await connect(server, client, pki.caCertPem, { rejectUnauthorized: false });
  t.equal(seen.serverSaw?.error, "INVALID_PURPOSE");
  const ours = verifyCertificate(client.certPem, { caPem: pki.caCertPem, role: "compute" });
  t.same(!ours.ok && ours.failures.map((f) => f.code), ["SHOAL_PKI_EKU"], "verify agrees");
});

t.test("the client refuses a server certificate for another name", async (t) => {
  const { pki } = await freshPki(t);
  const server = await pki.issue({ role: "server", dns: ["orch.example.com"] });
  const client = await pki.issue({ role: "compute", id: "edge-1" });
  const out = await connect(server, client, pki.caCertPem, { servername: "other.example.com" });
  t.equal(out.clientError, "ERR_TLS_CERT_ALTNAME_INVALID");
  t.equal(out.data, "");
  const ours = verifyCertificate(server.certPem, { caPem: pki.caCertPem, host: "other.example.com" });
  t.same(!ours.ok && ours.failures.map((f) => f.code), ["SHOAL_PKI_HOST_MISMATCH"], "verify agrees");
  t.ok((await connect(server, client, pki.caCertPem, { servername: "orch.example.com" })).data === "hello");
});

t.test("the client refuses an expired server certificate", async (t) => {
  const { pki } = await freshPki(t);
  const day = 86_400_000;
  const server = await pki.issue({
    role: "server",
    notBefore: new Date(Date.now() - 2 * day),
    notAfter: new Date(Date.now() - day),
  });
  const client = await pki.issue({ role: "compute", id: "edge-1" });
  const out = await connect(server, client, pki.caCertPem);
  t.equal(out.clientError, "CERT_HAS_EXPIRED");
  const ours = verifyCertificate(server.certPem, { caPem: pki.caCertPem, role: "server" });
  t.same(!ours.ok && ours.failures.map((f) => f.code), ["SHOAL_PKI_EXPIRED"], "verify agrees");
});
