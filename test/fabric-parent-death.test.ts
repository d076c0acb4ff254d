import "reflect-metadata";
import { spawn } from "node:child_process";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import { dieWithParentLauncher, isRunning } from "../core/index.js";
import { FABRIC_CODES, NatsSupervisor } from "../fabric/index.js";
import { tempDir } from "./helpers/cluster.js";

const noLauncher =
  (await dieWithParentLauncher()).length === 0 &&
  "setpriv (util-linux) is not available here: a leftover server is stopped at the next start instead";

t.test("a SIGKILLed supervisor takes its nats-server with it", { skip: noLauncher }, async (t) => {
  const child = spawn(
    process.execPath,
    [
      "--import",
      "@tapjs/typescript/import",
      path.join(import.meta.dirname, "fixtures", "supervised-nats.ts"),
    ],
    { env: { ...process.env, TS_NODE_TRANSPILE_ONLY: "1" }, stdio: ["ignore", "pipe", "inherit"] },
  );
  t.teardown(() => child.kill("SIGKILL"));
  const line = await new Promise<string>((resolve, reject) => {
    let out = "";
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.includes("\n")) resolve(out.trim());
    });
    child.once("exit", () => reject(new Error(`the supervisor exited first: ${out}`)));
  });
  const [pidText, dir] = line.split(" ");
  const natsPid = Number(pidText);
  t.teardown(() => fs.rm(dir!, { recursive: true, force: true }));
  t.ok(await isRunning(natsPid), "nats-server runs");
  child.kill("SIGKILL");
  let gone = false;
  for (let i = 0; i < 100 && !gone; i++) {
    gone = !(await isRunning(natsPid));
    if (!gone) await new Promise((r) => setTimeout(r, 100));
  }
  if (!gone) process.kill(natsPid, "SIGKILL");
  t.ok(gone, "nats-server stopped within 10 s of its parent's SIGKILL");
});

t.test(
  "a missing nats-server binary is still SHOAL_NATS_SERVER_NOT_FOUND through the launcher",
  async (t) => {
    const dir = await tempDir(t);
    const supervisor = new NatsSupervisor({
      dir,
      serverPath: path.join(dir, "no-such-nats-server"),
      port: -1,
      tls: { certFile: "x.crt", keyFile: "x.key", caFile: "ca.crt" },
      identities: [],
    });
    await t.rejects(supervisor.start(), { code: FABRIC_CODES.SHOAL_NATS_SERVER_NOT_FOUND });
  },
);
