import { FABRIC_CODES, FabricError } from "./errors.js";
import { quote as q, type TlsFiles, tlsLines } from "./nats-conf-syntax.js";

/**
 * The route listener of a clustered nats-server: where it listens, whom it
 * dials and the mutual TLS on routes.
 */
export interface NatsClusterState {
  /** `Orchestrator.Cluster.Name`; the same on every server of the cluster. */
  readonly name: string;
  /** Address the route listener binds. */
  readonly host: string;
  /** Route port; `-1` lets nats-server choose (then read back from its log). */
  readonly port: number;
  /** `host:port` the other servers dial for this one; absent means nats-server's own choice. */
  readonly advertise?: string;
  /** Route URLs of the other servers, `nats-route://host:port`. */
  readonly routes: readonly string[];
  /**
   * The one name (a DNS SAN) every route certificate carries: with
   * `verify_and_map`, nats-server admits a route only from a certificate of
   * the fabric CA that has it, so an identity certificate of the same CA
   * (compute, user: URI SAN only) cannot open a route.
   */
  readonly routeName: string;
  /** The route certificate and the fabric CA, which the other servers' route certificates must chain to. */
  readonly tls: TlsFiles;
}

/** The DNS name every route certificate of trust domain `trustDomain` carries (see docs/fabric.md). */
export function routeCertificateName(trustDomain: string): string {
  return `nats-route.${trustDomain.toLowerCase()}`;
}

const HOST_PORT = /^(?:\[([0-9a-fA-F:.]+)\]|([^\s:/[\]]+)):(\d{1,5})$/;

/**
 * `nats-route://host:port` from what an operator writes in
 * `Orchestrator.Cluster.Peers`: `host:port`, `tls://host:port` or
 * `nats-route://host:port` (the port is required: routes have no default).
 */
export function routeUrl(peer: string): string {
  const bare = peer.trim().replace(/^(?:nats-route|tls|nats):\/\//, "");
  const m = HOST_PORT.exec(bare);
  const port = Number(m?.[3]);
  if (!m || !(port >= 1 && port <= 65535)) {
    throw new FabricError(FABRIC_CODES.SHOAL_NATS_CONFIG, `invalid cluster peer ${JSON.stringify(peer)}`, {
      fix: "list peers in Orchestrator.Cluster.Peers as host:port (or nats-route://host:port), e.g. orch-2:6222",
      details: { peer },
    });
  }
  return `nats-route://${m[1] ? `[${m[1]}]` : m[2]}:${port}`;
}

/**
 * The `cluster {}` block. Routes are mutual TLS with the fabric CA
 * (`verify_and_map`: the dialing server's certificate must chain to `ca_file`
 * and carry `routeName`; the dialed server's certificate must chain to it and
 * fit the dialed host). 2.9.10 accepts no `min_version` here either; TLS 1.2
 * is its floor.
 */
export function renderCluster(c: NatsClusterState): string[] {
  if (!Number.isInteger(c.port) || c.port < -1 || c.port > 65535) {
    throw new FabricError(FABRIC_CODES.SHOAL_NATS_CONFIG, `invalid cluster port ${c.port}`, {
      fix: "set Orchestrator.Cluster.Port to a port between 1 and 65535 (0: chosen by nats-server)",
      details: { port: c.port },
    });
  }
  if (!c.name) {
    throw new FabricError(FABRIC_CODES.SHOAL_NATS_CONFIG, "a cluster needs a name", {
      fix: "set Orchestrator.Cluster.Name, the same on every orchestrator of the cluster",
    });
  }
  const lines = [
    "cluster {",
    `  name: ${q(c.name, "cluster name")}`,
    `  host: ${q(c.host, "cluster host")}`,
    `  port: ${c.port}`,
  ];
  if (c.advertise) lines.push(`  advertise: ${q(c.advertise, "cluster advertise address")}`);
  lines.push(
    `  routes: [${c.routes.map((r) => q(routeUrl(r), "route")).join(", ")}]`,
    ...tlsLines(c.tls, "  "),
    "  }",
    `  authorization { user: ${q(c.routeName, "route name")} }`,
    "}",
  );
  return lines;
}
