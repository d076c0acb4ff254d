import "reflect-metadata";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import t, { type Test } from "tap";
import {
  ConfigError,
  configEnvName,
  configKeys,
  defaultConfig,
  getConfigValue,
  loadConfig,
  NON_CONFIG_ENV,
  nearestKey,
  parseByteSize,
  parseDuration,
  resolveConfig,
  setConfigFileValue,
} from "../core/index.js";

async function tempDir(t: Test): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-config-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

async function writeYaml(t: Test, text: string): Promise<string> {
  const file = path.join(await tempDir(t), "config.yaml");
  await fs.writeFile(file, text);
  return file;
}

/** The ConfigError a promise rejects with (fails the test if it resolves or throws something else). */
async function configError(t: Test, p: Promise<unknown>): Promise<ConfigError> {
  try {
    await p;
  } catch (err) {
    t.ok(err instanceof ConfigError, "rejects with a ConfigError");
    return err as ConfigError;
  }
  t.fail("expected a config error");
  throw new Error("unreachable");
}

t.test("defaults fill every key and the result is deeply frozen", async (t) => {
  const cfg = defaultConfig();
  t.equal(cfg.API.Port, 1234);
  t.equal(cfg.API.Host, "0.0.0.0");
  t.equal(cfg.Orchestrator.Port, 4222);
  t.equal(cfg.Orchestrator.TLS.ServerTimeout, "5s");
  t.equal(cfg.Orchestrator.NATS.ServerPath, "nats-server");
  t.same(cfg.Compute.Orchestrators, ["tls://127.0.0.1:4222"]);
  t.same(cfg.API.Auth.Methods, ["anonymous", "clientKey", "password", "mtls"]);
  t.equal(cfg.PKI.TrustDomain, "shoal.local");
  t.equal(cfg.DataDir, path.join(os.homedir(), ".shoal"), "~ is expanded in paths");
  t.equal(cfg.Compute.Resources.CPU, os.availableParallelism(), "CPU defaults to the machine's");
  t.equal(parseByteSize(cfg.Compute.Resources.Memory), Math.floor(os.totalmem() / 2 ** 20) * 2 ** 20);
  for (const key of configKeys()) t.not(getConfigValue(cfg, key), undefined, `${key} has a default`);

  t.ok(
    Object.isFrozen(cfg) && Object.isFrozen(cfg.Compute.Labels) && Object.isFrozen(cfg.Compute.Orchestrators),
  );
  t.throws(() => {
    (cfg.API as { Port: number }).Port = 1;
  }, TypeError);
  t.throws(() => {
    (cfg.Compute.Orchestrators as string[]).push("tls://x:4222");
  }, TypeError);
  t.not(defaultConfig().Compute.Orchestrators, cfg.Compute.Orchestrators, "each load has its own objects");
});

t.test("precedence: defaults < file < env < -c < flags", async (t) => {
  const file = await writeYaml(t, "API:\n  Port: 1001\n  Host: 127.0.0.1\n");
  const env = { SHOAL_API_PORT: "1002" };
  const overrides = ["API.Port=1003"];
  t.equal((await loadConfig({ env: {} })).API.Port, 1234);
  t.equal((await loadConfig({ file, env: {} })).API.Port, 1001);
  t.equal((await loadConfig({ file, env })).API.Port, 1002);
  t.equal((await loadConfig({ file, env, overrides })).API.Port, 1003);
  const all = await resolveConfig({ file, env, overrides, flags: { "API.Port": 1004, DataDir: undefined } });
  t.equal(all.config.API.Port, 1004);
  t.equal(all.config.API.Host, "127.0.0.1", "keys no higher layer sets keep the file's value");
  t.equal(all.sources.get("API.Port"), "flag API.Port");
  t.equal(all.sources.get("API.Host"), `${file}:3`);
  t.notOk(all.sources.has("DataDir"), "undefined flags are skipped");
  t.equal((await resolveConfig({ file, env })).sources.get("API.Port"), "env SHOAL_API_PORT");
  t.equal((await resolveConfig({ file, env, overrides })).sources.get("API.Port"), "-c API.Port=1003");
  t.equal(
    (await loadConfig({ env: {}, flags: { "API.Port": "1005" } })).API.Port,
    1005,
    "string flags coerce",
  );
});

