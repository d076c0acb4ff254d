import "reflect-metadata";
import { promises as fs } from "node:fs";
import https from "node:https";
import os from "node:os";
import path from "node:path";
import t from "tap";
import { defaultConfig } from "../core/index.js";
import {
  type ApiTlsConfig,
  ApiTlsManager,
  apiCertificateNames,
  canonicalIp,
} from "../orchestrator/api-tls.js";
import { nextEvent, peerCertificate, serveWith } from "./helpers/api-tls.js";
import { freshPki, openssl } from "./helpers/pki.js";

function apiConfig(host: string, tls: Partial<ApiTlsConfig["TLS"]> = {}): ApiTlsConfig {
  const api = defaultConfig().API;
  return { Host: host, TLS: { ...api.TLS, ...tls } };
}

function get(port: number, host: string, ca: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    https
      .get({ host, port, path: "/api/v1/agent/alive", ca, agent: false }, (res) => {
        let body = "";
        res.on("data", (d) => {
          body += d;
        });
        res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
      })
      .on("error", reject);
  });
}

t.test("names: wildcard host lists every non-internal interface, never 0.0.0.0", async (t) => {
  const interfaces = {
    lo: [{ address: "127.0.0.1", family: "IPv4", internal: true }],
    eth0: [
      { address: "192.0.2.10", family: "IPv4", internal: false },
      { address: "2001:db8::10", family: "IPv6", internal: false },
      { address: "fe80::1", family: "IPv6", internal: false },
    ],
  } as unknown as NodeJS.Dict<os.NetworkInterfaceInfo[]>;
  const wild = apiCertificateNames({
    host: "0.0.0.0",
    hostname: "orch-1",
    interfaces,
    advertise: ["api.example.com"],
  });
  t.same(wild.dns.sort(), ["api.example.com", "localhost", "orch-1"]);
  t.same(wild.ip.sort(), ["127.0.0.1", "192.0.2.10", "2001:db8:0:0:0:0:0:10"]);
  t.notOk(wild.ip.includes("0.0.0.0"), "a wildcard is never a SAN");

  const specific = apiCertificateNames({ host: "10.1.2.3", hostname: "bad_name", interfaces });
  t.same(specific.ip.sort(), ["10.1.2.3", "127.0.0.1"], "a specific host, not every interface");
  t.same(specific.skipped, ["bad_name"], "an invalid host name is left out and reported");
  t.equal(canonicalIp("FD00:0:0:0:0:0:0:16"), canonicalIp("fd00::16"));
  t.equal(canonicalIp("::ffff:192.0.2.1"), "0:0:0:0:0:ffff:c000:201");
});

t.test("self-signed from the PKI: real names, trusted by ca.crt only, reused on restart", async (t) => {
  const { dir, pki, root } = await freshPki(t);
  const manager = new ApiTlsManager({ api: apiConfig("0.0.0.0"), dataDir: root, pki: dir });
  await manager.start();
  t.teardown(() => manager.close());
  t.equal(manager.source, "self-signed");
  const server = await serveWith(t, manager);

  for (const host of ["127.0.0.1", "localhost"]) {
    const res = await get(server.port, host, pki.caCertPem);
    t.equal(res.status, 200, `a client trusting only ca.crt connects to ${host}`);
  }
  await t.rejects(
    get(server.port, "127.0.0.1", (await freshPki(t)).pki.caCertPem),
    { code: "UNABLE_TO_GET_ISSUER_CERT_LOCALLY" },
    "another PKI's CA does not verify it",
  );

  const certFile = path.join(root, "api-tls", "server.crt");
  const sans = manager.current.sans;
  t.notSame(sans, ["IP:0.0.0.0"]);
  t.notOk(sans.includes("IP:0.0.0.0"), "0.0.0.0 is never a SAN");
  const ipChecks = ["127.0.0.1"];
  for (const infos of Object.values(os.networkInterfaces())) {
    for (const i of infos ?? []) if (!i.internal && i.family === "IPv4") ipChecks.push(i.address);
  }
  t.ok(ipChecks.length >= 1);
  for (const ip of ipChecks) {
    const r = await openssl(["x509", "-in", certFile, "-noout", "-checkip", ip]);
    t.match(r.stdout, /does match certificate/, `openssl -checkip ${ip}`);
  }
  for (const host of ["localhost", os.hostname()]) {
    const r = await openssl(["x509", "-in", certFile, "-noout", "-checkhost", host]);
    t.match(r.stdout, /does match certificate/, `openssl -checkhost ${host}`);
  }
  const wrong = await openssl(["x509", "-in", certFile, "-noout", "-checkhost", "not-this-host.example"]);
  t.match(wrong.stdout, /does NOT match/, "a foreign name does not match (the check can fail)");
  t.equal((await fs.stat(path.join(root, "api-tls", "server.key"))).mode & 0o777, 0o600, "key is 0600");

  const first = manager.current.fingerprint;
  await manager.close();
  const again = new ApiTlsManager({ api: apiConfig("0.0.0.0"), dataDir: root, pki: dir });
  await again.start();
  t.teardown(() => again.close());
  t.equal(again.current.fingerprint, first, "a restart reuses the stored, still-fresh certificate");

  const forced = await again.renew();
  t.ok(forced.ok && forced.changed, "renew() issues a new one");
  t.not(again.current.serial, manager.current.serial, "with a new serial");
});

