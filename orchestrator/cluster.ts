import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import { JetStreamApiError, jetstreamManager, type StreamInfo } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import type { Logger, ShoalConfig } from "../core/index.js";
import { type NatsClusterState, routeCertificateName, routeUrl } from "../fabric/index.js";
import { ORCHESTRATOR_CODES, OrchestratorError } from "./errors.js";

/** Most copies a KV bucket gets in a cluster (JetStream's usual R3). */
export const MAX_REPLICAS = 3;
/** How long a clustered orchestrator waits at start-up for JetStream (its meta leader needs a quorum of servers). */
export const DEFAULT_JETSTREAM_WAIT_MS = 60_000;
/**
 * JetStream request timeout in a cluster: a replicated write is a round of
 * Raft between servers, and just after start-up (leader elections) it can take
 * longer than the client's default 5 s on a loaded machine.
 */
export const CLUSTER_JETSTREAM_TIMEOUT_MS = 15_000;

/** `Orchestrator.Cluster` turned into the supervisor's route settings; undefined when Name is empty (one server). */
export function clusterState(
  c: ShoalConfig["Orchestrator"]["Cluster"],
  trustDomain: string,
  tls: NatsClusterState["tls"],
): NatsClusterState | undefined {
  if (!c.Name) return undefined;
  return {
    name: c.Name,
    host: c.Host,
    port: c.Port === 0 ? -1 : c.Port,
    ...(c.Advertise ? { advertise: c.Advertise } : {}),
    routes: c.Peers.map(routeUrl),
    routeName: routeCertificateName(trustDomain),
    tls,
  };
}

/**
 * Copies of each KV bucket this orchestrator creates: min(3, cluster size),
 * the cluster being this server and its distinct peers; 1 without a cluster.
 * A bucket that exists keeps the copies it was made with.
 */
export function bucketReplicas(c: ShoalConfig["Orchestrator"]["Cluster"]): number {
  if (!c.Name) return 1;
  return Math.min(MAX_REPLICAS, new Set(c.Peers.map(routeUrl)).size + 1);
}

/**
 * The names the route certificate (the NATS server certificate) must carry
 * besides the broker's own: the route name every server checks, and the
 * host the other servers dial (Cluster.Advertise, or Cluster.Host when bound
 * to one address).
 */
export function routeCertificateNames(
  c: ShoalConfig["Orchestrator"]["Cluster"],
  trustDomain: string,
): string[] {
  if (!c.Name) return [];
  const names = [routeCertificateName(trustDomain)];
  const advertised = c.Advertise ? c.Advertise.replace(/:\d+$/, "").replace(/^\[(.*)\]$/, "$1") : "";
  if (advertised) names.push(advertised);
  if (!["0.0.0.0", "::", ""].includes(c.Host)) names.push(c.Host);
  return names;
}

/**
 * This server's `server_name`, unique in the cluster and stable across
 * restarts (JetStream identifies its peers by it): made once, kept in
 * `natsDir/server-name`.
 */
export async function serverName(natsDir: string, prefix: string): Promise<string> {
  const file = path.join(natsDir, "server-name");
  const have = (await fs.readFile(file, "utf8").catch(() => "")).trim();
  if (have) return have;
  const name = `${prefix}-${randomBytes(4).toString("hex")}`;
  await fs.mkdir(natsDir, { recursive: true, mode: 0o700 });
  await fs.writeFile(file, `${name}\n`, { mode: 0o600 });
  return name;
}

/** Whose JetStream an orchestrator waits for at start-up: what it logs while waiting, and the error when it gives up. */
export interface JetStreamWait {
  waiting: string;
  code: keyof typeof ORCHESTRATOR_CODES;
  fix: string;
}

/** The JetStream of Shoal's own cluster (Orchestrator.Cluster): its meta leader needs a quorum of the orchestrators' servers. */
export const CLUSTER_WAIT: JetStreamWait = {
  waiting: "waiting for the JetStream cluster (a quorum of the orchestrators' servers must be up)",
  code: ORCHESTRATOR_CODES.SHOAL_ORCH_CLUSTER_QUORUM,
  fix: "start the other orchestrators of Orchestrator.Cluster.Peers (more than half of the cluster must be up), and check that their routes connect (SHOAL_NATS_ROUTE_REJECTED in the log)",
};

/** The operator's JetStream (Orchestrator.NATS.Servers): a clustered one serves once its servers elected a meta leader. */
export const OPERATOR_WAIT: JetStreamWait = {
  waiting:
    "waiting for JetStream on the operator-run NATS servers (a clustered JetStream needs a quorum of its servers up)",
  code: ORCHESTRATOR_CODES.SHOAL_ORCH_NATS_NO_JETSTREAM,
  fix: "check that JetStream is enabled on your nats-servers and, if they are clustered, that more than half of them are up and routed (`nats-server` logs a JetStream meta leader)",
};

/**
 * Runs `step` (opening KV buckets and object stores) until it succeeds and each
 * of their `streams` has a leader. In a cluster, JetStream
 * serves nothing until its meta group has a leader, which needs a quorum of
 * the servers, and a new leader's first moments refuse stream creation
 * ("jetstream is not enabled", timeouts): the orchestrators of a cluster must
 * therefore start within `timeoutMs` of each other, and one on an operator's
 * clustered JetStream within `timeoutMs` of its servers. Resolves to what
 * `step` opened and the streams' infos as the leader check read them.
 */
