import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

/**
 * The version in Shoal's package.json: the nearest one named `shoal` above
 * this module, which is `../package.json` from the sources and
 * `../../package.json` from `dist/` (in a clone and once installed alike).
 * Read once, at load; a Shoal without its package.json is not installed.
 */
export const SHOAL_VERSION: string = findVersion(path.dirname(fileURLToPath(import.meta.url)));

function findVersion(from: string): string {
  for (let dir = from; ; dir = path.dirname(dir)) {
    const manifest = readManifest(path.join(dir, "package.json"));
    if (manifest?.name === "shoal" && typeof manifest.version === "string") return manifest.version;
    if (path.dirname(dir) === dir) throw new Error(`no package.json of shoal above ${from}`);
  }
}

function readManifest(file: string): { name?: unknown; version?: unknown } | undefined {
  try {
    return JSON.parse(readFileSync(file, "utf8")) as { name?: unknown; version?: unknown };
  } catch {
    return undefined;
  }
}
