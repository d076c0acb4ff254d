import "reflect-metadata";
import t from "tap";
import { defineCodes, errorCatalogue, isShoalError, ShoalError } from "../core/index.js";

t.test("a ShoalError carries its code, fix and name", async (t) => {
  const err = new ShoalError("SHOAL_INTERNAL", "boom", { fix: "do this" });
  t.equal(err.code, "SHOAL_INTERNAL");
  t.ok(isShoalError(err, "SHOAL_INTERNAL"));
  t.notOk(isShoalError(err, "SHOAL_USAGE"));
  t.match(err.describe(), /fix: do this/);
});

t.test("a code registered by two modules throws at import time", async (t) => {
  t.throws(() => defineCodes("other", { SHOAL_INTERNAL: "dup" }), /registered by both core and other/);
  t.ok(errorCatalogue().has("SHOAL_CONFIG_UNKNOWN_KEY"));
});
