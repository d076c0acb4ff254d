import type { Logger } from "../core/index.js";
import { loadConfig } from "../core/index.js";
import { Orchestrator, type OrchestratorEndpoints } from "../orchestrator/index.js";

/** The admin password a bench orchestrator bootstraps its first admin with. */
export const BENCH_ADMIN_PASSWORD = "bench-admin-password";

/**
 * An in-process orchestrator on loopback with kernel-chosen ports and its own
 * PKI under `dataDir`, for benchmarks; its first admin's password is
 * {@link BENCH_ADMIN_PASSWORD}.
 */
export async function startBenchOrchestrator(
  dataDir: string,
  logger: Logger,
): Promise<{ orch: Orchestrator; ep: OrchestratorEndpoints }> {
  const config = await loadConfig({
    env: {},
    overrides: [
      `DataDir=${dataDir}`,
      "API.Port=0",
      "API.Host=127.0.0.1",
      "Orchestrator.Port=0",
      "Orchestrator.Host=127.0.0.1",
    ],
  });
  const orch = new Orchestrator({
    config,
    logger,
    version: "bench",
    print: () => {},
    env: { SHOAL_ADMIN_PASSWORD: BENCH_ADMIN_PASSWORD },
  });
  return { orch, ep: await orch.start() };
}
