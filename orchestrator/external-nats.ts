import path from "node:path";
import type { Logger, ShoalConfig } from "../core/index.js";
import { connectFabric, type FabricConnection, FabricError } from "../fabric/index.js";
import { ORCHESTRATOR_CODES, OrchestratorError } from "./errors.js";

/** The file in the data dir holding the users block the operator's servers must include. */
export const EXTERNAL_AUTHORIZATION_FILE = "nats-external-authorization.conf";

export interface ExternalNatsOptions {
  /** `Orchestrator.NATS.Servers`. */
  servers: readonly string[];
  /** The CA (bundle) the servers' certificates chain to; it must hold the Shoal CA too. */
  caFile: string;
  certFile: string;
  keyFile: string;
  /** The orchestrator's SPIFFE id. */
  identity: string;
  id: string;
  /** Where the users block is (named in the fixes). */
  authorizationFile: string;
  /** The Shoal CA file (named in the fixes). */
  shoalCaFile: string;
  logger: Logger;
}

/** Refuses settings that cannot work with operator-run NATS servers. */
export function checkExternalNatsConfig(c: ShoalConfig): void {
  if (c.Orchestrator.Cluster.Name) {
    throw new OrchestratorError(
      ORCHESTRATOR_CODES.SHOAL_ORCH_NATS_EXTERNAL_CONFIG,
      "Orchestrator.Cluster.* clusters the supervised nats-server; it cannot be combined with Orchestrator.NATS.Servers",
      500,
      {
        fix: "cluster your own NATS servers yourself and list them in Orchestrator.NATS.Servers, or unset Orchestrator.Cluster.Name",
        field: "Orchestrator.Cluster.Name",
      },
    );
  }
}

/**
 * Connects the orchestrator to operator-run NATS servers with its identity
 * certificate and checks that they offer JetStream. Every failure names
 * what the operator has to change on their server. A JetStream that does not
 * answer yet is not a failure here: a clustered one answers nothing, or "temporarily
 * unavailable", until its servers have elected a meta leader, and the caller
 * waits for that (cluster.ts `whenJetStreamReady`, `OPERATOR_WAIT`); a server
 * without JetStream says so in its INFO.
 */
export async function connectExternalNats(o: ExternalNatsOptions): Promise<FabricConnection> {
  const servers = o.servers.join(", ");
  let fabric: FabricConnection;
  try {
    fabric = await connectFabric({
      servers: o.servers,
      caFile: o.caFile,
      certFile: o.certFile,
      keyFile: o.keyFile,
      identity: o.identity,
      name: `orchestrator-${o.id}`,
      logger: o.logger,
    });
  } catch (err) {
    throw explain(err, o, servers);
  }
  // The server's INFO says whether it runs JetStream at all. Whether JetStream answers yet is
  // the caller's wait: a clustered one refuses or ignores requests until its meta leader is elected.
  if (!fabric.nc.info?.jetstream) {
    await fabric.close();
    throw new OrchestratorError(
      ORCHESTRATOR_CODES.SHOAL_ORCH_NATS_NO_JETSTREAM,
      `JetStream is not enabled on ${servers}`,
      500,
      {
        fix: "enable JetStream on your nats-server (a `jetstream { store_dir: ... }` block) and reload it; Shoal keeps its state in JetStream KV",
      },
    );
  }
  return fabric;
}

/** A connection failure, with the fix an operator of their own NATS server needs. */
function explain(err: unknown, o: ExternalNatsOptions, servers: string): unknown {
  if (!(err instanceof FabricError)) return err;
  // nats-server 2.9.10 resolves `include` relative to the including file's directory, even an absolute path.
  const reload = `copy ${o.authorizationFile} next to the server's configuration file, add \`include ${path.basename(o.authorizationFile)}\` at its top level and reload it (nats-server --signal reload)`;
  switch (err.code) {
    case "SHOAL_NATS_AUTHORIZATION":
      return new OrchestratorError(
        ORCHESTRATOR_CODES.SHOAL_ORCH_NATS_NOT_ADMITTED,
        `${servers} does not admit the orchestrator ${o.identity}: its authorization has no such user`,
        500,
        { cause: err, fix: reload },
      );
    case "SHOAL_TLS_CLIENT_UNKNOWN_CA":
    case "SHOAL_TLS_HANDSHAKE":
      return rewrap(
        err,
        `set ca_file in the server's tls {} block to the Shoal CA (${o.shoalCaFile}) with verify_and_map: true, and reload it`,
      );
    case "SHOAL_NATS_UNREACHABLE":
      return rewrap(err, "start your NATS server, or fix its address in Orchestrator.NATS.Servers");
    case "SHOAL_TLS_SERVER_UNKNOWN_CA":
      return rewrap(
        err,
        `issue the server's certificate from Shoal's PKI (shoal pki issue server --dir ${o.shoalCaFile.replace(/\/ca\.crt$/, "")} --dns HOST), or set Orchestrator.TLS.CACert to a bundle of its CA and the Shoal CA`,
      );
    default:
      return err;
  }
}

function rewrap(err: FabricError, fix: string): FabricError {
  return new FabricError(err.code, err.message, { cause: err, fix, details: { ...err.details } });
}
