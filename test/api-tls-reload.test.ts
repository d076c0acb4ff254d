import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t, { type Test } from "tap";
import { defaultConfig, type Logger, writeFileAtomic } from "../core/index.js";
import { type ApiTlsConfig, ApiTlsManager } from "../orchestrator/api-tls.js";
import { type IssuedCertificate, type Pki, writeIssued } from "../pki/index.js";
import { capturedLogger, keepAliveLoad, nextEvent, peerCertificate, serveWith } from "./helpers/api-tls.js";
import { freshPki } from "./helpers/pki.js";

function filesConfig(certFile: string, keyFile: string): ApiTlsConfig {
  const api = defaultConfig().API;
  return { Host: "127.0.0.1", TLS: { ...api.TLS, CertFile: certFile, KeyFile: keyFile } };
}

/** A PKI, a first certificate installed at DIR/certs/api.{crt,key}, and a way to mint more. */
async function setup(t: Test) {
  const { pki, root } = await freshPki(t);
  const prefix = path.join(root, "certs", "api");
  await fs.mkdir(path.dirname(prefix), { recursive: true });
  const mint = (id: string) => pki.issue({ role: "server", id, days: 2 });
  const first = await mint("first");
  await writeIssued(prefix, first);
  return { pki, root, prefix, mint, first, certFile: `${prefix}.crt`, keyFile: `${prefix}.key` };
}

type Setup = Awaited<ReturnType<typeof setup>>;

/**
 * A started manager serving the set-up's files. `reloadDebounceMs` 600 000 keeps
 * the file watcher out, so only explicit reloads happen. The test closes it
 * unless `closeOnTeardown` is false.
 */
async function startManager(
  t: Test,
  s: Setup,
  opts: { reloadDebounceMs: number; log?: Logger; closeOnTeardown?: boolean },
): Promise<ApiTlsManager> {
  const manager = new ApiTlsManager({
    api: filesConfig(s.certFile, s.keyFile),
    dataDir: s.root,
    reloadDebounceMs: opts.reloadDebounceMs,
    ...(opts.log ? { log: opts.log } : {}),
  });
  await manager.start();
  if (opts.closeOnTeardown !== false) t.teardown(() => manager.close());
  return manager;
}

function fingerprintOf(issued: IssuedCertificate): string {
  return issued.fingerprint.replace(/^sha256:/, "").toUpperCase();
}

function colonHex(fp: string): string {
  return fp.replace(/:/g, "").toUpperCase();
}

async function servedFingerprint(port: number, pki: Pki): Promise<string> {
  return colonHex((await peerCertificate(port, { ca: pki.caCertPem })).fingerprint256);
}

t.test("file change: new connections get the new certificate, keep-alive requests never fail", async (t) => {
  const s = await setup(t);
  const manager = await startManager(t, s, { reloadDebounceMs: 50 });
  t.equal(manager.source, "files");
  const server = await serveWith(t, manager);
  t.equal(await servedFingerprint(server.port, s.pki), fingerprintOf(s.first));

  const load = keepAliveLoad(t, { port: server.port, path: "/", ca: s.pki.caCertPem, maxRequests: 5000 });
  await load.more(50);

  const second = await s.mint("second");
  const loaded = nextEvent(manager, "loaded");
  await writeIssued(s.prefix, second);
  const event = await loaded;
  t.equal(event.reason, "reload");
  t.equal(event.fingerprint, second.fingerprint);
  t.equal(
    await servedFingerprint(server.port, s.pki),
    fingerprintOf(second),
    "a new connection sees the new certificate",
  );
  await load.more(50);
  await load.stop();
  t.same(load.failures, [], "no request failed across the swap");
  t.ok(load.ok() >= 100, `${load.ok()} requests succeeded`);
});

t.test("SIGHUP → reload() swaps the certificate", async (t) => {
  const s = await setup(t);
  // A long debounce keeps the file watcher out of this test: only the signal reloads.
  const manager = await startManager(t, s, { reloadDebounceMs: 600_000 });
  const server = await serveWith(t, manager);
  const onHup = () => void manager.reload();
  process.on("SIGHUP", onHup);
  t.teardown(() => {
    process.off("SIGHUP", onHup);
  });

  const next = await s.mint("hup");
  await writeIssued(s.prefix, next);
  t.equal(await servedFingerprint(server.port, s.pki), fingerprintOf(s.first), "unchanged until the signal");
  const loaded = nextEvent(manager, "loaded");
  process.kill(process.pid, "SIGHUP");
  t.equal((await loaded).fingerprint, next.fingerprint);
  t.equal(await servedFingerprint(server.port, s.pki), fingerprintOf(next));

  const again = await manager.reload();
  t.ok(again.ok && !again.changed, "a reload with unchanged files changes nothing");
});

