import "reflect-metadata";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import t, { type Test } from "tap";
import { main } from "../cli/main.js";
import { defaultConfig } from "../core/index.js";

/** Runs the CLI in this process, capturing what it prints. */
async function shoal(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const { write: writeOut } = process.stdout;
  const { write: writeErr } = process.stderr;
  process.stdout.write = ((chunk: string) => out.push(String(chunk)) > 0) as typeof process.stdout.write;
  process.stderr.write = ((chunk: string) => err.push(String(chunk)) > 0) as typeof process.stderr.write;
  try {
    const code = await main(args);
    return { code, stdout: out.join(""), stderr: err.join("") };
  } finally {
    process.stdout.write = writeOut;
    process.stderr.write = writeErr;
    process.exitCode = undefined;
  }
}

async function configFile(t: Test, text: string): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-config-cli-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, "config.yaml");
  await fs.writeFile(file, text);
  return file;
}

t.test("set then get, keeping the file's comments", async (t) => {
  const file = await configFile(t, "# site settings\nAPI:\n  Port: 8443 # behind the LB\n");
  let r = await shoal("config", "set", "Compute.Heartbeat.Interval", "10s", "--config", file);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, `set Compute.Heartbeat.Interval=10s in ${file}`);
  r = await shoal("config", "set", "Compute.Labels.zone", "eu", "--config", file);
  t.equal(r.code, 0, r.stderr);

  r = await shoal("config", "get", "Compute.Heartbeat.Interval", "--config", file);
  t.equal(r.stdout, "10s\n");
  r = await shoal("config", "get", "Compute.Labels", "--config", file, "--output", "json");
  t.same(JSON.parse(r.stdout), { zone: "eu" });
  r = await shoal("config", "get", "API.Port", "--config", file, "-c", "API.Port=9000");
  t.equal(r.stdout, "9000\n", "-c wins over the file");
  r = await shoal("config", "get", "Compute.Heartbeat", "--config", file);
  t.equal(r.stdout, "Compute.Heartbeat.Interval=10s\n", "a section prints its keys");

  const text = await fs.readFile(file, "utf8");
  t.match(text, /^# site settings\n/);
  t.match(text, /Port: 8443 # behind the LB/);
});

t.test("set honours SHOAL_CONFIG when --config is absent", async (t) => {
  const file = await configFile(t, "");
  const before = process.env.SHOAL_CONFIG;
  process.env.SHOAL_CONFIG = file;
  t.teardown(() => {
    if (before === undefined) delete process.env.SHOAL_CONFIG;
    else process.env.SHOAL_CONFIG = before;
  });
  const r = await shoal("config", "set", "Logging.Level", "debug");
  t.equal(r.code, 0, r.stderr);
  t.match(await fs.readFile(file, "utf8"), /Level: debug/);
  t.equal((await shoal("config", "get", "Logging.Level")).stdout, "debug\n");
});

t.test("list shows every key with where it was set", async (t) => {
  const file = await configFile(t, "API:\n  Port: 8443\n");
  const r = await shoal("config", "list", "--config", file, "-c", "Logging.Level=warn", "--output", "json");
  t.equal(r.code, 0, r.stderr);
  const rows = JSON.parse(r.stdout) as { key: string; value: unknown; source: string }[];
  const row = (key: string) => rows.find((x) => x.key === key);
  t.same(row("API.Port"), { key: "API.Port", value: 8443, source: `${file}:2` });
  t.same(row("Logging.Level"), { key: "Logging.Level", value: "warn", source: "-c Logging.Level=warn" });
  t.same(row("API.Host"), { key: "API.Host", value: "0.0.0.0", source: "default" });

  const text = await shoal("config", "list", "--config", file);
  t.match(text.stdout, `API.Port=8443  # ${file}:2\n`);
  t.match(text.stdout, "API.Auth.Methods=anonymous,clientKey,password,mtls\n");
});

t.test("mistakes exit 1 with the code, the key and the suggestion", async (t) => {
  const file = await configFile(t, "API:\n  Port: 8443\n");
  let r = await shoal("config", "set", "Orchestrator.Tls.CACert", "/ca.crt", "--config", file);
  t.equal(r.code, 1);
  t.match(r.stderr, /SHOAL_CONFIG_UNKNOWN_KEY: unknown config key Orchestrator\.Tls\.CACert/);
  t.match(r.stderr, /did you mean Orchestrator\.TLS\.CACert\?/);

  r = await shoal("config", "get", "API.Port", "--config", file, "-c", "API.Port=x", "--output", "json");
  t.equal(r.code, 1);
  const { error } = JSON.parse(r.stderr);
  t.equal(error.code, "SHOAL_CONFIG_INVALID");
  t.equal(error.keyPath, "API.Port");
  t.equal(error.source, "-c API.Port=x");

  r = await shoal("config", "set", "API.Port", "x", "--config", file);
  t.equal(r.code, 1);
  t.equal(await fs.readFile(file, "utf8"), "API:\n  Port: 8443\n", "nothing written");

  r = await shoal("config", "get", "API.Port", "--config", path.join(path.dirname(file), "missing.yaml"));
  t.equal(r.code, 1);
  t.match(r.stderr, /SHOAL_CONFIG_FILE/);
});

t.test("default prints the defaults as YAML or JSON", async (t) => {
  const json = await shoal("config", "default", "--output", "json");
  t.same(JSON.parse(json.stdout), defaultConfig());
  const yaml = await shoal("config", "default");
  t.match(yaml.stdout, /# Port the HTTPS API listens on \(0 picks a free port\)\.\n {2}Port: 1234\n/);
});
