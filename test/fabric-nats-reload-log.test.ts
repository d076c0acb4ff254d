import "reflect-metadata";
import { Writable } from "node:stream";
import t from "tap";
import { createLogger } from "../core/index.js";
import { joinFabric, startTestFabric } from "./helpers/nats.js";

/**
 * At every reload nats-server warns, for each client it mapped from its
 * certificate, "User ... found in connect proto, but user required from
 * cert". Nothing is wrong, so the supervisor logs it at debug: an operator's
 * log does not get one warning per connected node at each enrollment.
 */
t.test("a reload with a node connected logs no warning", async (t) => {
  const lines: { level: number; component?: string; msg: string }[] = [];
  const destination = new Writable({
    write(chunk, _encoding, done) {
      for (const line of String(chunk).split("\n")) if (line) lines.push(JSON.parse(line));
      done();
    },
  });
  const fabric = await startTestFabric(t, {
    jetStream: false,
    logger: createLogger({ level: "debug", destination }),
  });
  await joinFabric(t, fabric, await fabric.identity("compute", "n1"));
  await fabric.identity("compute", "n2"); // a new identity: the users change, the server reloads
  const benign = () => lines.filter((l) => /found in connect proto/.test(l.msg));
  for (let i = 0; i < 100 && benign().length === 0; i++) await new Promise((r) => setTimeout(r, 50));
  t.ok(benign().length > 0, "nats-server said it for the connected node");
  t.same(
    benign().map((l) => l.level),
    benign().map(() => 20),
    "at debug",
  );
  t.same(
    lines.filter((l) => l.component === "nats-server" && l.level >= 40).map((l) => l.msg),
    [],
    "and nothing of the server's at warn or above",
  );
});
