/**
 * PKI benchmark: leaf certificates issued per second in-process, beside a naive
 * @peculiar/x509 (WebCrypto) issuer and the openssl CLI issuing the same
 * profile in the same run, printed as ratios; and the time of `pki init`.
 * Targets: `pki init` under 200 ms; at least 1,000 leaf certificates per second.
 *
 *   npm run bench:pki
 */
import "reflect-metadata";
import { execFile } from "node:child_process";
import { randomBytes, webcrypto } from "node:crypto";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import * as x509 from "@peculiar/x509";
import { initPki, openPki } from "../pki/index.js";

const run = promisify(execFile);
const root = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-bench-pki-"));
const dir = path.join(root, "pki");

/**
 * Runs `fn` repeatedly for about `ms`; operations per second of wall clock, and
 * of this process's CPU time (steadier on a shared machine; meaningless for
 * work done in child processes).
 */
async function rate(fn: () => unknown, ms: number): Promise<{ wall: number; cpu: number }> {
  for (let i = 0; i < 50; i++) await fn();
  let n = 0;
  const cpu0 = process.cpuUsage();
  const start = performance.now();
  while (performance.now() - start < ms) {
    await fn();
    n++;
  }
  const cpu = process.cpuUsage(cpu0);
  return { wall: n / ((performance.now() - start) / 1000), cpu: n / ((cpu.user + cpu.system) / 1e6) };
}

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

// --- pki init -------------------------------------------------------------
const initTimes: number[] = [];
for (let i = 0; i < 15; i++) {
  const d = path.join(root, `init-${i}`);
  const start = performance.now();
  await initPki(d);
  initTimes.push(performance.now() - start);
}
const opensslInit: number[] = [];
const caCnf = path.join(root, "ca.cnf");
await fs.writeFile(
  caCnf,
  [
    "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = root",
    "[dn]\nO = shoal.local\nCN = Shoal Root CA",
    "[root]\nbasicConstraints = critical,CA:TRUE,pathlen:1\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash",
    "[issuing]\nbasicConstraints = critical,CA:TRUE,pathlen:0\nkeyUsage = critical,digitalSignature,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid",
    "",
  ].join("\n"),
);
for (let i = 0; i < 5; i++) {
  const d = path.join(root, `openssl-init-${i}`);
  await fs.mkdir(d);
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  const start = performance.now();
  await run("openssl", [
    "req",
    "-x509",
    "-new",
    ...ec,
    "-keyout",
    `${d}/ca.key`,
    "-out",
    `${d}/ca.crt`,
    "-config",
    caCnf,
    "-days",
    "3650",
  ]);
  await run("openssl", [
    "req",
    "-x509",
    "-new",
    ...ec,
    "-keyout",
    `${d}/issuer.key`,
    "-out",
    `${d}/issuer.crt`,
    "-config",
    caCnf,
    "-extensions",
    "issuing",
    "-subj",
    "/O=shoal.local/CN=Shoal Issuing CA",
    "-CA",
    `${d}/ca.crt`,
    "-CAkey",
    `${d}/ca.key`,
    "-days",
    "3650",
  ]);
  opensslInit.push(performance.now() - start);
}

// --- leaf issuance ----------------------------------------------------------
await initPki(dir);
const pki = await openPki(dir);
let seq = 0;
const ours = await rate(() => pki.mint({ role: "compute", id: `edge-${seq++}` }), 3000);

// The naive path: WebCrypto key generation and @peculiar/x509's async generator.
x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);
const alg = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" };
const issuerCert = new x509.X509Certificate(await fs.readFile(path.join(dir, "issuer.crt"), "utf8"));
const issuerKeyDer = Buffer.from(
  (await fs.readFile(path.join(dir, "issuer.key"), "utf8")).replace(/-----[^-]+-----|\s/g, ""),
  "base64",
);
const issuerKey = await webcrypto.subtle.importKey("pkcs8", issuerKeyDer, alg, false, ["sign"]);
const issuerAki = await x509.AuthorityKeyIdentifierExtension.create(issuerCert);
const naive = await rate(async () => {
  const keys = (await webcrypto.subtle.generateKey(alg, true, ["sign", "verify"])) as webcrypto.CryptoKeyPair;
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomBytes(16)
      .toString("hex")
      .replace(/^[89a-f]/, "1"),
    subject: "CN=edge",
    issuer: issuerCert.subject,
    notBefore: new Date(now - 300_000),
    notAfter: new Date(now + 365 * 86_400_000),
    signingAlgorithm: alg,
    publicKey: keys.publicKey,
    signingKey: issuerKey,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth]),
      new x509.SubjectAlternativeNameExtension([{ type: "url", value: "spiffe://shoal.local/compute/edge" }]),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      issuerAki,
    ],
  });
  await webcrypto.subtle.exportKey("pkcs8", keys.privateKey);
  return cert.toString("pem");
}, 3000);

// openssl: one `openssl req -x509 -CA` per certificate, the same profile.
const leafCnf = path.join(root, "leaf.cnf");
await fs.writeFile(
  leafCnf,
  "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = leaf\n[dn]\nCN = edge\n[leaf]\n" +
    "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = clientAuth\n" +
    "subjectAltName = URI:spiffe://shoal.local/compute/edge\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n",
);
const opensslLeaf = await rate(
  () =>
    run("openssl", [
      "req",
      "-x509",
      "-new",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:P-256",
      "-nodes",
      "-keyout",
      path.join(root, "leaf.key"),
      "-out",
      path.join(root, "leaf.crt"),
      "-config",
      leafCnf,
      "-CA",
      path.join(dir, "issuer.crt"),
      "-CAkey",
      path.join(dir, "issuer.key"),
      "-days",
      "365",
    ]),
  3000,
);

// Issuing with the inventory record (lock, read, atomic rewrite with fsync) per certificate.
const recorded = await rate(() => pki.issue({ role: "compute", id: `rec-${seq++}` }), 2000);

await fs.rm(root, { recursive: true, force: true });

const f = (n: number) => n.toFixed(n < 10 ? 1 : 0);
const ratio = (a: number, b: number) => `${(a / b).toFixed(2)}x`;
console.log(
  `pki benchmark (node ${process.version}, ${os.cpus().length} CPU, load ${os.loadavg()[0]!.toFixed(1)})`,
);
console.log(
  `pki init (ecdsa-p256, root + issuing CA, 5 files): median ${f(median(initTimes))} ms (target < 200 ms); ` +
    `openssl CLI same: ${f(median(opensslInit))} ms; openssl/shoal ${ratio(median(opensslInit), median(initTimes))}`,
);
console.log("leaf certificates per second (compute profile, a new P-256 key each; target >= 1000):");
console.log("                                       wall/s   cpu/s");
const row = (name: string, r: { wall: number; cpu: number }, note = "") =>
  console.log(`  ${name.padEnd(36)} ${f(r.wall).padStart(6)}  ${f(r.cpu).padStart(6)}  ${note}`);
row("shoal in-process (Pki.mint)", ours);
row(
  "naive @peculiar/x509 + WebCrypto",
  naive,
  `shoal/naive ${ratio(ours.wall, naive.wall)} wall, ${ratio(ours.cpu, naive.cpu)} cpu`,
);
console.log(
  `  ${"openssl CLI (one process per cert)".padEnd(36)} ${f(opensslLeaf.wall).padStart(6)}       -  shoal/openssl ${ratio(ours.wall, opensslLeaf.wall)} wall`,
);
row(
  "shoal Pki.issue + inventory record",
  recorded,
  "(each takes the lock and rewrites inventory.json with fsync)",
);
