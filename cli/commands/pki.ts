import { existsSync } from "node:fs";
import path from "node:path";
import { CORE_CODES, parseDuration, readFileChecked, ShoalError, writeFileAtomic } from "../../core/index.js";
import {
  assertKeyType,
  assertRevocationReason,
  assertRole,
  type CertInfo,
  CertificateVerificationError,
  certFingerprint,
  createJoinToken,
  DEFAULT_CA_DAYS,
  DEFAULT_CA_NAME,
  DEFAULT_LEAF_DAYS,
  DEFAULT_TRUST_DOMAIN,
  exportPkcs12,
  type IssuedCertificate,
  initPki,
  inspectCertificate,
  KEY_TYPES,
  listCertificates,
  listJoinTokens,
  openPki,
  PKI_FILES,
  parseCrl,
  REVOCATION_REASONS,
  ROLES,
  readCertificates,
  revokeCertificate,
  revokeJoinToken,
  verifyCertificate,
} from "../../pki/index.js";
import { parseLabelOptions } from "../label-options.js";
import { printJson, printTable } from "./api-options.js";
import type { CommandModule } from "./index.js";

type Args = Record<string, unknown> & { output?: string };

const json = (argv: Args) => argv.output === "json";
const say = (line: string) => process.stdout.write(`${line}\n`);

/** `--dns a,b --dns c` → [a, b, c]. */
const list = (value: unknown): string[] | undefined =>
  value === undefined
    ? undefined
    : ([] as unknown[])
        .concat(value)
        .flatMap((v) => String(v).split(","))
        .map((v) => v.trim())
        .filter(Boolean);

/** The CA passphrase: --passphrase-file wins over SHOAL_CA_PASSPHRASE; none means unencrypted keys. */
async function passphrase(argv: Args): Promise<string | undefined> {
  if (typeof argv["passphrase-file"] === "string") {
    return (await readFileChecked(argv["passphrase-file"])).toString("utf8").replace(/\r?\n$/, "");
  }
  return process.env.SHOAL_CA_PASSPHRASE || undefined;
}

async function open(argv: Args) {
  const pass = await passphrase(argv);
  return openPki(String(argv.dir), pass === undefined ? {} : { passphrase: pass });
}

function usage(message: string, fix: string): ShoalError {
  return new ShoalError(CORE_CODES.SHOAL_USAGE, message, { fix });
}

function sanLabels(info: CertInfo): string[] {
  return [
    ...info.dns.map((d) => `DNS:${d}`),
    ...info.ips.map((i) => `IP:${i}`),
    ...info.uris.map((u) => `URI:${u}`),
  ];
}

function describeValidity(info: CertInfo, now = new Date()): string {
  const days = Math.floor((info.notAfter.getTime() - now.getTime()) / 86_400_000);
  const state =
    now < info.notBefore ? "NOT YET VALID" : now > info.notAfter ? "EXPIRED" : `expires in ${days} day(s)`;
  return `${info.notBefore.toISOString()} → ${info.notAfter.toISOString()} (${state})`;
}

function printCertificate(info: CertInfo): void {
  const rows: [string, string][] = [
    ["Subject", info.subject],
    ["Issuer", info.issuer],
    ["Serial", info.serial],
    ["SPIFFE ID", info.spiffeId ?? "-"],
    ["SANs", sanLabels(info).join(", ") || "-"],
    ["Validity", describeValidity(info)],
    ["Fingerprint", info.fingerprint],
    ["Key type", info.keyType],
    ["Key usage", info.keyUsage?.join(", ") ?? "-"],
    ["Ext. key usage", info.eku.join(", ") || "-"],
    ["CA", info.isCa ? `yes${info.pathLen === undefined ? "" : ` (path length ${info.pathLen})`}` : "no"],
    ["Signature", info.signatureAlgorithm],
  ];
  for (const [k, v] of rows) say(`${`${k}:`.padEnd(16)}${v}`);
}

