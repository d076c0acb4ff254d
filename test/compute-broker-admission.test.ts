import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import t from "tap";
import {
  ADMISSION_FILE,
  decideOnRefusal,
  readAdmission,
  recordAdmission,
} from "../compute/broker-admission.js";

/**
 * A broker refusal at connect time: wait for an identity never admitted (the
 * broker was not reloaded for it yet), stop for one it admitted before
 * (revoked, deleted or expired). Fixed identities and dates.
 */
const ID = "spiffe://t.local/compute/n1";
const AT = new Date("2026-01-02T03:04:05Z");

t.test("the decision is a function of the recorded admission", async (t) => {
  t.same(decideOnRefusal(ID, undefined), { action: "wait" }, "never admitted: wait");
  t.same(
    decideOnRefusal(ID, { Identity: ID, FirstAdmittedAt: AT.toISOString() }),
    { action: "stop", admittedAt: AT.toISOString() },
    "admitted before: stop",
  );
  t.same(
    decideOnRefusal(ID, { Identity: "spiffe://t.local/compute/other", FirstAdmittedAt: AT.toISOString() }),
    { action: "wait" },
    "another identity's admission says nothing about this one",
  );
});

t.test("the admission is recorded once, 0600, and read back", async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-admission-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  t.equal(await readAdmission(dir), undefined, "nothing recorded yet");
  await recordAdmission(dir, ID, AT);
  await recordAdmission(dir, ID, new Date("2027-01-01T00:00:00Z"));
  t.same(
    await readAdmission(dir),
    { Identity: ID, FirstAdmittedAt: AT.toISOString() },
    "the first time is kept",
  );
  t.equal((await fs.stat(path.join(dir, ADMISSION_FILE))).mode & 0o777, 0o600);
  await fs.writeFile(path.join(dir, ADMISSION_FILE), "{not json");
  t.equal(
    await readAdmission(dir),
    undefined,
    "an unreadable record counts as never admitted (wait, not stop)",
  );
});
