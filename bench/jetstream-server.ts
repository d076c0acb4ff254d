import { spawn } from "node:child_process";
import { promises as fs } from "node:fs";
import path from "node:path";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { dieWithParentLauncher } from "../core/index.js";

/**
 * A plain JetStream nats-server of a benchmark's own, storing in `dir`, on a
 * port it picks (read from its ports file), and a connection to it.
 */
export async function startBenchJetStream(
  dir: string,
): Promise<{ nc: NatsConnection; stop(): Promise<void> }> {
  // Dies with the benchmark, even one that crashes or is killed.
  const [command, ...args] = [
    ...(await dieWithParentLauncher()),
    "nats-server",
    ...["-js", "-a", "127.0.0.1", "-p", "-1", "-sd", dir, "-ports_file_dir", dir],
  ] as [string, ...string[]];
  const server = spawn(command, args, { stdio: "ignore" });
  let url = "";
  for (let i = 0; i < 100 && !url; i++) {
    await new Promise((r) => setTimeout(r, 50));
    const ports = await fs
      .readFile(path.join(dir, `nats-server_${server.pid}.ports`), "utf8")
      .catch(() => "");
    url = (JSON.parse(ports || "{}") as { nats?: string[] }).nats?.[0] ?? "";
  }
  const nc = await connect({ servers: url });
  return {
    nc,
    async stop() {
      await nc.close();
      server.kill();
      await new Promise((r) => server.once("exit", r));
    },
  };
}