t.test("status() yields events as data and ends when the manager closes", async (t) => {
  const s = await setup(t);
  // The watcher is kept out (long debounce) so only the explicit reloads produce events.
  const manager = await startManager(t, s, { reloadDebounceMs: 600_000, closeOnTeardown: false });
  const seen: string[] = [];
  const done = (async () => {
    for await (const e of manager.status()) seen.push(`${e.type}:${e.type === "loaded" ? e.reason : e.code}`);
  })();
  await writeFileAtomic(s.keyFile, "garbage", 0o600);
  await manager.reload();
  await writeIssued(s.prefix, await s.mint("next"));
  await manager.reload();
  await manager.close();
  await done;
  t.same(seen, ["reload-failed:SHOAL_API_TLS_BAD_PEM", "loaded:reload"]);
  t.equal(await manager.closed(), undefined, "closed() resolves to no error");
  t.equal(manager.close(), manager.close(), "close() returns the same promise");
});

t.test("a bad replacement is logged with its code and the old certificate kept", async (t) => {
  const s = await setup(t);
  const { log, lines } = capturedLogger();
  const manager = await startManager(t, s, { reloadDebounceMs: 50, log });
  const server = await serveWith(t, manager);

  let failed = nextEvent(manager, "reload-failed");
  await writeFileAtomic(
    s.certFile,
    "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
  );
  t.equal((await failed).code, "SHOAL_API_TLS_BAD_PEM");
  t.equal(
    await servedFingerprint(server.port, s.pki),
    fingerprintOf(s.first),
    "old certificate still served",
  );

  const other = await s.mint("other");
  failed = nextEvent(manager, "reload-failed");
  await writeFileAtomic(s.certFile, s.first.certPem);
  await writeFileAtomic(s.keyFile, other.keyPem!, 0o600);
  t.equal((await failed).code, "SHOAL_API_TLS_KEY_MISMATCH");
  t.equal(
    await servedFingerprint(server.port, s.pki),
    fingerprintOf(s.first),
    "old certificate still served",
  );

  const direct = await manager.reload();
  t.notOk(direct.ok, "reload() reports the failure as a value");
  t.equal(!direct.ok && direct.error.code, "SHOAL_API_TLS_KEY_MISMATCH");

  const codes = lines()
    .filter((l) => l.msg === "API certificate reload failed; keeping the current one")
    .map((l) => l.code);
  t.ok(codes.includes("SHOAL_API_TLS_BAD_PEM"), "the log line carries the code");
  t.ok(codes.includes("SHOAL_API_TLS_KEY_MISMATCH"));
  t.ok(
    lines().every((l) => !JSON.stringify(l).includes("PRIVATE KEY")),
    "no key material reaches the log",
  );

  const loaded = nextEvent(manager, "loaded");
  await writeIssued(s.prefix, other);
  t.equal((await loaded).fingerprint, other.fingerprint, "a good pair afterwards is picked up");
});

t.test("start-up refuses bad files and half-set config", async (t) => {
  const s = await setup(t);
  const expired = await s.pki.issue({
    role: "server",
    id: "old",
    notBefore: new Date(Date.now() - 10 * 86_400_000),
    notAfter: new Date(Date.now() - 86_400_000),
  });
  const old = path.join(s.root, "certs", "old");
  await writeIssued(old, expired);
  const cases: [string, ApiTlsConfig, string][] = [
    ["expired certificate", filesConfig(`${old}.crt`, `${old}.key`), "SHOAL_API_TLS_EXPIRED"],
    ["missing file", filesConfig(path.join(s.root, "nope.crt"), s.keyFile), "SHOAL_API_TLS_BAD_PEM"],
    ["key as certificate", filesConfig(s.keyFile, s.keyFile), "SHOAL_API_TLS_BAD_PEM"],
    ["CertFile without KeyFile", filesConfig(s.certFile, ""), "SHOAL_API_TLS_CONFIG"],
    [
      "files and AutoCert",
      {
        ...filesConfig(s.certFile, s.keyFile),
        TLS: { ...filesConfig(s.certFile, s.keyFile).TLS, AutoCert: "x.test" },
      },
      "SHOAL_API_TLS_CONFIG",
    ],
  ];
  for (const [name, api, code] of cases) {
    const m = new ApiTlsManager({ api, dataDir: s.root });
    await t.rejects(m.start(), { code }, name);
    await m.close();
  }
});