t.test("unknown keys name the key path, where it came from and the nearest key", async (t) => {
  const file = await writeYaml(t, "# comment\nOrchestrator:\n  Tls:\n    CACert: /ca.crt\n");
  let err = await configError(t, loadConfig({ file, env: {} }));
  t.equal(err.code, "SHOAL_CONFIG_UNKNOWN_KEY");
  t.equal(err.keyPath, "Orchestrator.Tls");
  t.equal(err.suggestion, "Orchestrator.TLS", "a case-insensitive match is the hint");
  t.equal(err.source, `${file}:3`);
  t.match(err.message, /did you mean Orchestrator\.TLS\?/);

  err = await configError(t, loadConfig({ env: {}, overrides: ["Orchestrator.Tls.CACert=/ca.crt"] }));
  t.equal(err.code, "SHOAL_CONFIG_UNKNOWN_KEY");
  t.equal(err.keyPath, "Orchestrator.Tls.CACert");
  t.equal(err.suggestion, "Orchestrator.TLS.CACert");

  err = await configError(t, loadConfig({ env: {}, overrides: ["API.Prot=1"] }));
  t.equal(err.suggestion, "API.Port", "a transposition is one edit");
  err = await configError(t, loadConfig({ env: {}, flags: { "Compute.CPU": 2 } }));
  t.equal(err.suggestion, "Compute.Resources.CPU", "the same key under another section");
  err = await configError(t, loadConfig({ env: {}, overrides: ["Zzzzzz=1"] }));
  t.equal(err.code, "SHOAL_CONFIG_UNKNOWN_KEY");
  t.equal(err.suggestion, undefined, "no suggestion when nothing is close");

  err = await configError(
    t,
    loadConfig({ file: await writeYaml(t, "Logging:\n  Level: info\nLoging: {}\n"), env: {} }),
  );
  t.equal(err.keyPath, "Loging");
  t.equal(err.suggestion, "Logging");
  t.match(err.source, /:3$/);
});

t.test("SHOAL_* environment variables", async (t) => {
  t.equal(configEnvName("Orchestrator.TLS.ServerCert"), "SHOAL_ORCHESTRATOR_TLS_SERVERCERT");
  const names = configKeys().map(configEnvName);
  t.equal(new Set(names).size, names.length, "every key has its own env name");

  const cfg = await loadConfig({
    env: {
      SHOAL_ORCHESTRATOR_NODEMANAGER_MANUALAPPROVAL: "yes",
      SHOAL_API_TLS_INSECURE: "FALSE",
      SHOAL_API_PORT: "8443",
      SHOAL_COMPUTE_RESOURCES_CPU: "1.5",
      SHOAL_COMPUTE_ORCHESTRATORS: "tls://a:4222, tls://b:4222,",
      SHOAL_API_AUTH_METHODS: "password,mtls",
      SHOAL_COMPUTE_LABELS: "zone=eu-west-1, gpu=true,expr=a=b",
      SHOAL_ORCHESTRATOR_TLS_SERVERTIMEOUT: "2s",
      SHOAL_DATADIR: "", // empty counts as unset
      PATH: "/usr/bin",
      ...Object.fromEntries([...NON_CONFIG_ENV].map((n) => [n, "not config"])),
    },
  });
  t.equal(cfg.Orchestrator.NodeManager.ManualApproval, true);
  t.equal(cfg.API.TLS.Insecure, false);
  t.equal(cfg.API.Port, 8443);
  t.equal(cfg.Compute.Resources.CPU, 1.5);
  t.same(cfg.Compute.Orchestrators, ["tls://a:4222", "tls://b:4222"]);
  t.same(cfg.API.Auth.Methods, ["password", "mtls"]);
  t.same(cfg.Compute.Labels, { zone: "eu-west-1", gpu: "true", expr: "a=b" });
  t.equal(cfg.Orchestrator.TLS.ServerTimeout, "2s");
  t.equal(cfg.DataDir, path.join(os.homedir(), ".shoal"));

  let err = await configError(t, loadConfig({ env: { SHOAL_API_PROT: "1" } }));
  t.equal(err.code, "SHOAL_CONFIG_UNKNOWN_KEY");
  t.equal(err.keyPath, "SHOAL_API_PROT");
  t.equal(err.suggestion, "SHOAL_API_PORT");
  err = await configError(t, loadConfig({ env: { SHOAL_PASWORD: "x" } }));
  t.equal(err.suggestion, "SHOAL_PASSWORD", "non-config variables are suggested too");
  err = await configError(t, loadConfig({ env: { SHOAL_ORCHESTRATOR_NODEMANAGER_MANUALAPPROVAL: "maybe" } }));
  t.equal(err.code, "SHOAL_CONFIG_INVALID");
  t.equal(err.keyPath, "Orchestrator.NodeManager.ManualApproval");
  t.equal(err.source, "env SHOAL_ORCHESTRATOR_NODEMANAGER_MANUALAPPROVAL");
  t.match(err.message, /must be true or false, got "maybe"/);
});