function printIssued(argv: Args, issued: IssuedCertificate, out: string): void {
  if (json(argv)) {
    const { keyPem: _omit, ...rest } = issued;
    printJson({ ...rest, certFile: `${out}.crt`, ...(issued.keyPem ? { keyFile: `${out}.key` } : {}) });
    return;
  }
  say(`issued ${issued.role} certificate ${issued.serial}`);
  say(`  identity:    ${issued.spiffeId ?? issued.sans.join(", ")}`);
  say(`  valid until: ${issued.notAfter.toISOString()}`);
  say(`  fingerprint: ${issued.fingerprint}`);
  say(`  wrote ${out}.crt${issued.keyPem ? ` and ${out}.key (0600)` : ""}`);
}

const dirOption = { type: "string", demandOption: true, describe: "the PKI directory" } as const;
const passphraseOption = {
  type: "string",
  describe: "file holding the CA key passphrase (else SHOAL_CA_PASSPHRASE)",
} as const;
const daysOption = { type: "number", describe: `validity in days (default ${DEFAULT_LEAF_DAYS})` } as const;

/** `shoal pki init | issue | sign | inspect | verify | revoke | crl | list | export-p12`. */
export const pkiCommand: CommandModule = (cli) =>
  cli.command("pki", "the fabric's certificate authority", (yargs) =>
    yargs
      .command(
        "init",
        "create a root CA and its issuing CA",
        (y) =>
          y
            .option("dir", dirOption)
            .option("trust-domain", { type: "string", default: DEFAULT_TRUST_DOMAIN })
            .option("name", { type: "string", default: DEFAULT_CA_NAME, describe: "root CA common name" })
            .option("key-type", { type: "string", default: "ecdsa-p256", describe: KEY_TYPES.join("|") })
            .option("days", { type: "number", default: DEFAULT_CA_DAYS })
            .option("force", { type: "boolean", default: false, describe: "replace an existing PKI" })
            .option("passphrase-file", passphraseOption),
        async (argv: Args) => {
          const pass = await passphrase(argv);
          const result = await initPki(String(argv.dir), {
            trustDomain: String(argv["trust-domain"]),
            name: String(argv.name),
            keyType: assertKeyType(argv["key-type"]),
            days: Number(argv.days),
            force: Boolean(argv.force),
            ...(pass === undefined ? {} : { passphrase: pass }),
          });
          const files = Object.fromEntries(
            Object.entries(PKI_FILES).map(([k, f]) => [k, path.join(result.dir, f)] as const),
          );
          if (json(argv)) return printJson({ ...result, encrypted: pass !== undefined, files });
          say(`created PKI in ${result.dir} (trust domain ${result.trustDomain})`);
          say(`  root CA fingerprint: ${result.rootFingerprint}`);
          say(`  give edge nodes only ${files.rootCert} (or the fingerprint above)`);
          say(`  ${files.rootKey} can go offline; ${files.issuerKey} signs certificates`);
          if (pass === undefined)
            say("  CA keys are not encrypted: use --passphrase-file or SHOAL_CA_PASSPHRASE to encrypt them");
        },
      )
      .command(
        "issue <role>",
        "issue a certificate and a new key",
        (y) =>
          y
            .positional("role", { type: "string", describe: ROLES.join("|") })
            .option("dir", dirOption)
            .option("id", { type: "string", describe: "identity id (orchestrator, compute, user)" })
            .option("dns", { type: "string", array: true, describe: "server DNS names, comma-separated" })
            .option("ip", { type: "string", array: true, describe: "server IP addresses, comma-separated" })
            .option("days", daysOption)
            .option("key-type", { type: "string", describe: KEY_TYPES.join("|") })
            .option("out", {
              type: "string",
              demandOption: true,
              describe: "writes PREFIX.crt and PREFIX.key",
            })
            .option("passphrase-file", passphraseOption),
        async (argv: Args) => {
          const role = assertRole(argv.role);
          const pki = await open(argv);
          const out = String(argv.out);
          const issued = await pki.issue(
            {
              role,
              ...(argv.id === undefined ? {} : { id: String(argv.id) }),
              ...(argv.dns === undefined ? {} : { dns: list(argv.dns)! }),
              ...(argv.ip === undefined ? {} : { ip: list(argv.ip)! }),
              ...(argv.days === undefined ? {} : { days: Number(argv.days) }),
              ...(argv["key-type"] === undefined ? {} : { keyType: assertKeyType(argv["key-type"]) }),
            },
            { out },
          );
          printIssued(argv, issued, out);
        },
      )
      .command(
        "sign <csr>",
        "sign a CSR; the CA decides names and usages from --role and --id",
        (y) =>
          y
            .positional("csr", { type: "string", describe: "PEM certificate request" })
            .option("dir", dirOption)
            .option("role", { type: "string", demandOption: true, describe: ROLES.join("|") })
            .option("id", { type: "string", describe: "identity id" })
            .option("dns", { type: "string", array: true, describe: "server DNS names (role server)" })
            .option("ip", { type: "string", array: true, describe: "server IP addresses (role server)" })
            .option("days", daysOption)
            .option("out", { type: "string", demandOption: true, describe: "writes PREFIX.crt" })
            .option("passphrase-file", passphraseOption),
        async (argv: Args) => {
          const role = assertRole(argv.role);
          const csr = await readFileChecked(String(argv.csr));
          const pki = await open(argv);
          const out = String(argv.out);
          const issued = await pki.signCsr(
            csr,
            {
              role,
              ...(argv.id === undefined ? {} : { id: String(argv.id) }),
              ...(argv.dns === undefined ? {} : { dns: list(argv.dns)! }),
              ...(argv.ip === undefined ? {} : { ip: list(argv.ip)! }),
              ...(argv.days === undefined ? {} : { days: Number(argv.days) }),
            },
            { out },
          );
          printIssued(argv, issued, out);
        },
      )
      .command(
        "inspect <file>",
        "show a certificate (or each one in a chain file) or a CRL",
        (y) => y.positional("file", { type: "string" }),
        async (argv: Args) => {
          const file = String(argv.file);
          const text = (await readFileChecked(file)).toString("utf8");
          if (text.includes("-----BEGIN X509 CRL-----")) {
            const crl = parseCrl(text, file);
            const { der: _der, tbs: _tbs, signature: _sig, issuer: _issuer, ...shown } = crl;
            if (json(argv)) return printJson(shown);
            say(
              `CRL number ${crl.number ?? "-"}, this update ${crl.thisUpdate.toISOString()}, next update ${crl.nextUpdate?.toISOString() ?? "-"}`,
            );
            for (const e of crl.entries)
              say(`  ${e.serial}  revoked ${e.revokedAt.toISOString()}  ${e.reason ?? ""}`.trimEnd());
            return;
          }
          const infos = readCertificates(text, file).map((c) => inspectCertificate(c.raw));
          if (json(argv)) return printJson(infos.length === 1 ? infos[0] : infos);
          infos.forEach((info, i) => {
            if (infos.length > 1) say(`${i > 0 ? "\n" : ""}Certificate ${i + 1} of ${infos.length}`);
            printCertificate(info);
          });
        },
      )
      .command(
        "verify <cert>",
        "full path validation; exits non-zero and says why when the certificate is not fit",
        (y) =>
          y
            .positional("cert", { type: "string", describe: "PEM: leaf first, then intermediates" })
            .option("ca", { type: "string", demandOption: true, describe: "the trusted root CA (ca.crt)" })
            .option("host", {
              type: "string",
              describe: "a host name or IP address the certificate must fit",
            })
            .option("role", { type: "string", describe: ROLES.join("|") })
            .option("trust-domain", {
              type: "string",
              describe: "the trust domain an identity must belong to",
            })
            .option("crl", { type: "string", describe: "a CRL from the issuing CA" }),
        async (argv: Args) => {
          const [chain, ca, crl] = await Promise.all([
            readFileChecked(String(argv.cert)),
            readFileChecked(String(argv.ca)),
            argv.crl === undefined ? undefined : readFileChecked(String(argv.crl)),
          ]);
          const result = verifyCertificate(chain.toString("utf8"), {
            caPem: ca.toString("utf8"),
            ...(argv.host === undefined ? {} : { host: String(argv.host) }),
            ...(argv.role === undefined ? {} : { role: assertRole(argv.role) }),
            ...(argv["trust-domain"] === undefined ? {} : { trustDomain: String(argv["trust-domain"]) }),
            ...(crl === undefined ? {} : { crlPem: crl.toString("utf8") }),
          });
          if (!result.ok) throw new CertificateVerificationError(result.failures);
          if (json(argv)) return printJson(result);
          const leaf = result.leaf;
          say(`OK: ${leaf.spiffeId ?? leaf.subject} (serial ${leaf.serial})`);
          say(`  chain:       ${result.chain.map((c) => c.subject).join(" → ")}`);
          say(`  valid until: ${leaf.notAfter.toISOString()}`);
          if (argv.host !== undefined) say(`  host:        ${argv.host} matches`);
          if (crl !== undefined) say("  revocation:  not listed in the CRL");
        },
      )
      .command(
        "revoke <cert>",
        "revoke a certificate (PEM file or serial); then publish a CRL with `pki crl`",
        (y) =>
          y
            .positional("cert", { type: "string", describe: "certificate file or hex serial" })
            .option("dir", dirOption)
            .option("reason", {
              type: "string",
              default: "unspecified",
              describe: REVOCATION_REASONS.join("|"),
            }),
        async (argv: Args) => {
          const target = String(argv.cert);
          const reason = assertRevocationReason(argv.reason);
          const input = existsSync(target) ? (await readFileChecked(target)).toString("utf8") : target;
          if (!input.includes("-----BEGIN") && !/^[0-9a-fA-F:]+$/.test(input)) {
            throw usage(
              `${target} is neither a certificate file nor a hex serial`,
              "give PREFIX.crt or a serial from `shoal pki list`",
            );
          }
          const entry = await revokeCertificate(String(argv.dir), input, reason);
          if (json(argv)) return printJson(entry);
          say(
            `revoked ${entry.serial} (${entry.spiffeId ?? entry.sans.join(", ")}) at ${entry.revokedAt?.toISOString()}: ${entry.reason}`,
          );
        },
      )
      .command(
        "crl",
        "write a CRL signed by the issuing CA",
        (y) =>
          y
            .option("dir", dirOption)
            .option("out", { type: "string", demandOption: true, describe: "the CRL file (PEM)" })
            .option("passphrase-file", passphraseOption),
        async (argv: Args) => {
          const pki = await open(argv);
          const pem = await pki.crl();
          await writeFileAtomic(String(argv.out), pem, 0o644);
          const crl = parseCrl(pem);
          if (json(argv))
            return printJson({
              file: argv.out,
              number: crl.number,
              entries: crl.entries.length,
              nextUpdate: crl.nextUpdate,
            });
          say(
            `wrote ${argv.out}: CRL number ${crl.number}, ${crl.entries.length} revoked, next update ${crl.nextUpdate?.toISOString()}`,
          );
        },
      )
      .command(
        "list",
        "every certificate issued: serial, identity, SANs, expiry, status",
        (y) => y.option("dir", dirOption),
        async (argv: Args) => {
          const entries = await listCertificates(String(argv.dir));
          if (json(argv)) return printJson(entries);
          printTable(
            ["SERIAL", "ROLE", "IDENTITY", "SANS", "NOT AFTER", "STATUS"],
            entries.map((e) => [
              e.serial,
              e.role,
              e.id ?? "",
              e.sans.join(","),
              e.notAfter.toISOString(),
              e.status === "revoked" && e.reason ? `revoked (${e.reason})` : e.status,
            ]),
          );
        },
      )
      .command(
        "export-p12",
        "bundle a certificate chain and its key as PKCS#12",
        (y) =>
          y
            .option("cert", { type: "string", demandOption: true, describe: "PREFIX.crt" })
            .option("key", { type: "string", demandOption: true, describe: "PREFIX.key" })
            .option("out", { type: "string", demandOption: true, describe: "FILE.p12" })
            .option("password-file", {
              type: "string",
              describe: "file holding the export password (else SHOAL_P12_PASSWORD)",
            }),
        async (argv: Args) => {
          const password =
            typeof argv["password-file"] === "string"
              ? (await readFileChecked(argv["password-file"])).toString("utf8").replace(/\r?\n$/, "")
              : process.env.SHOAL_P12_PASSWORD;
          if (!password) {
            throw usage(
              "export-p12 needs a password to protect the key",
              "pass --password-file FILE or set SHOAL_P12_PASSWORD",
            );
          }
          const [certPem, keyPem] = await Promise.all([
            readFileChecked(String(argv.cert)),
            readFileChecked(String(argv.key)),
          ]);
          const p12 = exportPkcs12({
            certPem: certPem.toString("utf8"),
            keyPem: keyPem.toString("utf8"),
            password,
          });
          await writeFileAtomic(String(argv.out), p12, 0o600);
          if (json(argv)) return printJson({ file: argv.out, bytes: p12.length });
          say(`wrote ${argv.out} (0600)`);
        },
      )
      .command("join-token", "single-use tokens that let a new node enroll", (jt) =>
        jt
          .command(
            "create",
            "create a join token",
            (y) =>
              y
                .option("dir", dirOption)
                .option("ttl", { type: "string", default: "1h", describe: "lifetime, e.g. 30m, 1h, 24h" })
                .option("uses", {
                  type: "number",
                  default: 1,
                  describe: "how many nodes may enroll with it (each node id once)",
                })
                .option("label", {
                  type: "string",
                  array: true,
                  describe: "k=v label given to the node; repeatable",
                }),
            async (argv: Args) => {
              let ttlMs: number;
              try {
                ttlMs = parseDuration(String(argv.ttl));
              } catch {
                throw usage(`--ttl ${argv.ttl} is not a duration`, "use e.g. --ttl 30m, 1h or 24h");
              }
              const labels = parseLabelOptions(argv.label);
              const dir = String(argv.dir);
              const fingerprint = certFingerprint(await readFileChecked(path.join(dir, PKI_FILES.rootCert)));
              const created = await createJoinToken(dir, { ttlMs, labels, uses: Number(argv.uses) });
              if (json(argv)) return printJson({ ...created, caFingerprint: fingerprint });
              const uses = created.maxUses === 1 ? "single use" : `${created.maxUses} uses`;
              say(`join token ${created.id} (${uses}, expires ${created.expiresAt.toISOString()}):`);
              say(`  ${created.token}`);
              say("on the new node:");
              say(
                `  shoal compute serve --orchestrators tls://ORCHESTRATOR:4222 --join ${created.token} --ca-fingerprint ${fingerprint}`,
              );
            },
          )
          .command(
            "list",
            "join tokens with their expiry and use (never the secrets)",
            (y) => y.option("dir", dirOption),
            async (argv: Args) => {
              const tokens = await listJoinTokens(String(argv.dir));
              if (json(argv)) return printJson(tokens);
              printTable(
                ["ID", "STATE", "EXPIRES", "USES", "USED BY", "LABELS"],
                tokens.map((t) => [
                  t.id,
                  t.state,
                  t.expiresAt.toISOString(),
                  `${t.usedBy.length}/${t.maxUses}`,
                  t.usedBy.join(","),
                  Object.entries(t.labels)
                    .map(([k, v]) => `${k}=${v}`)
                    .join(","),
                ]),
              );
            },
          )
          .command(
            "revoke <token>",
            "stop a join token (by id or whole token) from enrolling anyone",
            (y) => y.positional("token", { type: "string", demandOption: true }).option("dir", dirOption),
            async (argv: Args) => {
              const revoked = await revokeJoinToken(String(argv.dir), String(argv.token));
              if (json(argv)) return printJson(revoked);
              say(
                `revoked join token ${revoked.id} (it had enrolled ${revoked.usedBy.join(", ") || "no node"})`,
              );
            },
          )
          .demandCommand(1, "name a subcommand; see shoal pki join-token --help"),
      )
      .demandCommand(1, "name a subcommand; see shoal pki --help"),
  );
