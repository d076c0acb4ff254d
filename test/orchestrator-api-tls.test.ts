import "reflect-metadata";
import https from "node:https";
import path from "node:path";
import t from "tap";
import { writeIssued } from "../pki/index.js";
import { peerCertificate } from "./helpers/api-tls.js";
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
  const agent = new https.Agent({ keepAlive: true, maxSockets: 2, ca: apiPki.caCertPem });
  t.teardown(() => agent.destroy());
  let okCount = 0;
  const failures: string[] = [];
  let stop = false;
  const request = () =>
    new Promise<void>((resolve) => {
      https
        .get({ host: "127.0.0.1", port: orch.apiPort, path: "/api/v1/agent/alive", agent }, (res) => {
          res.resume();
          res.on("end", () => {
            if (res.statusCode === 200) okCount++;
            else failures.push(`HTTP ${res.statusCode}`);
            resolve();
          });
        })
        .on("error", (err) => {
          failures.push(err.message);
          resolve();
        });
    });
  const loop = async () => {
    for (let i = 0; i < 20_000 && !stop; i++) await request();
  };
  const loops = [loop(), loop()];
  const until = async (cond: () => boolean, ms: number) => {
    const end = Date.now() + ms;
    while (!cond() && Date.now() < end) await new Promise((r) => setTimeout(r, 10));
  };
  await until(() => okCount >= 20, 20_000);

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
  const before = okCount;
  await until(() => okCount >= before + 20, 20_000);
  t.ok(okCount >= before + 20, `requests go on after the reload (${okCount - before} since)`);
  stop = true;
  await Promise.all(loops);
  t.same(failures, [], `no request failed across the reload (${okCount} succeeded)`);
  t.equal(orch.proc.child.exitCode, null, "SIGHUP does not stop the daemon");
});
