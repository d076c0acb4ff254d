import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import { EXPIRED_RETENTION_MS, listCertificates, openPki, parseCrl, readInventory } from "../pki/index.js";
import { writeInventory } from "../pki/inventory.js";
import { freshPki, shoal } from "./helpers/pki.js";

t.test("concurrent issue runs in several processes lose no entry and leave valid JSON", async (t) => {
  const { dir, pki, root } = await freshPki(t);
  const processes = Array.from({ length: 4 }, (_, i) =>
    shoal([
      "pki",
      "issue",
      "compute",
      "--dir",
      dir,
      "--id",
      `proc-${i}`,
      "--out",
      path.join(root, `proc-${i}`),
    ]),
  );
  const inProcess = Array.from({ length: 25 }, (_, i) => pki.issue({ role: "compute", id: `local-${i}` }));
  const results = await Promise.all(processes);
  for (const r of results) t.equal(r.code, 0, r.stderr);
  const issued = await Promise.all(inProcess);
  const inv = await readInventory(dir);
  t.equal(inv.certificates.length, 29);
  t.same(
    new Set(inv.certificates.map((e) => e.id)),
    new Set([...issued.map((i) => i.id), "proc-0", "proc-1", "proc-2", "proc-3"]),
  );
  t.equal(new Set(inv.certificates.map((e) => e.serial)).size, 29, "serials are unique");
  const leftovers = (await fs.readdir(dir)).filter((f) => f.endsWith(".tmp") || f.endsWith(".lock"));
  t.same(leftovers, [], "no temporary or lock file left");
});

t.test("list reports valid, revoked and expired; revoke is idempotent; CRL numbers increase", async (t) => {
  const { dir, pki } = await freshPki(t);
  const day = 86_400_000;
  const valid = await pki.issue({ role: "server", dns: ["a.example"] });
  const revoked = await pki.issue({ role: "compute", id: "gone" });
  const expired = await pki.issue({
    role: "user",
    id: "old",
    notBefore: new Date(Date.now() - 3 * day),
    notAfter: new Date(Date.now() - day),
  });
  const first = await pki.revoke(revoked.certPem, "superseded");
  const again = await pki.revoke(revoked.serial.toUpperCase(), "keyCompromise");
  t.same(again.revokedAt, first.revokedAt, "the first revocation stands");
  t.equal(again.reason, "superseded");
  const list = await listCertificates(dir);
  t.same(
    list.map((e) => [e.serial, e.status]),
    [
      [valid.serial, "valid"],
      [revoked.serial, "revoked"],
      [expired.serial, "expired"],
    ],
  );
  t.same(list[0]?.sans, ["localhost", "a.example", "127.0.0.1"]);
  const one = parseCrl(await pki.crl());
  const two = parseCrl(await (await openPki(dir)).crl());
  t.equal(one.number, 1);
  t.equal(two.number, 2);
  t.same(
    two.entries.map((e) => [e.serial, e.reason]),
    [[revoked.serial, "superseded"]],
  );
});

t.test(
  "a certificate expired longer than the retention leaves the inventory and the CRL at the next write",
  async (t) => {
    const { dir, pki } = await freshPki(t);
    const day = 86_400_000;
    const ago = (ms: number) => new Date(Date.now() - ms);
    const recent = await pki.issue({
      role: "compute",
      id: "recent",
      notBefore: ago(3 * day),
      notAfter: ago(day),
    });
    const old = await pki.issue({ role: "compute", id: "old", notBefore: ago(3 * day), notAfter: ago(day) });
    await pki.revoke(old.serial, "superseded");
    t.same(
      parseCrl(await pki.crl()).entries.map((e) => e.serial),
      [old.serial],
    );
    // As if a week and more had passed since "old" expired.
    const inv = await readInventory(dir);
    const entry = inv.certificates.find((e) => e.serial === old.serial)!;
    entry.notAfter = ago(EXPIRED_RETENTION_MS + day);
    await writeInventory(dir, inv);

    const long = await pki.issue({
      role: "compute",
      id: "born-long-expired",
      notBefore: ago(EXPIRED_RETENTION_MS + 3 * day),
      notAfter: ago(EXPIRED_RETENTION_MS + day),
    });
    t.same(
      (await listCertificates(dir)).map((e) => [e.serial, e.status]),
      [[recent.serial, "expired"]],
      "only the certificate expired within the retention is listed",
    );
    t.notOk(
      (await listCertificates(dir)).some((e) => e.serial === long.serial),
      "one issued long expired is not kept",
    );
    t.same(parseCrl(await pki.crl()).entries, [], "nor is the long-expired revoked one in the CRL");
  },
);
