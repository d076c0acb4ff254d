import "reflect-metadata";
import { execFile } from "node:child_process";
import { promises as fs } from "node:fs";
import { promisify } from "node:util";
import t from "tap";
import { SHOAL_VERSION } from "../core/index.js";

const manifest = JSON.parse(await fs.readFile("package.json", "utf8")) as { version: string };

t.test("the version is package.json's, from the sources and from dist/", async (t) => {
  t.equal(SHOAL_VERSION, manifest.version);
  const { stdout } = await promisify(execFile)("/usr/bin/env", [
    "-u",
    "NODE_OPTIONS",
    process.execPath,
    "--input-type=module",
    "-e",
    'import("./dist/core/index.js").then((m) => console.log(m.SHOAL_VERSION))',
  ]);
  t.equal(stdout.trim(), manifest.version, "dist/ reads the package.json two levels up");
});
