/**
 * The compute nodes of bench/jobs.ts, all on one worker thread of their own:
 * a node runs on its own machine, not on the orchestrator's event loop, so
 * the bench keeps the nodes' work off the orchestrator's thread (as
 * bench/jobs-clients.ts does the clients'). They talk to the orchestrator
 * over the real mTLS fabric; their CPU still counts in the process's.
 *
 * Started with a {@link NodesSetup}; posts `{ ready: true, threadStat }` (or
 * `{ error }`), then closes the nodes at the first message and posts
 * `{ closed: true }`.
 */
import "reflect-metadata";
import { isMainThread, parentPort, workerData } from "node:worker_threads";
import { ComputeNode } from "../compute/index.js";
import { createLogger, loadConfig } from "../core/index.js";
import { threadStatFile } from "./thread-stat.js";

export interface NodesSetup {
  /** Each node's DataDir, with its identity.crt and identity.key in it. */
  dirs: string[];
  natsUrl: string;
  caFile: string;
}

if (!isMainThread && parentPort) {
  const setup = workerData as NodesSetup;
  const port = parentPort;
  const logger = createLogger({ level: "error" });
  const nodes: ComputeNode[] = [];
  try {
    for (const dir of setup.dirs) {
      const config = await loadConfig({
        env: {},
        overrides: [
          `DataDir=${dir}`,
          `Compute.Orchestrators=${setup.natsUrl}`,
          `Compute.TLS.CACert=${setup.caFile}`,
          `Compute.TLS.ClientCert=${dir}/identity.crt`,
          `Compute.TLS.ClientKey=${dir}/identity.key`,
        ],
      });
      const node = new ComputeNode({ config, logger });
      await node.start();
      nodes.push(node);
    }
    port.postMessage({ ready: true, threadStat: threadStatFile() });
  } catch (err) {
    port.postMessage({ error: String(err) });
  }
  port.once("message", async () => {
    for (const n of nodes) await n.close();
    port.postMessage({ closed: true });
  });
}