t.test("wrong types and formats name the key path and the source", async (t) => {
  const file = await writeYaml(t, 'API:\n  Host: 127.0.0.1\n  Port: "eighty"\n');
  let err = await configError(t, loadConfig({ file, env: {} }));
  t.equal(err.code, "SHOAL_CONFIG_INVALID");
  t.equal(err.keyPath, "API.Port");
  t.equal(err.source, `${file}:3`);
  t.match(err.message, /API\.Port must be an integer from 0 to 65535, got "eighty"/);

  const cases: [string, string, RegExp][] = [
    ["API.Port=70000", "API.Port", /from 0 to 65535/],
    ["Logging.Format=xml", "Logging.Format", /one of json, text/],
    ["API.Auth.Methods=password,kerberos", "API.Auth.Methods", /Methods\[1\] must be one of anonymous/],
    [
      "Compute.Engines.Exec.Allow=/bin/echo,ls",
      "Compute.Engines.Exec.Allow",
      /Allow\[1\] must be an absolute path/,
    ],
    [
      "Orchestrator.NodeManager.Identities=spiffe://x/admin/a",
      "Orchestrator.NodeManager.Identities",
      /SPIFFE ID/,
    ],
    ["PKI.TrustDomain=Shoal Local", "PKI.TrustDomain", /lower-case DNS name/],
    ["Compute.Resources.CPU=0", "Compute.Resources.CPU", /greater than 0/],
    ["Compute.Resources.Memory=lots", "Compute.Resources.Memory", /size like 512Mi/],
    ["Compute.Labels=zone", "Compute.Labels", /map of names to strings/],
    ["Compute.Labels=bad key=x", "Compute.Labels", /label key "bad key": 1 to 128 letters/],
    ["Compute.Labels=_x=1", "Compute.Labels", /label key "_x"/],
    [`Compute.Labels=zone=${"v".repeat(257)}`, "Compute.Labels", /label zone: a value of at most 256/],
    [
      `Compute.Labels=${Array.from({ length: 65 }, (_, i) => `k${i}=v`).join(",")}`,
      "Compute.Labels",
      /65 labels, more than 64/,
    ],
    ["API.TLS=x", "API.TLS", /is a section; set one of its keys: API\.TLS\.CertFile/],
  ];
  for (const [override, keyPath, message] of cases) {
    err = await configError(t, loadConfig({ env: {}, overrides: [override] }));
    t.equal(err.code, "SHOAL_CONFIG_INVALID", override);
    t.equal(err.keyPath, keyPath, override);
    t.match(err.message, message, override);
  }
  err = await configError(t, loadConfig({ env: {}, overrides: ["API.Port"] }));
  t.equal(err.code, "SHOAL_CONFIG_INVALID", "-c without = is refused");

  const sectionAsScalar = await writeYaml(t, "API:\n  TLS: yes\n");
  err = await configError(t, loadConfig({ file: sectionAsScalar, env: {} }));
  t.equal(err.code, "SHOAL_CONFIG_INVALID");
  t.equal(err.keyPath, "API.TLS");

  const labels = await writeYaml(t, "Compute:\n  Labels:\n    zone: eu\n    rack: [1, 2]\n");
  err = await configError(t, loadConfig({ file: labels, env: {} }));
  t.equal(err.keyPath, "Compute.Labels");
  t.match(err.message, /Compute\.Labels\.rack must be a string/);
});