t.test("a specific API.Host goes into the certificate; other hosts' names do not", async (t) => {
  const { dir, pki, root } = await freshPki(t);
  const manager = new ApiTlsManager({
    api: apiConfig("127.0.0.2"),
    dataDir: root,
    pki,
    advertise: ["api.shoal.test"],
    networkInterfaces: () => ({}),
    hostname: () => "orch-1",
  });
  await manager.start();
  t.teardown(() => manager.close());
  t.same([...manager.current.sans].sort(), [
    "DNS:api.shoal.test",
    "DNS:localhost",
    "DNS:orch-1",
    "IP:127.0.0.1",
    "IP:127.0.0.2",
  ]);
  const server = await serveWith(t, manager, "127.0.0.2");
  const cert = await peerCertificate(server.port, { host: "127.0.0.2", ca: pki.caCertPem });
  t.equal(cert.checkIP("127.0.0.2"), "127.0.0.2", "the dialled address verifies");
  t.ok(dir);
});

t.test("renewal timer swaps the certificate on the live server before expiry", async (t) => {
  const { dir, pki, root } = await freshPki(t);
  // notBefore is backdated 5 minutes, so with a 20 s lifetime 0.944 of the life has
  // passed about 2 s after issue: the timer fires then.
  const manager = new ApiTlsManager({
    api: apiConfig("127.0.0.1"),
    dataDir: root,
    pki: dir,
    certTtlMs: 20_000,
    renewFraction: 0.944,
  });
  await manager.start();
  t.teardown(() => manager.close());
  const server = await serveWith(t, manager);
  const before = await peerCertificate(server.port, { ca: pki.caCertPem });
  const renewed = await nextEvent(manager, "loaded");
  t.equal(renewed.reason, "renewal");
  const after = await peerCertificate(server.port, { ca: pki.caCertPem });
  t.not(after.fingerprint256, before.fingerprint256, "new connections see the renewed certificate");
  t.equal(after.serialNumber.toLowerCase().replace(/^0+/, ""), renewed.serial);
});

t.test("no source at all is a config error with a code", async (t) => {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-api-tls-"));
  t.teardown(() => fs.rm(root, { recursive: true, force: true }));
  const manager = new ApiTlsManager({ api: apiConfig("127.0.0.1", { SelfSigned: false }), dataDir: root });
  await t.rejects(manager.start(), { code: "SHOAL_API_TLS_CONFIG" });
  const noPki = new ApiTlsManager({ api: apiConfig("127.0.0.1"), dataDir: root });
  await t.rejects(noPki.start(), { code: /^SHOAL_(PKI|FILE)_/ }, "a missing PKI names the PKI problem");
});
