import "reflect-metadata";
import type { AddressInfo } from "node:net";
import tls from "node:tls";
import t from "tap";
import { defaultConfig } from "../core/index.js";
import { ApiTlsManager, DEFAULT_API_TLS_OPTIONS } from "../orchestrator/api-tls.js";
import type { KeyType } from "../pki/index.js";
import { serveWith } from "./helpers/api-tls.js";
import { freshPki, openssl } from "./helpers/pki.js";

/** What `openssl s_client` negotiated, or undefined when the handshake failed. */
async function negotiate(
  port: number,
  args: string[],
): Promise<{ protocol: string; cipher: string } | undefined> {
  const r = await openssl(
    ["s_client", "-connect", `127.0.0.1:${port}`, "-servername", "localhost", ...args],
    "",
  );
  const m = /^New, (\S+), Cipher is (\S+)/m.exec(r.stdout);
  return m?.[1] && m[2] && m[1] !== "(NONE)" ? { protocol: m[1], cipher: m[2] } : undefined;
}

/**
 * Client offers that must fail. Each allows legacy algorithms on the client
 * (SECLEVEL=0), so a refusal is the server's doing; each is first shown to
 * succeed against a lax server with the same certificate.
 */
const REFUSED: Record<KeyType, [string, string[]][]> = {
  "ecdsa-p256": [
    ["TLS 1.1", ["-tls1_1", "-cipher", "ALL@SECLEVEL=0"]],
    ["TLS 1.0", ["-tls1", "-cipher", "ALL@SECLEVEL=0"]],
    [
      "TLS 1.2 ECDHE-ECDSA-AES128-SHA (CBC, SHA-1)",
      ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA@SECLEVEL=0"],
    ],
  ],
  "rsa-3072": [
    ["TLS 1.2 AES128-SHA (RSA key exchange)", ["-tls1_2", "-cipher", "AES128-SHA@SECLEVEL=0"]],
    // 3DES is not built into this OpenSSL at all (client or server), so CBC stands in for it.
    ["TLS 1.2 ECDHE-RSA-AES128-SHA256 (CBC)", ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256@SECLEVEL=0"]],
    [
      "TLS 1.2 AES128-GCM-SHA256 (no forward secrecy)",
      ["-tls1_2", "-cipher", "AES128-GCM-SHA256@SECLEVEL=0"],
    ],
  ],
  "ecdsa-p384": [],
};
const ACCEPTED: Record<KeyType, [string[], { protocol: string; cipher?: string }][]> = {
  "ecdsa-p256": [
    [
      ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
      { protocol: "TLSv1.2", cipher: "ECDHE-ECDSA-AES128-GCM-SHA256" },
    ],
    [
      ["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"],
      { protocol: "TLSv1.2", cipher: "ECDHE-ECDSA-CHACHA20-POLY1305" },
    ],
    [["-tls1_3"], { protocol: "TLSv1.3" }],
  ],
  "rsa-3072": [
    [
      ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"],
      { protocol: "TLSv1.2", cipher: "ECDHE-RSA-AES128-GCM-SHA256" },
    ],
    [["-tls1_3"], { protocol: "TLSv1.3" }],
  ],
  "ecdsa-p384": [],
};

for (const keyType of ["ecdsa-p256", "rsa-3072"] as const) {
  t.test(`${keyType}: the API refuses old protocols and weak ciphers and speaks modern TLS`, async (t) => {
    const { dir, root } = await freshPki(t, { keyType });
    const api = { Host: "127.0.0.1", TLS: defaultConfig().API.TLS };
    const manager = new ApiTlsManager({ api, dataDir: root, pki: dir });
    await manager.start();
    t.teardown(() => manager.close());
    const server = await serveWith(t, manager);

    const lax = tls.createServer({
      ...manager.serverOptions(),
      minVersion: "TLSv1",
      ciphers: "ALL@SECLEVEL=0",
      honorCipherOrder: false,
    });
    await new Promise<void>((resolve) => lax.listen(0, "127.0.0.1", resolve));
    t.teardown(() => new Promise<void>((resolve) => lax.close(() => resolve())));
    const laxPort = (lax.address() as AddressInfo).port;

    for (const [name, args] of REFUSED[keyType]) {
      t.ok(await negotiate(laxPort, args), `control: a lax server accepts ${name}`);
      t.equal(await negotiate(server.port, args), undefined, `the API refuses ${name}`);
    }
    for (const [args, expected] of ACCEPTED[keyType]) {
      t.match(await negotiate(server.port, args), expected, `the API speaks ${args.join(" ")}`);
    }
  });
}

t.test("DEFAULT_API_TLS_OPTIONS offers only ECDHE/TLS 1.3 AEAD suites", async (t) => {
  t.equal(DEFAULT_API_TLS_OPTIONS.minVersion, "TLSv1.2");
  for (const suite of DEFAULT_API_TLS_OPTIONS.ciphers.split(":")) {
    t.match(suite, /^(TLS_|ECDHE-(ECDSA|RSA)-)(AES_?(128|256)_?GCM|AES(128|256)-GCM|CHACHA20)/, suite);
  }
});