t.test("YAML scalars are taken as text for string keys; null means default", async (t) => {
  const file = await writeYaml(
    t,
    "Orchestrator:\n  Cluster:\n    Name: 2024\nCompute:\n  Labels: {gpu: true, n: 4}\n  API:\nAPI:\n",
  );
  const cfg = await loadConfig({ file, env: {} });
  t.equal(cfg.Orchestrator.Cluster.Name, "2024");
  t.same(cfg.Compute.Labels, { gpu: "true", n: "4" });
  t.equal(cfg.Compute.API, "");
});

t.test("a YAML scalar for a string key is taken as written, as the same value from a flag is", async (t) => {
  const file = await writeYaml(
    t,
    "Compute:\n  Labels: {version: 1.10, rack: 007, id: 0x1F, big: 1e3, quoted: '1.10', same: &v 2.50, alias: *v}\n",
  );
  const cfg = await loadConfig({ file, env: {} });
  t.same(cfg.Compute.Labels, {
    version: "1.10",
    rack: "007",
    id: "0x1F",
    big: "1e3",
    quoted: "1.10",
    same: "2.50",
    alias: "2.50",
  });
  const flagged = await loadConfig({ env: {}, overrides: ["Compute.Labels.version=1.10"] });
  t.equal(flagged.Compute.Labels.version, cfg.Compute.Labels.version, "file and flag agree");
  // Keys typed as numbers stay numbers, whatever their spelling.
  const numbers = await writeYaml(t, "API:\n  Port: 08443\n");
  t.equal((await loadConfig({ file: numbers, env: {} })).API.Port, 8443);
  // `config set` writes the text unquoted; reading it back keeps it.
  const set = path.join(await tempDir(t), "config.yaml");
  await setConfigFileValue(set, "Compute.Labels.version", "1.10");
  t.equal((await loadConfig({ file: set, env: {} })).Compute.Labels.version, "1.10");
});

t.test("durations", async (t) => {
  t.equal(parseDuration("30s"), 30_000);
  t.equal(parseDuration("5m"), 300_000);
  t.equal(parseDuration("24h"), 86_400_000);
  t.equal(parseDuration("1h30m"), 5_400_000);
  t.equal(parseDuration("250ms"), 250);
  t.equal(parseDuration("1.5s"), 1500);
  t.equal(parseDuration("2d"), 172_800_000);
  for (const bad of ["", "5", "5 s", "s", "-1s", "1w", "1h 30m", "1.s"]) {
    t.throws(() => parseDuration(bad), RangeError, JSON.stringify(bad));
  }
  const err = await configError(t, loadConfig({ env: { SHOAL_PKI_CERTTTL: "24" } }));
  t.equal(err.code, "SHOAL_CONFIG_INVALID");
  t.equal(err.keyPath, "PKI.CertTTL");
  t.match(err.message, /must be a duration like 30s, 5m or 24h, got "24" \(env SHOAL_PKI_CERTTTL\)/);
});

t.test("byte sizes", async (t) => {
  t.equal(parseByteSize("1024"), 1024);
  t.equal(parseByteSize("512Mi"), 512 * 2 ** 20);
  t.equal(parseByteSize("4Gi"), 4 * 2 ** 30);
  t.equal(parseByteSize("1.5G"), 1.5e9);
  t.equal(parseByteSize("100MB"), 1e8);
  for (const bad of ["", "Mi", "4 Gi", "4gi", "-1"]) t.throws(() => parseByteSize(bad), RangeError, bad);
});

