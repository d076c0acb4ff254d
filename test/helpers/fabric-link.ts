import { jetstream } from "@nats-io/jetstream";
import type { Test } from "tap";
import { silentLogger } from "../../core/index.js";
import { FabricLink, type FabricLinkOptions } from "../../orchestrator/fabric-link.js";
import { ModuleStore } from "../../orchestrator/module-store.js";
import { StateStore } from "../../orchestrator/state-store.js";
import { tempDir } from "./cluster.js";
import { joinFabric, startTestFabric } from "./nats.js";
import { testNodeService } from "./node-service.js";

/**
 * An orchestrator's node link, started on a fresh test fabric with its state
 * store and module store, and the identities of orchestrator o1 and compute
 * nodes n1 and n2 (all closed at teardown).
 */
export async function startTestLink(
  t: Test,
  options: Partial<
    Pick<
      FabricLinkOptions,
      "log" | "metrics" | "nodeMessageLimit" | "nodeControlLimits" | "moduleBytesLimit" | "renewCertificate"
    >
  > = {},
) {
  const fabric = await startTestFabric(t);
  const orchId = await fabric.identity("orchestrator", "o1");
  const [n1, n2] = await Promise.all([fabric.identity("compute", "n1"), fabric.identity("compute", "n2")]);
  const conn = await joinFabric(t, fabric, orchId);
  const store = await StateStore.open(jetstream(conn.nc), silentLogger);
  t.teardown(() => store.close());
  const modules = new ModuleStore(await tempDir(t, "shoal-link-"));
  await modules.init();
  const link = await FabricLink.create({
    fabric: conn,
    pki: fabric.pki,
    store,
    nodes: testNodeService(t, store),
    modules,
    log: silentLogger,
    identity: { certFile: orchId.certFile, keyFile: orchId.keyFile },
    ...options,
  });
  await link.start();
  t.teardown(() => link.close());
  return { fabric, orchId, n1, n2, store, modules, link };
}
