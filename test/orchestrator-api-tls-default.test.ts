import "reflect-metadata";
import { X509Certificate } from "node:crypto";
import path from "node:path";
import t from "tap";
import { peerCertificate } from "./helpers/api-tls.js";
import { runShoal, startOrchestrator, tempDir } from "./helpers/cluster.js";

/** With no API.TLS settings the real `shoal orchestrator serve` serves a certificate from its own PKI. */

t.test("default: a certificate from the orchestrator's own PKI naming the hosts clients dial", async (t) => {
  const orch = await startOrchestrator(t, path.join(await tempDir(t), "orch"));
  const leaf = await peerCertificate(orch.apiPort, { ca: orch.pki.caCertPem });
  t.ok(leaf.checkIssued(new X509Certificate(orch.pki.issuerCertPem)), "issued by the fabric PKI");
  t.match(leaf.subjectAltName ?? "", /DNS:localhost/);
  t.match(leaf.subjectAltName ?? "", /IP Address:127\.0\.0\.1/);
  t.notMatch(leaf.subjectAltName ?? "", /0\.0\.0\.0/, "never the wildcard");
  const ok = await runShoal(t, ["agent", "alive", ...orch.api]);
  t.equal(ok.code, 0, `--ca-cert DATA-DIR/pki/ca.crt works: ${ok.stderr}`);
  const noCa = await runShoal(t, ["agent", "alive", "--api", `https://127.0.0.1:${orch.apiPort}`]);
  t.not(noCa.code, 0, "the system roots do not trust it");
  t.match(noCa.stderr, /SHOAL_API_TLS_UNKNOWN_CA/);
  t.match(noCa.stderr, /--ca-cert/, "the error names the fix");
  // SIGHUP with nothing changed keeps the certificate.
  orch.proc.child.kill("SIGHUP");
  await new Promise((r) => setTimeout(r, 500));
  const again = await peerCertificate(orch.apiPort, { ca: orch.pki.caCertPem });
  t.equal(again.fingerprint256, leaf.fingerprint256, "an unchanged certificate is kept");
});