export async function whenJetStreamReady<T>(
  nc: NatsConnection,
  log: Logger,
  timeoutMs: number,
  step: () => Promise<T>,
  streams: readonly string[],
  wait: JetStreamWait = CLUSTER_WAIT,
): Promise<{ opened: T; infos: StreamInfo[] }> {
  const deadline = Date.now() + timeoutMs;
  let told = false;
  for (;;) {
    try {
      const jsm = await jetstreamManager(nc, { timeout: 2000 });
      await jsm.getAccountInfo();
      const opened = await step();
      // A replicated stream takes writes once its own group has elected a leader.
      const infos: StreamInfo[] = [];
      for (const stream of streams) {
        const info = await jsm.streams.info(stream);
        if (info.cluster && !info.cluster.leader) throw new Error(`stream ${stream} has no leader yet`);
        infos.push(info);
      }
      return { opened, infos };
    } catch (err) {
      if (nc.isClosed()) throw err; // shutting down
      if (Date.now() >= deadline) {
        throw new OrchestratorError(
          wait.code,
          `JetStream did not become available within ${timeoutMs / 1000} s: ${(err as Error).message}`,
          500,
          { cause: err, fix: wait.fix },
        );
      }
      if (!told) {
        log.info({ reason: (err as Error).message }, wait.waiting);
        told = true;
      }
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

/** Tries of one raise that gets no answer (a timeout, not a refusal) before it is left for a later start. */
const RAISE_ATTEMPTS = 3;

/**
 * Raises the number of copies of the streams (as `infos` describe them) that
 * have fewer than `wanted`: buckets made while the cluster had fewer peers
 * keep their count otherwise (a cluster grown from two orchestrators to three
 * would stay without fault tolerance). `wanted` may be counts to try, most
 * first: a count the servers refuse is not tried again for the streams after.
 * Never lowers a count, and sends nothing when every stream has its count.
 * A raise that gets no answer in time (the servers are busy electing leaders)
 * is not a refusal: it is asked again, up to {@link RAISE_ATTEMPTS} times.
 * When a stream cannot be raised now (not enough servers up, or still no
 * answer), it is logged and the streams after it are not tried either
 * (start-up waits for this, at most RAISE_ATTEMPTS requests' timeouts): they
 * keep their count until a later start. Never rejects; resolves to the
 * streams raised.
 */
export async function raiseReplicas(
  nc: NatsConnection,
  infos: readonly StreamInfo[],
  wanted: number | readonly number[],
  log: Logger,
): Promise<string[]> {
  const counts = [wanted].flat();
  const raised: string[] = [];
  const few = infos.filter((info) => info.config.num_replicas < counts[0]!);
  if (few.length === 0) return raised;
  const jsm = await jetstreamManager(nc).catch((err: unknown) => {
    log.warn({ err }, "cannot raise the copies of the streams now; they keep their count");
  });
  if (!jsm) return raised;
  for (const { config } of few) {
    for (let attempt = 1; config.num_replicas < counts[0]!; attempt++) {
      const replicas = counts[0]!;
      try {
        await jsm.streams.update(config.name, { ...config, num_replicas: replicas });
        log.info(
          { stream: config.name, from: config.num_replicas, to: replicas },
          "copies of the stream raised",
        );
        raised.push(config.name);
        break;
      } catch (err) {
        // No answer in time (servers busy electing leaders) is not a refusal: asked again, not fewer.
        if (!(err instanceof JetStreamApiError) && attempt < RAISE_ATTEMPTS) {
          log.debug({ stream: config.name, replicas, err }, "no answer to the raise; asking again");
          continue;
        }
        if (counts.length === 1 || !(err instanceof JetStreamApiError)) {
          log.warn(
            { stream: config.name, err },
            "cannot raise the copies of the streams now; they keep their count until a later start",
          );
          return raised;
        }
        log.debug(
          { stream: config.name, replicas, err },
          "the servers refuse this many copies; trying fewer",
        );
        counts.shift();
        attempt = 0;
      }
    }
  }
  return raised;
}

/**
 * Copies to try for the buckets on an operator's clustered JetStream, most
 * first: its size is not known here (no API tells it), so its servers say by
 * refusing what they cannot place.
 */
const OPERATOR_REPLICAS = [MAX_REPLICAS, 2];

/**
 * Gives the streams (as `infos` describe them) as many copies (3, else 2) as
 * an operator-run clustered JetStream can place, so the state replicates when
 * the operator's NATS is clustered. Streams of a single server (no cluster in
 * their info) are left alone. Never rejects; resolves to the streams raised.
 */
export function raiseOnOperatorCluster(
  nc: NatsConnection,
  infos: readonly StreamInfo[],
  log: Logger,
): Promise<string[]> {
  return raiseReplicas(
    nc,
    infos.filter((info) => info.cluster?.name),
    OPERATOR_REPLICAS,
    log,
  );
}
