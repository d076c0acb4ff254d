import type { Test } from "tap";
import { silentLogger } from "../../core/index.js";
import { NodeService } from "../../orchestrator/node-service.js";
import type { StateStore } from "../../orchestrator/state-store.js";

/**
 * A node registry on `store` as the API and state tests use it: manual
 * approval (so approve/reject have something to decide), a disconnect
 * timeout far beyond the test, closed at teardown.
 */
export function testNodeService(t: Test, store: StateStore): NodeService {
  const nodes = new NodeService({
    store,
    log: silentLogger,
    manualApproval: true,
    disconnectTimeoutMs: 60_000,
    heartbeatIntervalMs: 1000,
  });
  t.teardown(() => nodes.close());
  return nodes;
}
