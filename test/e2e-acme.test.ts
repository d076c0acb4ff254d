import "reflect-metadata";
import { promises as fs } from "node:fs";
import https from "node:https";
import net from "node:net";
import path from "node:path";
import t from "tap";
import { peerCertificate } from "./helpers/api-tls.js";
import { startOrchestrator, tempDir } from "./helpers/cluster.js";
import { startPebble } from "./helpers/pebble.js";

/**
 * `API.TLS.AutoCert` through the real `shoal orchestrator serve`: the daemon
 * orders its API certificate from an ACME server (Debian's pebble), answers the
 * HTTP-01 challenge on port 80 of API.Host, and serves the issued certificate.
 * The private ACME directory is trusted the way an operator would trust one
 * (NODE_EXTRA_CA_CERTS); the daemon has no test-only hook here.
 */

/** Whether 127.0.0.1:80 can be bound (the HTTP-01 challenge port; the suite runs as root). */
async function port80Free(): Promise<boolean> {
  const s = net.createServer();
  return new Promise((resolve) => {
    s.once("error", () => resolve(false));
    s.listen(80, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

function get(url: string, opts: https.RequestOptions): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    https
      .get(url, opts, (res) => {
        let body = "";
        res.on("data", (d) => {
          body += d;
        });
        res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
      })
      .on("error", reject);
  });
}

const skip = (await port80Free()) ? false : "127.0.0.1:80 is taken: the HTTP-01 challenge listener needs it";

t.test("the orchestrator daemon serves its API with a certificate ordered over ACME", { skip }, async (t) => {
  const pebble = await startPebble(t, 80);
  const dir = await tempDir(t);
  const directoryCa = path.join(dir, "acme-directory-ca.pem");
  await fs.writeFile(directoryCa, pebble.caPem);
  const orch = await startOrchestrator(
    t,
    path.join(dir, "orch"),
    ["-c", "API.TLS.AutoCert=localhost", "-c", `API.TLS.AutoCertDirectory=${pebble.directoryUrl}`],
    { NODE_EXTRA_CA_CERTS: directoryCa },
  );
  t.teardown(() => {
    if (!t.passing()) t.comment(pebble.output());
  });
  t.match(pebble.output(), /Issued certificate serial/, "pebble validated the daemon's challenge and issued");
  // The banner's last lines may come after the ones startOrchestrator waited for.
  t.ok(
    await orch.proc.waitFor(/shoal agent alive\n/, 10_000),
    "the banner does not send clients to the fabric CA",
  );

  const pebbleRoot = (await get(`${pebble.managementUrl}/roots/0`, { ca: pebble.caPem })).body;
  const served = await peerCertificate(orch.apiPort, { servername: "localhost", ca: pebbleRoot });
  t.equal(served.checkHost("localhost"), "localhost", "the served certificate names the AutoCert domain");
  const alive = await get(`https://127.0.0.1:${orch.apiPort}/api/v1/agent/alive`, {
    ca: pebbleRoot,
    servername: "localhost",
  });
  t.equal(alive.status, 200, "a client trusting the ACME root talks to the API");

  // The fabric CA does not vouch for an ACME certificate: a client pinned to it is refused.
  const fabricCa = await fs.readFile(orch.ca, "utf8");
  await t.rejects(
    peerCertificate(orch.apiPort, { servername: "localhost", ca: fabricCa }),
    { code: "UNABLE_TO_GET_ISSUER_CERT_LOCALLY" },
    "the fabric CA does not verify the ACME certificate",
  );
  const cached = path.join(dir, "orch", "autocert", "localhost.crt");
  t.equal((await fs.stat(cached)).mode & 0o777, 0o600, "the ACME certificate is cached 0600 in the data dir");
});
