import "reflect-metadata";
import { X509Certificate } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import { silentLogger } from "../core/index.js";
import type { FabricStatus } from "../fabric/index.js";
import { ensureServerCertificate } from "../orchestrator/certificates.js";
import { OwnCertificateRenewer } from "../orchestrator/own-certificates.js";
import { joinFabric, startTestFabric } from "./helpers/nats.js";

/**
 * The orchestrator's NATS server certificate, renewed by OwnCertificateRenewer
 * (PKI.CertTTL 6 s, so it renews every ~4 s) and picked up by a nats-server
 * reload: a connected client never sees a disconnect, and a client that
 * connects afterwards still gets in (the new certificate chains to the CA).
 */
t.test("server certificate renewal reloads nats-server and keeps connected clients", async (t) => {
  const fabric = await startTestFabric(t, { jetStream: false });
  const node = await fabric.identity("compute", "n1");
  const conn = await joinFabric(t, fabric, node);
  const events: FabricStatus["type"][] = [];
  void (async () => {
    for await (const s of conn.status()) events.push(s.type);
  })();

  const prefix = path.join(fabric.dir, "server");
  const serials = new Set([new X509Certificate(await fs.readFile(`${prefix}.crt`)).serialNumber]);
  let reloads = 0;
  const renewer = new OwnCertificateRenewer(
    [
      {
        name: "nats-server",
        // Names the test broker's certificate carries; a 6 s lifetime renews at ~4 s.
        ensure: () =>
          ensureServerCertificate(fabric.pki, prefix, ["localhost"], {
            ttlMs: 6000,
            renewBeforeMs: 3_600_000,
          }),
        onRenewed: async () => {
          // Read here, right after the renewal wrote it: sampling the file from the loop
          // below could miss one written between two samples on a loaded machine.
          serials.add(new X509Certificate(await fs.readFile(`${prefix}.crt`)).serialNumber);
          reloads++;
          await fabric.supervisor.reload("server certificate renewed");
        },
      },
    ],
    silentLogger,
  );
  t.teardown(() => renewer.close());
  // The test broker's first certificate lives a year: replace it now, as a due one would be.
  await fs.rm(`${prefix}.crt`);
  await renewer.check();
  const keepAlive = setInterval(() => {}, 1000);
  t.teardown(() => clearInterval(keepAlive));
  const deadline = Date.now() + 30_000;
  while (reloads < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
  t.ok(reloads >= 3, `renewed and reloaded ${reloads} times`);
  t.ok(serials.size >= 4, `${serials.size} server certificates in turn`);
  await conn.flush();
  t.notOk(
    events.includes("disconnected"),
    `the connected client stayed connected (${events.join(",") || "no events"})`,
  );

  const late = await joinFabric(t, fabric, node);
  await late.flush();
  t.pass("a new client connects with the renewed server certificate");
});