t.test("Compute.Labels: whole map, single entries, and replacement", async (t) => {
  const file = await writeYaml(t, "Compute:\n  Labels:\n    zone: eu\n    arch: arm64\n");
  let res = await resolveConfig({
    file,
    env: {},
    overrides: ["Compute.Labels.gpu=a100", "Compute.Labels.zone=us"],
  });
  t.same(res.config.Compute.Labels, { zone: "us", arch: "arm64", gpu: "a100" });
  t.equal(res.sources.get("Compute.Labels.gpu"), "-c Compute.Labels.gpu=a100");
  res = await resolveConfig({
    file,
    env: {},
    overrides: ["Compute.Labels.gpu=a100", "Compute.Labels=os=linux"],
  });
  t.same(res.config.Compute.Labels, { os: "linux" }, "setting the whole map replaces it");
  t.same([...res.sources.keys()], ["Compute.Labels"]);
  t.same((await loadConfig({ env: {}, overrides: ["Compute.Labels="] })).Compute.Labels, {});
  t.equal(getConfigValue(res.config, "Compute.Labels.os"), "linux");
  t.equal(getConfigValue(res.config, "Compute.Labels.none"), undefined);
  const dotted = await loadConfig({ env: {}, overrides: ["Compute.Labels.kubernetes.io/arch=arm64"] });
  t.same(dotted.Compute.Labels, { "kubernetes.io/arch": "arm64" }, "entry names may hold dots");
});

t.test("keys that must be set together, or not together", async (t) => {
  let err = await configError(t, loadConfig({ env: {}, overrides: ["API.TLS.CertFile=/etc/api.crt"] }));
  t.equal(err.code, "SHOAL_CONFIG_INVALID");
  t.equal(err.keyPath, "API.TLS.KeyFile");
  t.equal(err.source, "-c API.TLS.CertFile=/etc/api.crt");
  err = await configError(
    t,
    loadConfig({
      env: {},
      overrides: ["Orchestrator.TLS.ServerCert=/s.crt", "Orchestrator.TLS.ServerKey=/s.key"],
    }),
  );
  t.equal(err.keyPath, "Orchestrator.TLS.CACert");
  err = await configError(t, loadConfig({ env: {}, overrides: ["Compute.TLS.ClientKey=/c.key"] }));
  t.equal(err.keyPath, "Compute.TLS.ClientCert");
  err = await configError(
    t,
    loadConfig({
      env: {},
      overrides: ["API.TLS.CertFile=/a.crt", "API.TLS.KeyFile=/a.key", "API.TLS.AutoCert=shoal.example.com"],
    }),
  );
  t.equal(err.keyPath, "API.TLS.AutoCert");
  err = await configError(t, loadConfig({ env: {}, overrides: ["PKI.RenewBefore=24h"] }));
  t.equal(err.keyPath, "PKI.RenewBefore");
  t.match(err.message, /must be shorter than PKI\.CertTTL \(24h\)/);
  const ok = await loadConfig({ env: {}, overrides: ["PKI.CertTTL=7d", "PKI.RenewBefore=24h"] });
  t.equal(ok.PKI.RenewBefore, "24h");
});

t.test("paths: ~ expands to the home directory, others are kept", async (t) => {
  const cfg = await loadConfig({
    env: {},
    overrides: [
      "DataDir=~/nodes/a",
      "API.TLS.CAFile=rel/ca.crt",
      "Orchestrator.NATS.ServerPath=~/bin/nats-server",
    ],
  });
  t.equal(cfg.DataDir, path.join(os.homedir(), "nodes/a"));
  t.equal(cfg.API.TLS.CAFile, "rel/ca.crt");
  t.equal(cfg.Orchestrator.NATS.ServerPath, "~/bin/nats-server", "only path keys expand");
});

t.test("config file problems are SHOAL_CONFIG_FILE errors with file:line", async (t) => {
  const syntax = await writeYaml(t, "API:\n  Port: 1234\n  Host: [127.0.0.1\nDataDir: /x\n");
  let err = await configError(t, loadConfig({ file: syntax, env: {} }));
  t.equal(err.code, "SHOAL_CONFIG_FILE");
  t.match(err.message, new RegExp(`^${syntax.replaceAll(".", "\\.")}:4: not valid YAML`));
  t.equal(err.source, `${syntax}:4`);

  const dup = await writeYaml(t, "API:\n  Port: 1\n  Port: 2\n");
  err = await configError(t, loadConfig({ file: dup, env: {} }));
  t.equal(err.code, "SHOAL_CONFIG_FILE");
  t.match(err.message, /:3: not valid YAML: Map keys must be unique/);

  err = await configError(t, loadConfig({ file: await writeYaml(t, "- a\n- b\n"), env: {} }));
  t.equal(err.code, "SHOAL_CONFIG_FILE");
  t.match(err.message, /top level must be a map/);

  err = await configError(t, loadConfig({ file: path.join(await tempDir(t), "absent.yaml"), env: {} }));
  t.equal(err.code, "SHOAL_CONFIG_FILE");
  t.match(err.message, /ENOENT/);

  t.same(await loadConfig({ file: await writeYaml(t, "# only comments\n"), env: {} }), defaultConfig());
});

