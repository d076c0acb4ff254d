import t from "tap";
import { systemErrorFix } from "../cli/main.js";

// The fix printed under an operating system's error that reached the CLI without a Shoal code.
t.test(
  "a full disk, a read-only file system and a refused permission get a fix; anything else none",
  async (t) => {
    const enospc = Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
    t.match(systemErrorFix(enospc), /^the disk is full: free space where the data directory is/);
    t.match(systemErrorFix({ code: "EROFS" }), /read-only/);
    t.match(systemErrorFix({ code: "EACCES" }), /permissions/);
    t.equal(systemErrorFix(Object.assign(new Error("x"), { code: "EINVAL" })), undefined);
    t.equal(systemErrorFix(new Error("no code")), undefined);
    t.equal(systemErrorFix("a string"), undefined);
    t.equal(systemErrorFix(undefined), undefined);
  },
);
