import "reflect-metadata";
import { existsSync, promises as fs } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import t from "tap";
import { errorCatalogue } from "../core/index.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

/**
 * Every module registers its codes when its public face is imported; modules
 * not written yet are skipped. defineCodes throws when two modules register
 * the same code, so a duplicate fails this import.
 */
const MODULES = ["core", "pki", "fabric", "auth", "orchestrator", "compute"];

t.before(async () => {
  for (const module of MODULES) {
    if (existsSync(path.join(root, module, "index.ts"))) await import(`../${module}/index.js`);
  }
  // The CLI has no public face; its client modules register their own codes.
  await import("../cli/api-client.js");
  await import("../cli/token-store.js");
});

/** The codes in the first cell of the tables in docs/errors.md, with their line numbers. */
async function documentedCodes(): Promise<{ code: string; line: number }[]> {
  const text = await fs.readFile(path.join(root, "docs", "errors.md"), "utf8");
  const rows: { code: string; line: number }[] = [];
  text.split("\n").forEach((line, i) => {
    const cell = /^\|\s*`?([A-Z0-9_]+)`?\s*\|/.exec(line);
    if (cell?.[1]?.startsWith("SHOAL_")) rows.push({ code: cell[1], line: i + 1 });
  });
  return rows;
}

t.test("every registered error code is well-formed and described", async (t) => {
  const catalogue = errorCatalogue();
  t.ok(catalogue.size >= 7, "core's codes at least");
  for (const [code, { module, description }] of catalogue) {
    t.match(code, /^SHOAL_[A-Z0-9_]+$/, `${code} (${module}) looks like SHOAL_<AREA>_<WHAT>`);
    t.ok(description.trim().length > 0, `${code} has a description`);
  }
});

t.test("docs/errors.md documents every code once, and no code that does not exist", async (t) => {
  const rows = await documentedCodes();
  const seen = new Map<string, number>();
  for (const { code, line } of rows) {
    t.notOk(seen.has(code), `${code} documented once (again at docs/errors.md:${line})`);
    seen.set(code, line);
    t.ok(errorCatalogue().has(code), `docs/errors.md:${line}: ${code} is a registered code`);
  }
  for (const [code, { module }] of errorCatalogue()) {
    t.ok(seen.has(code), `${code} (module ${module}) has a row in docs/errors.md`);
  }
});