t.test("getConfigValue reads leaves, sections and map entries", async (t) => {
  const cfg = defaultConfig();
  t.equal(getConfigValue(cfg, "Orchestrator.Scheduler.RetryBudget"), 3);
  t.same(getConfigValue(cfg, "Compute.Heartbeat"), { Interval: "5s" });
  const err = await configError(
    t,
    Promise.resolve().then(() => getConfigValue(cfg, "compute.heartbeat.interval")),
  );
  t.equal(err.code, "SHOAL_CONFIG_UNKNOWN_KEY");
  t.equal(err.suggestion, "Compute.Heartbeat.Interval");
});

t.test("nearestKey", async (t) => {
  const keys = ["API.Port", "API.Host", "Orchestrator.Port", "Compute.Resources.CPU", "PKI.CertTTL"];
  t.equal(nearestKey("api.port", keys), "API.Port");
  t.equal(nearestKey("API.Hots", keys), "API.Host");
  t.equal(nearestKey("PKI.CertTL", keys), "PKI.CertTTL");
  t.equal(nearestKey("Foo.CPU", keys), "Compute.Resources.CPU");
  t.equal(nearestKey("Something.Else", keys), undefined);
});

t.test("setConfigFileValue keeps comments, validates first, writes atomically", async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, "config.yaml");
  const original = "# Operator's notes\nAPI:\n  Port: 8443 # public port\nCompute:\n";
  await fs.writeFile(file, original, { mode: 0o640 });

  await setConfigFileValue(file, "Compute.Labels.zone", "eu");
  await setConfigFileValue(file, "API.Port", "9443");
  await setConfigFileValue(file, "Compute.Orchestrators", "tls://a:4222,tls://b:4222");
  const text = await fs.readFile(file, "utf8");
  t.match(text, /^# Operator's notes\n/);
  t.match(text, /Port: 9443 # public port/);
  const cfg = await loadConfig({ file, env: {} });
  t.equal(cfg.API.Port, 9443);
  t.same(cfg.Compute.Labels, { zone: "eu" });
  t.same(cfg.Compute.Orchestrators, ["tls://a:4222", "tls://b:4222"]);
  t.equal((await fs.stat(file)).mode & 0o777, 0o640, "keeps the file's mode");

  const before = await fs.readFile(file, "utf8");
  let err = await configError(t, setConfigFileValue(file, "API.Port", "high"));
  t.equal(err.code, "SHOAL_CONFIG_INVALID");
  err = await configError(t, setConfigFileValue(file, "API.Prot", "1"));
  t.equal(err.code, "SHOAL_CONFIG_UNKNOWN_KEY");
  t.equal(err.suggestion, "API.Port");
  err = await configError(t, setConfigFileValue(file, "API.TLS.CertFile", "/only-cert.pem"));
  t.equal(err.keyPath, "API.TLS.KeyFile", "the file as a whole must stay valid");
  t.equal(await fs.readFile(file, "utf8"), before, "a refused value leaves the file as it was");
  t.same(await fs.readdir(dir), ["config.yaml"], "no temporary files left behind");

  const fresh = path.join(dir, "new", "config.yaml");
  await setConfigFileValue(fresh, "Logging.Level", "debug");
  t.equal((await loadConfig({ file: fresh, env: {} })).Logging.Level, "debug");
  t.equal((await fs.stat(fresh)).mode & 0o777, 0o600, "a new config file is 0600");
  t.equal((await fs.stat(path.dirname(fresh))).mode & 0o777, 0o700);

  const broken = path.join(dir, "broken.yaml");
  await fs.writeFile(broken, "API: [\n");
  err = await configError(t, setConfigFileValue(broken, "API.Port", "1"));
  t.equal(err.code, "SHOAL_CONFIG_FILE");
});
