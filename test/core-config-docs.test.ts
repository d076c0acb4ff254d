import "reflect-metadata";
import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import t from "tap";
import { configKeys, configToYaml, defaultConfig, loadConfig } from "../core/index.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

t.test("docs/config.md has a row for every key and none for keys that do not exist", async (t) => {
  const text = await fs.readFile(path.join(root, "docs", "config.md"), "utf8");
  const documented = new Set<string>();
  for (const line of text.split("\n")) {
    const cell = /^\|\s*`([A-Za-z][A-Za-z0-9.]*)`\s*\|/.exec(line);
    if (cell) documented.add(cell[1]!);
  }
  const keys = configKeys();
  for (const key of keys) t.ok(documented.has(key), `${key} is documented`);
  for (const key of documented) t.ok(keys.includes(key), `documented ${key} is a key`);
});

t.test("the example configs load cleanly and say what they are for", async (t) => {
  const orchestrator = await loadConfig({ file: path.join(root, "configs", "orchestrator.yaml"), env: {} });
  t.equal(orchestrator.Orchestrator.Enabled, true);
  t.equal(orchestrator.Compute.Enabled, false);
  t.equal(orchestrator.DataDir, path.join(os.homedir(), ".shoal", "orchestrator"));

  const compute = await loadConfig({ file: path.join(root, "configs", "compute.yaml"), env: {} });
  t.equal(compute.Compute.Enabled, true);
  t.equal(compute.Orchestrator.Enabled, false);
  t.not(compute.DataDir, orchestrator.DataDir, "both can run on one machine");
  t.same(compute.Compute.Engines.Exec.Allow, ["/bin/echo", "/usr/bin/sha256sum"]);
  t.same(compute.Compute.Labels, { zone: "local", arch: "amd64" });
});

t.test("shoal config default output is a config file that loads back to the defaults", async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-config-docs-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, "config.yaml");
  const yaml = configToYaml(defaultConfig());
  t.match(yaml, /# Port the HTTPS API listens on/);
  await fs.writeFile(file, yaml);
  t.same(await loadConfig({ file, env: {} }), defaultConfig());
});
