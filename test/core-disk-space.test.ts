import os from "node:os";
import path from "node:path";
import t from "tap";
import { DiskSpace } from "../core/index.js";

// The real file system of the temporary directory: its free space is far above 1 byte
// and far below 1 PiB. A full disk for real is in e2e-disk-full.test.ts.
const dir = os.tmpdir();

t.test("room while the free space is at least MinFree", async (t) => {
  t.equal(await new DiskSpace(dir, 1, "Orchestrator.Storage.MinFree").shortfall(), undefined);
  t.equal(
    await new DiskSpace(dir, 0, "Orchestrator.Storage.MinFree").shortfall(),
    undefined,
    "0 keeps nothing free",
  );
});

t.test("below MinFree it says how much is free and how much is wanted", async (t) => {
  const short = await new DiskSpace(dir, 2 ** 50, "Compute.Storage.MinFree").shortfall();
  t.match(
    short,
    new RegExp(
      `^${dir} has \\d+\\.\\d MiB free, less than Compute.Storage.MinFree \\(1073741824\\.0 MiB\\)$`,
    ),
  );
});

t.test(
  "a file system that cannot be read counts as having room (writes there fail on their own)",
  async (t) => {
    t.equal(
      await new DiskSpace(
        path.join(dir, "no-such-dir-for-shoal"),
        2 ** 50,
        "Orchestrator.Storage.MinFree",
      ).shortfall(),
      undefined,
    );
  },
);
