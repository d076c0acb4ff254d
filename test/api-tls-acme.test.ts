import "reflect-metadata";
import { promises as fs } from "node:fs";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import path from "node:path";
import t from "tap";
import { defaultConfig } from "../core/index.js";
import { type ApiTlsConfig, ApiTlsManager, type ApiTlsManagerOptions } from "../orchestrator/api-tls.js";
import { capturedLogger, peerCertificate, serveWith } from "./helpers/api-tls.js";
import { freePort } from "./helpers/cluster.js";
import { startPebble } from "./helpers/pebble.js";
import { tempDir } from "./helpers/pki.js";

function fetchStatus(url: string): Promise<number> {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      })
      .on("error", reject);
  });
}

function fetchText(url: string, ca: string): Promise<string> {
  return new Promise((resolve, reject) => {
    https
      .get(url, { ca }, (res) => {
        let body = "";
        res.on("data", (d) => {
          body += d;
        });
        res.on("end", () => resolve(body));
      })
      .on("error", reject);
  });
}

t.test(
  "AutoCert: HTTP-01 issuance from pebble, cache reuse on restart, renewal, failure keeps the certificate",
  async (t) => {
    const challengePort = await freePort();
    const pebble = await startPebble(t, challengePort);
    const root = await tempDir(t, "shoal-acme-");
    const cachePath = path.join(root, "autocert");
    const api: ApiTlsConfig = {
      Host: "127.0.0.1",
      TLS: {
        ...defaultConfig().API.TLS,
        AutoCert: "localhost",
        AutoCertDirectory: pebble.directoryUrl,
        AutoCertCachePath: cachePath,
      },
    };
    const { log, lines } = capturedLogger();
    t.teardown(() => {
      if (t.passing()) return;
      t.comment(
        lines()
          .map((l) => JSON.stringify(l))
          .join("\n"),
      );
      t.comment(pebble.output());
    });
    const options = (more: Partial<ApiTlsManagerOptions> = {}): ApiTlsManagerOptions => ({
      api,
      log,
      dataDir: root,
      acme: {
        challengeHost: "127.0.0.1",
        challengePort,
        challengeIdleMs: 1000,
        directoryCaPem: pebble.caPem,
        pollMinMs: 200,
      },
      renewRetryMs: 600_000,
      ...more,
    });
    const issuedCount = () => pebble.output().match(/Issued certificate serial/g)?.length ?? 0;

    const first = new ApiTlsManager(options());
    await first.start();
    t.teardown(() => first.close());
    t.equal(first.source, "acme");
    t.ok(first.current.sans.includes("DNS:localhost"), "the certificate names the AutoCert domain");
    t.equal(issuedCount(), 1, "pebble validated the challenge and issued one certificate");
    const pebbleRoot = await fetchText(`${pebble.managementUrl}/roots/0`, pebble.caPem);
    const server = await serveWith(t, first);
    const seen = await peerCertificate(server.port, { servername: "localhost", ca: pebbleRoot });
    t.equal(
      seen.checkHost("localhost"),
      "localhost",
      "a client trusting the ACME CA's root verifies the API",
    );
    for (const file of ["account.key", "localhost.key", "localhost.crt"]) {
      t.equal((await fs.stat(path.join(cachePath, file))).mode & 0o777, 0o600, `${file} is 0600`);
    }
    const firstSerial = first.current.serial;
    await first.close();

    const restarted = new ApiTlsManager(options());
    await restarted.start();
    t.teardown(() => restarted.close());
    t.equal(restarted.current.serial, firstSerial, "a restart reuses the cached, still-fresh certificate");
    t.equal(issuedCount(), 1, "without ordering a new one");
    await restarted.close();

    // A renew threshold of 0 makes the cached certificate due at once.
    const due = new ApiTlsManager(options({ renewFraction: 0 }));
    await due.start();
    t.teardown(() => due.close());
    t.not(due.current.serial, firstSerial, "a due certificate is renewed at start-up: new serial");
    t.equal(issuedCount(), 2);
    const live = await serveWith(t, due);
    const forced = await due.renew();
    t.ok(forced.ok && forced.changed, "renew() orders another one");
    t.equal(issuedCount(), 3);
    const after = await peerCertificate(live.port, { servername: "localhost", ca: pebbleRoot });
    t.equal(
      after.serialNumber.toLowerCase().replace(/^0+/, ""),
      due.current.serial,
      "new connections see it",
    );

    const probe = await fetchStatus(
      `http://127.0.0.1:${challengePort}/.well-known/acme-challenge/unknown-token`,
    );
    t.equal(probe, 404, "the challenge listener answers only tokens it was given");
    const silent = net.connect(challengePort, "127.0.0.1");
    silent.on("error", () => {});
    const t0 = Date.now();
    await new Promise((resolve) => silent.on("close", resolve));
    t.ok(Date.now() - t0 < 5000, `a connection that sends nothing is closed (after ${Date.now() - t0} ms)`);

    const kept = due.current.fingerprint;
    await pebble.stop();
    const failed = await due.renew();
    t.notOk(failed.ok, "renewal with the CA gone fails");
    t.equal(!failed.ok && failed.error.code, "SHOAL_API_TLS_ACME_FAILED");
    t.equal(due.current.fingerprint, kept, "and the current certificate stays in use");

    const fresh = new ApiTlsManager(
      options({
        api: { ...api, TLS: { ...api.TLS, AutoCertCachePath: path.join(root, "empty-cache") } },
        acme: {
          challengeHost: "127.0.0.1",
          challengePort: 0,
          directoryCaPem: pebble.caPem,
          pollMinMs: 200,
        },
      }),
    );
    await t.rejects(
      fresh.start(),
      { code: "SHOAL_API_TLS_ACME_FAILED" },
      "no cached certificate and no CA: start-up fails with a code",
    );
  },
);
