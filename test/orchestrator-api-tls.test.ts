import "reflect-metadata";
import path from "node:path";
import t from "tap";
import { writeIssued } from "../pki/index.js";
import { keepAliveLoad, peerCertificate } from "./helpers/api-tls.js";
import { runShoal, startOrchestrator, tempDir } from "./helpers/cluster.js";
import { freshPki } from "./helpers/pki.js";

/**
 * The API TLS manager inside the real `shoal orchestrator serve`: operator
 * files swapped on SIGHUP while requests keep flowing, the default
 * certificate from the orchestrator's own PKI, and the CLI's --ca-cert and
 * --insecure against both.
 */

t.test("API.TLS.CertFile/KeyFile: served, reloaded on SIGHUP without failing a request", async (t) => {
  const { pki: apiPki, root } = await freshPki(t);
  const prefix = path.join(root, "api");
  const first = await apiPki.issue({ role: "server", id: "api-first", dns: ["api.test"], days: 2 });
  await writeIssued(prefix, first);
  const orch = await startOrchestrator(t, path.join(await tempDir(t), "orch"), [
    "-c",
    `API.TLS.CertFile=${prefix}.crt`,
    "-c",
    `API.TLS.KeyFile=${prefix}.key`,
  ]);
  const apiCa = path.join(apiPki.dir, "ca.crt");
  const served = async () =>
    `sha256:${(await peerCertificate(orch.apiPort, { ca: apiPki.caCertPem })).fingerprint256.replace(/:/g, "").toLowerCase()}`;
  t.equal(await served(), first.fingerprint, "the operator's certificate is served");

  const url = `https://127.0.0.1:${orch.apiPort}`;
  const ok = await runShoal(t, ["agent", "alive", "--api", url, "--ca-cert", apiCa]);
  t.equal(ok.code, 0, `--ca-cert with the API's CA works: ${ok.stderr}`);
  const wrongCa = await runShoal(t, ["agent", "alive", "--api", url, "--ca-cert", orch.ca]);
  t.not(wrongCa.code, 0, "another CA is refused");
  t.match(wrongCa.stderr, /SHOAL_API_TLS_UNKNOWN_CA/);
  const insecure = await runShoal(t, ["agent", "alive", "--api", url, "--insecure"]);
  t.equal(insecure.code, 0, "--insecure works");
  t.match(insecure.stderr, /WARNING: --insecure/, "--insecure warns");

  // Keep-alive requests run through the swap: none may fail.
  const load = keepAliveLoad(t, {
    port: orch.apiPort,
    path: "/api/v1/agent/alive",
    ca: apiPki.caCertPem,
    maxRequests: 20_000,
  });
  await load.more(20);

  const second = await apiPki.issue({ role: "server", id: "api-second", dns: ["api.test"], days: 2 });
  await writeIssued(prefix, second);
  orch.proc.child.kill("SIGHUP");
  const deadline = Date.now() + 15_000;
  let now = await served();
  while (now !== second.fingerprint && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 100));
    now = await served();
  }
  t.equal(now, second.fingerprint, "new connections get the new certificate");
  const before = load.ok();
  await load.more(20);
  t.ok(load.ok() >= before + 20, `requests go on after the reload (${load.ok() - before} since)`);
  await load.stop();
  t.same(load.failures, [], `no request failed across the reload (${load.ok()} succeeded)`);
  t.equal(orch.proc.child.exitCode, null, "SIGHUP does not stop the daemon");
});
