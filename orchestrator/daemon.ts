import { promises as fs } from "node:fs";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import type { Server as TlsServer } from "node:tls";
import { type JetStreamClient, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Objm } from "@nats-io/obj";
import type { FastifyInstance } from "fastify";
import { loadPolicies } from "../auth/index.js";
import {
  DiskSpace,
  isRunning,
  type Logger,
  parseByteSize,
  parseDuration,
  type ShoalConfig,
} from "../core/index.js";
import {
  connectFabric,
  ExternalAuthorization,
  type FabricConnection,
  NatsSupervisor,
  nodeControlLimits,
} from "../fabric/index.js";
import { initPki, openPki, type Pki } from "../pki/index.js";
import { buildApi } from "./api.js";
import { ApiAuth } from "./api-auth.js";
import { ApiTlsManager, type ApiTlsManagerOptions } from "./api-tls.js";
import { AUTH_BUCKETS, KvAuthStore } from "./auth-store.js";
import {
  ensureIdentityCertificate,
  ensureServerCertificate,
  type OwnCertificatePolicy,
} from "./certificates.js";
import {
  bucketReplicas,
  CLUSTER_JETSTREAM_TIMEOUT_MS,
  CLUSTER_WAIT,
  clusterState,
  DEFAULT_JETSTREAM_WAIT_MS,
  OPERATOR_WAIT,
  raiseOnOperatorCluster,
  raiseReplicas,
  routeCertificateNames,
  serverName,
  whenJetStreamReady,
} from "./cluster.js";
import { Dispatcher } from "./dispatcher.js";
import { EnrollmentService, signComputeCsr } from "./enrollment.js";
import { registerEnrollmentRoutes } from "./enrollment-routes.js";
import { jobNotFound, ORCHESTRATOR_CODES, OrchestratorError } from "./errors.js";
import {
  checkExternalNatsConfig,
  connectExternalNats,
  EXTERNAL_AUTHORIZATION_FILE,
} from "./external-nats.js";
import { FabricLink } from "./fabric-link.js";
import { brokerIdentities, InventoryWatcher } from "./inventory-watch.js";
import { JETSTREAM_LOW_DISK, JETSTREAM_PROBE_TIMEOUT_MS, JetStreamWatchdog } from "./jetstream-watchdog.js";
import { JobCollector } from "./job-collector.js";
import { jobRequirements, parseSubmittedJob } from "./job-requirements.js";
import { JobService } from "./job-service.js";
import { JobTakeover, LEASES_BUCKET, openLeases } from "./job-takeover.js";
import { LogStore } from "./log-store.js";
import { OrchestratorMetrics } from "./metrics.js";
import { MODULES_BUCKET, ModuleStore } from "./module-store.js";
import { NodeService } from "./node-service.js";
import { OwnCertificateRenewer } from "./own-certificates.js";
import { PENDING_ENROLLMENTS_BUCKET, PendingEnrollments } from "./pending-enrollments.js";
import { placeJob } from "./placement.js";
import { RESULTS_BUCKET, ResultsStore, type SharedObjects } from "./results-store.js";
import { IDENTITIES_BUCKET, SharedIdentities } from "./shared-identities.js";
import { BUCKETS, StateStore } from "./state-store.js";
import { TrustKeeper } from "./trust.js";

export interface OrchestratorOptions {
  config: ShoalConfig;
  logger: Logger;
  version: string;
  /** Where the start-up banner goes (CA fingerprint, join lines). @default stdout */
  print?: (line: string) => void;
  /** The orchestrator's identity id. @default "orchestrator" */
  id?: string;
  /** ACME details that are not config keys (challenge listener port, a test CA's trust). */
  acme?: ApiTlsManagerOptions["acme"];
  /** Where SHOAL_ADMIN_PASSWORD and SHOAL_SHARED_SECRET are read. @default process.env */
  env?: NodeJS.ProcessEnv;
}

/** What a running orchestrator tells its operator and tests. */
export interface OrchestratorEndpoints {
  apiUrl: string;
  natsUrl: string;
  caFile: string;
  caFingerprint: string;
  pkiDir: string;
}

/** How long graceful shutdown waits for in-flight API requests and streams. */
const DRAIN_TIMEOUT_MS = 5000;

/**
 * `shoal orchestrator serve`: the PKI (created under DATA-DIR/pki on first
 * start), the supervised nats-server with one broker user per live identity
 * in that PKI, the state in JetStream KV, the dispatcher on the fabric and the
 * HTTPS API. Lifecycle: start(), close() (idempotent: refuse new work, drain,
 * close transports), closed(), [Symbol.asyncDispose].
 */
export class Orchestrator {
  readonly #o: OrchestratorOptions;
  readonly #log: Logger;
  readonly #cleanups: (() => Promise<unknown>)[] = [];
  #closing: Promise<Error | undefined> | undefined;
  #closedResolve!: (e: Error | undefined) => void;
  readonly #closed = new Promise<Error | undefined>((r) => {
    this.#closedResolve = r;
  });
  #endpoints: OrchestratorEndpoints | undefined;
  #jobs: JobService | undefined;
  #api: FastifyInstance | undefined;
  #dispatcher: Dispatcher | undefined;
  #nodes: NodeService | undefined;
  #store: StateStore | undefined;
  #apiTls: ApiTlsManager | undefined;
  #ownCerts: OwnCertificateRenewer | undefined;

  constructor(options: OrchestratorOptions) {
    this.#o = options;
    this.#log = options.logger.child({ component: "orchestrator" });
  }

  get endpoints(): OrchestratorEndpoints {
    if (!this.#endpoints) throw new Error("orchestrator not started");
    return this.#endpoints;
  }

  async start(): Promise<OrchestratorEndpoints> {
    try {
      return await this.#start();
    } catch (err) {
      await this.#shutdown();
      throw err;
    }
  }

  async #start(): Promise<OrchestratorEndpoints> {
    const c = this.#o.config;
    /** Lifetime of the certificates this orchestrator issues (PKI.CertTTL). */
    const certTtlMs = parseDuration(c.PKI.CertTTL);
    const dataDir = c.DataDir;
    const id = this.#o.id ?? "orchestrator";
    // A bad policy file stops the start before anything else happens, naming file:line:column.
    const policies = await loadPolicies({ policyPath: c.API.Auth.AccessPolicyPath || undefined });
    await fs.mkdir(dataDir, { recursive: true, mode: 0o700 }).catch((cause) => {
      throw new OrchestratorError(ORCHESTRATOR_CODES.SHOAL_ORCH_DATA_DIR, `cannot create ${dataDir}`, 500, {
        cause,
        fix: "choose a writable --data-dir",
      });
    });

    // PKI: our own under DATA-DIR/pki unless it exists already.
    const pkiDir = path.join(dataDir, "pki");
    const created = !(await exists(path.join(pkiDir, "ca.crt")));
    if (created) await initPki(pkiDir, { trustDomain: c.PKI.TrustDomain });
    const pki = await openPki(pkiDir);

    const advertise = c.Orchestrator.Advertise || os.hostname();
    // Bound to one address (not a wildcard), the broker is dialed there by this process too.
    const boundHost = ["0.0.0.0", "::", ""].includes(c.Orchestrator.Host) ? undefined : c.Orchestrator.Host;
    // The NATS server certificate is also the route certificate of a cluster (docs/fabric.md).
    const names = [
      "localhost",
      "127.0.0.1",
      os.hostname(),
      advertise,
      ...(boundHost ? [boundHost] : []),
      ...routeCertificateNames(c.Orchestrator.Cluster, pki.trustDomain),
    ];
    const operatorTls =
      c.Orchestrator.TLS.CACert && c.Orchestrator.TLS.ServerCert && c.Orchestrator.TLS.ServerKey;
    const caFile = operatorTls ? c.Orchestrator.TLS.CACert : path.join(pkiDir, "ca.crt");
    // Our own certificates live PKI.CertTTL and are renewed PKI.RenewBefore ahead (see OwnCertificateRenewer).
    const certPolicy = (): OwnCertificatePolicy => ({
      ttlMs: certTtlMs,
      renewBeforeMs: parseDuration(c.PKI.RenewBefore),
    });
    const ensureNatsCert = () =>
      ensureServerCertificate(pki, path.join(dataDir, "nats", "server"), names, certPolicy());
    const ensureIdentity = () =>
      ensureIdentityCertificate(pki, path.join(dataDir, "identity", "orchestrator"), id, certPolicy());
    const externalServers = c.Orchestrator.NATS.Servers;
    if (externalServers.length > 0) checkExternalNatsConfig(c);
    // Operator-run NATS servers (Orchestrator.NATS.Servers) have their own certificates.
    const natsTls =
      operatorTls || externalServers.length > 0
        ? { certFile: c.Orchestrator.TLS.ServerCert, keyFile: c.Orchestrator.TLS.ServerKey }
        : await ensureNatsCert();
    const identity = await ensureIdentity();

    // The broker, its users following the PKI inventory: operator-run servers, or a supervised one.
    const external =
      externalServers.length > 0
        ? await this.#useExternalNats(pki, identity, id, externalServers)
        : undefined;
    const natsDir = path.join(dataDir, "nats");
    await killLeftoverServer(natsDir, this.#log);
    const brokerTls = {
      caFile,
      certFile: natsTls.certFile,
      keyFile: natsTls.keyFile,
      timeoutSeconds: parseDuration(c.Orchestrator.TLS.ServerTimeout) / 1000,
    };
    const cluster = clusterState(c.Orchestrator.Cluster, pki.trustDomain, brokerTls);
    const replicas = bucketReplicas(c.Orchestrator.Cluster);
    // In a cluster: this server's name, which also marks the jobs this orchestrator accepted.
    const owner = cluster ? await serverName(natsDir, id) : undefined;
    const supervisor = external
      ? undefined
      : new NatsSupervisor({
          dir: natsDir,
          serverPath: c.Orchestrator.NATS.ServerPath,
          host: c.Orchestrator.Host,
          port: c.Orchestrator.Port === 0 ? -1 : c.Orchestrator.Port,
          tls: brokerTls,
          // JetStream tells the servers of a cluster apart by name.
          ...(cluster && owner ? { cluster, serverName: owner } : {}),
          identities: await brokerIdentities(pki, c.Orchestrator.NodeManager.Identities),
          logger: this.#o.logger,
        });
    const writePid = (running: NatsSupervisor) =>
      fs.writeFile(path.join(natsDir, "nats-server.pid"), String(running.pid ?? ""), { mode: 0o600 });
    if (supervisor) {
      this.#cleanups.push(() => supervisor.close());
      await supervisor.start();
      await writePid(supervisor);
    }

    const localUrl = supervisor
      ? boundHost
        ? supervisor.url
        : `tls://127.0.0.1:${supervisor.port}`
      : externalServers.join(",");
    // What compute nodes dial (Compute.Orchestrators).
    const nodeUrl = supervisor ? `tls://${advertise}:${supervisor.port}` : externalServers.join(",");
    const fabric: FabricConnection =
      external?.fabric ??
      (await connectFabric({
        servers: localUrl,
        caFile,
        certFile: identity.certFile,
        keyFile: identity.keyFile,
        identity: `spiffe://${pki.trustDomain}/orchestrator/${id}`,
        name: `orchestrator-${id}`,
        logger: this.#o.logger,
      }));
    this.#cleanups.push(() => fabric.close());
    // A cluster's JetStream needs a quorum of its servers: the buckets are opened once it serves.
    const buckets = async () => {
      const js = jetstream(fabric.nc, cluster || external ? { timeout: CLUSTER_JETSTREAM_TIMEOUT_MS } : {});
      return Promise.all([
        StateStore.open(js, this.#log.child({ component: "state" }), {
          replicas,
          ...(owner ? { owner } : {}),
        }),
        KvAuthStore.open(js, this.#log.child({ component: "auth-store" }), { replicas }),
        cluster
          ? SharedIdentities.open(js, this.#log.child({ component: "identities" }), replicas)
          : undefined,
        PendingEnrollments.open(js, { replicas }),
        cluster ? openLeases(js, replicas) : undefined,
        cluster ? sharedObjects(js, RESULTS_BUCKET, replicas) : undefined,
        cluster ? sharedObjects(js, MODULES_BUCKET, replicas) : undefined,
      ]);
    };
    /** The KV buckets' streams of every orchestrator; a cluster has more. */
    const streams = [
      ...Object.values(BUCKETS),
      ...Object.values(AUTH_BUCKETS),
      PENDING_ENROLLMENTS_BUCKET,
    ].map((bucket) => `KV_${bucket}`);
    const clusterStreams = [
      ...streams,
      `KV_${IDENTITIES_BUCKET}`,
      `KV_${LEASES_BUCKET}`,
      `OBJ_${RESULTS_BUCKET}`,
      `OBJ_${MODULES_BUCKET}`,
    ];
    let opened: Awaited<ReturnType<typeof buckets>>;
    if (cluster || external) {
      const wait = cluster ? CLUSTER_WAIT : OPERATOR_WAIT;
      const ready = await whenJetStreamReady(
        fabric.nc,
        this.#log,
        DEFAULT_JETSTREAM_WAIT_MS,
        buckets,
        cluster ? clusterStreams : streams,
        wait,
      );
      opened = ready.opened;
      // Before anything is written: a stream given more copies elects a new leader, and writes
      // meanwhile are refused ("jetstream is not enabled"). Nothing is sent when every stream
      // has its count. An operator's clustered JetStream replicates the state too.
      const raised = cluster
        ? await raiseReplicas(fabric.nc, ready.infos, replicas, this.#log)
        : await raiseOnOperatorCluster(fabric.nc, ready.infos, this.#log);
      if (raised.length > 0) {
        await whenJetStreamReady(
          fabric.nc,
          this.#log,
          DEFAULT_JETSTREAM_WAIT_MS,
          async () => {},
          raised,
          wait,
        );
      }
    } else {
      opened = await buckets();
    }
    const [store, authStore, shared, pendingEnrollments, leases, sharedResults, sharedModules] = opened;
    const metrics = new OrchestratorMetrics(store);
    if (supervisor) {
      // The pid file and a count follow the server when it is started again (after a crash, or by the watchdog).
      void (async () => {
        for await (const s of supervisor.status()) {
          if (s.type === "restarting") metrics.natsServerRestarted();
          if (s.type === "ready") await writePid(supervisor).catch(() => {});
        }
      })();
    }
    this.#cleanups.push(async () => authStore.close());
    if (shared) this.#cleanups.push(async () => shared.close());
    this.#cleanups.push(async () => pendingEnrollments.close());

    // State, services, dispatcher.
    this.#store = store;
    this.#cleanups.push(async () => {
      await store.flush();
      store.close();
    });
    const logs = new LogStore(dataDir);
    // On a stop, the lines taken are written before the state is flushed.
    this.#cleanups.push(() => logs.close());
    const minFree = parseByteSize(c.Orchestrator.Storage.MinFree);
    const disk = new DiskSpace(dataDir, minFree, "Orchestrator.Storage.MinFree");
    if (supervisor) {
      const jsm = await jetstreamManager(fabric.nc, { timeout: JETSTREAM_PROBE_TIMEOUT_MS });
      // In a cluster only a server whose own disk is (nearly) full is started again.
      const nearlyFull =
        minFree >= JETSTREAM_LOW_DISK
          ? disk
          : new DiskSpace(dataDir, JETSTREAM_LOW_DISK, "the least JetStream is left");
      const watchdog = new JetStreamWatchdog({
        probe: () => jsm.getAccountInfo(),
        restart: (reason) => supervisor.restart(reason),
        log: this.#log.child({ component: "jetstream-watchdog" }),
        ...(cluster ? { cause: () => nearlyFull.shortfall() } : {}),
      });
      watchdog.start();
      this.#cleanups.push(async () => watchdog.stop());
    }
    const shortfall = () => disk.shortfall();
    const results = new ResultsStore(dataDir, sharedResults, { shortfall });
    const modules = new ModuleStore(dataDir, sharedModules);
    await Promise.all([logs.init(), results.init(), modules.init()]);
    const disconnectTimeoutMs = parseDuration(c.Orchestrator.NodeManager.DisconnectTimeout);
    const limits = {
      executionTimeoutMs: parseDuration(c.Orchestrator.Scheduler.ExecutionTimeout),
      queueTimeoutMs: parseDuration(c.Orchestrator.Scheduler.QueueTimeout),
    };
    let dispatcher: Dispatcher | undefined;
    let trustKeeper: TrustKeeper | undefined;
    const enrollment = new EnrollmentService({
      pki,
      certTtlMs,
      externalIdentities: c.Orchestrator.NodeManager.Identities,
      pending: pendingEnrollments,
      // The supervised broker admits the node before it gets its certificate (no refused first dial).
      onIssued: async () => {
        await trustKeeper?.apply();
      },
      log: this.#log.child({ component: "enrollment" }),
    });
    const nodes = new NodeService({
      store,
      enrollments: enrollment,
      log: this.#log.child({ component: "nodes" }),
      manualApproval: c.Orchestrator.NodeManager.ManualApproval,
      disconnectTimeoutMs,
      heartbeatIntervalMs: Math.max(100, Math.min(5000, Math.floor(disconnectTimeoutMs / 4))),
      onLost: (node) => dispatcher?.nodeLost(node),
      revokeIdentity: async (nodeId) => (await trustKeeper?.revokeNode(nodeId)) ?? false,
    });
    this.#nodes = nodes;
    const link = await FabricLink.create({
      fabric,
      pki,
      store,
      nodes,
      modules,
      identity,
      ...(cluster ? { announceOnRegister: true, storedNode: (nodeId) => store.nodes.stored(nodeId) } : {}),
      log: this.#log.child({ component: "fabric-link" }),
      metrics,
      nodeControlLimits: nodeControlLimits({
        heartbeatMs: nodes.heartbeatIntervalMs,
        certTtlMs,
      }),
      renewCertificate: async (nodeId, csrPem) => {
        const issued = await signComputeCsr(pki, csrPem, nodeId, {
          ttlMs: certTtlMs,
          exclusive: false,
        });
        // The broker knows the new certificate before the node reconnects with it.
        await trustKeeper?.apply();
        return issued.certPem;
      },
    });
    this.#cleanups.push(() => link.close());
    // Trust changes: the inventory (in a cluster: every orchestrator's) decides the broker's users and which certificates still verify.
    const trust = new TrustKeeper({
      pki,
      link,
      broker: supervisor ?? (external as { users: ExternalAuthorization }).users,
      extraIdentities: c.Orchestrator.NodeManager.Identities,
      ...(shared ? { shared } : {}),
      log: this.#log.child({ component: "trust" }),
    });
    trustKeeper = trust;
    await trust.apply();
    await shared?.watch(() => {
      trust.apply().catch((err) => this.#log.error({ err }, "cannot apply the cluster's identities"));
    });
    const watcher = new InventoryWatcher(pkiDir, () => trust.apply(), this.#log);
    watcher.start();
    this.#cleanups.push(() => watcher.close());
    dispatcher = new Dispatcher({
      store,
      nodes,
      logs,
      results,
      channel: link,
      log: this.#log.child({ component: "dispatcher" }),
      onJobFinished: (state) => metrics.jobFinished(state),
      requirements: (job) => jobRequirements(job, limits),
      place: placeJob,
      queueTimeoutMs: limits.queueTimeoutMs,
      executionTimeoutMs: limits.executionTimeoutMs,
      retryBudget: c.Orchestrator.Scheduler.RetryBudget,
      ...(cluster
        ? {
            isForeign: async (executionId: string) => {
              const stored = await store.executions.stored(executionId);
              return stored !== undefined && !store.isMine(stored.JobID);
            },
          }
        : {}),
    });
    this.#dispatcher = dispatcher;
    link.attach(dispatcher);
    store.watchAll((change) => {
      if (change.type === "node") dispatcher?.nodeChanged();
      // Taken over by another orchestrator (or a stop there): this one lets it go.
      if (change.type === "job" && !store.isMine(change.job.ID)) dispatcher?.relinquish(change.job.ID);
      // Another orchestrator's execution holds (or frees) its node's capacity for everyone.
      if (change.type === "execution" && !store.isMine(change.execution.JobID)) {
        dispatcher?.observe(change.execution);
      }
    });
    if (leases && owner) {
      const takeover = new JobTakeover(leases, {
        store,
        owner,
        leaseMs: parseDuration(c.Orchestrator.Cluster.Lease),
        adopt: (jobIds, why) => dispatcher?.adopt(jobIds, why),
        log: this.#log.child({ component: "takeover" }),
      });
      store.fence(() => takeover.acting);
      // A graceful stop hands the jobs over: by then the dispatcher no longer acts on them.
      this.#cleanups.push(() => takeover.close({ release: true }));
      await takeover.start();
    }
    const jobs = new JobService({
      store,
      logs,
      results,
      modules,
      log: this.#log.child({ component: "jobs" }),
      parseSpec: parseSubmittedJob,
      dispatch: dispatcher,
      shortfall,
      maxUnfinished: {
        all: c.Orchestrator.Scheduler.MaxUnfinishedJobs,
        perSubmitter: c.Orchestrator.Scheduler.MaxUnfinishedJobsPerSubmitter,
      },
      ...(owner ? { owner } : {}),
    });
    this.#jobs = jobs;

    const caPem = await fs.readFile(caFile, "utf8");
    const auth = await ApiAuth.create({
      config: c.API.Auth,
      policies,
      store: authStore,
      dataDir,
      issuer: `spiffe://${pki.trustDomain}/orchestrator/${id}`,
      trustDomain: pki.trustDomain,
      caPem,
      crlPem: () => trustKeeper?.crlPem,
      job: (jobId) => {
        const job = store.jobs.get(jobId);
        if (!job) throw jobNotFound(jobId);
        return job;
      },
      logger: this.#o.logger,
      print: this.#o.print ?? ((line: string) => process.stdout.write(`${line}\n`)),
      ...(this.#o.env ? { env: this.#o.env } : {}),
    });
    const jobGcThresholdMs = parseDuration(c.Orchestrator.JobGC.Threshold);
    const { MaxJobs } = c.Orchestrator.JobGC;
    if (jobGcThresholdMs > 0 || MaxJobs > 0) {
      const collector = new JobCollector({
        store,
        logs,
        results,
        modules,
        thresholdMs: jobGcThresholdMs,
        maxJobs: MaxJobs,
        log: this.#log.child({ component: "job-gc" }),
      });
      // Before nodes are heard: no job's files are written meanwhile.
      await collector.removeStrays();
      collector.start();
      this.#cleanups.push(() => collector.close());
    }
    nodes.start();
    dispatcher.start();
    await link.start();
    const ownCerts = new OwnCertificateRenewer(
      [
        ...(operatorTls || !supervisor
          ? []
          : [
              {
                name: "nats-server",
                ensure: ensureNatsCert,
                // nats-server re-reads its certificate files on reload; connected clients stay.
                onRenewed: () => supervisor.reload("server certificate renewed"),
              },
            ]),
        { name: "identity", ensure: ensureIdentity, onRenewed: (files) => link.useIdentity(files) },
      ],
      this.#log,
    );
    this.#ownCerts = ownCerts;
    this.#cleanups.push(() => ownCerts.close());
    await ownCerts.check();

    // The HTTPS API: its certificate from operator files, ACME or this PKI, swapped live on reload and renewal.
    const apiTls = new ApiTlsManager({
      api: c.API,
      dataDir,
      pki,
      advertise: c.Orchestrator.Advertise ? [c.Orchestrator.Advertise] : [],
      log: this.#o.logger,
      ...(this.#o.acme ? { acme: this.#o.acme } : {}),
    });
    await apiTls.start();
    this.#apiTls = apiTls;
    this.#cleanups.push(() => apiTls.close());
    const api = buildApi({
      jobs,
      nodes,
      log: this.#log.child({ component: "api" }),
      // mtls logins need the client's certificate; ApiAuth verifies it, so the handshake does not.
      https: {
        ...apiTls.serverOptions(),
        ...(auth.wantsClientCertificates ? { requestCert: true, rejectUnauthorized: false } : {}),
      },
      security: auth,
      metrics,
      maxConnsPerClient: c.API.MaxConnsPerClient,
      caBundlePem: () => caPem,
      routes: [(app) => registerEnrollmentRoutes(app, enrollment)],
      version: this.#o.version,
      nodeInfo: () => ({
        ID: id,
        Type: "orchestrator",
        Version: this.#o.version,
        NATS: supervisor ? supervisor.url.replace("127.0.0.1", advertise) : nodeUrl,
        CAFingerprint: pki.rootFingerprint,
        TrustDomain: pki.trustDomain,
      }),
    });
    apiTls.attach(api.server as unknown as TlsServer);
    this.#api = api;
    await api.listen({ host: c.API.Host, port: c.API.Port });
    const apiPort = (api.server.address() as AddressInfo).port;

    this.#endpoints = {
      apiUrl: `https://127.0.0.1:${apiPort}`,
      natsUrl: localUrl,
      caFile,
      caFingerprint: pki.rootFingerprint,
      pkiDir,
    };
    this.#banner(pki, advertise, external ? `${nodeUrl} (operator-run)` : nodeUrl, apiPort, created);
    if (cluster) {
      const routes = c.Orchestrator.Cluster.Advertise || `${advertise}:${supervisor?.routePort}`;
      (this.#o.print ?? ((line: string) => process.stdout.write(`${line}\n`)))(
        `  Routes (mTLS):  nats-route://${routes} (cluster ${cluster.name}, ${replicas} cop${replicas === 1 ? "y" : "ies"} of new KV buckets)`,
      );
      if (replicas === 2) {
        this.#log.warn(
          { cluster: cluster.name },
          "two orchestrators tolerate no loss: JetStream needs a majority, so losing either stops the state store and nothing is taken over; run three",
        );
      }
    }
    this.#log.info({ api: this.#endpoints.apiUrl, nats: localUrl }, "orchestrator ready");
    return this.#endpoints;
  }

  /**
   * Operator-run NATS servers: the users block is written (and printed) before
   * dialing, since on a first start the server cannot know this identity yet
   * and the refusal names the file; then the connection, JetStream checked.
   */
  async #useExternalNats(
    pki: Pki,
    identity: { certFile: string; keyFile: string },
    id: string,
    servers: readonly string[],
  ): Promise<{ fabric: FabricConnection; users: ExternalAuthorization }> {
    const c = this.#o.config;
    const print = this.#o.print ?? ((line: string) => process.stdout.write(`${line}\n`));
    const users = new ExternalAuthorization({
      file: path.join(c.DataDir, EXTERNAL_AUTHORIZATION_FILE),
      servers,
      identities: await brokerIdentities(pki, c.Orchestrator.NodeManager.Identities),
      logger: this.#o.logger,
    });
    this.#cleanups.push(async () => users.close());
    const block = await users.start();
    print(`NATS users block for your servers (${users.file}); include it and reload after every change:`);
    for (const line of block.trimEnd().split("\n")) print(`  ${line}`);
    const caFile = path.join(pki.dir, "ca.crt");
    const fabric = await connectExternalNats({
      servers,
      caFile: c.Orchestrator.TLS.CACert || caFile,
      shoalCaFile: caFile,
      certFile: identity.certFile,
      keyFile: identity.keyFile,
      identity: `spiffe://${pki.trustDomain}/orchestrator/${id}`,
      id,
      authorizationFile: users.file,
      logger: this.#o.logger,
    });
    this.#log.info({ servers }, "connected to the operator-run NATS servers");
    return { fabric, users };
  }

  #banner(pki: Pki, advertise: string, natsUrl: string, apiPort: number, created: boolean): void {
    const print = this.#o.print ?? ((line: string) => process.stdout.write(`${line}\n`));
    const dataDir = this.#o.config.DataDir;
    print(`Shoal orchestrator ready${created ? " (new PKI created)" : ""}`);
    print(`  API:            https://${advertise}:${apiPort}`);
    print(`  NATS (mTLS):    ${natsUrl}`);
    print(`  CA certificate: ${path.join(pki.dir, "ca.crt")}`);
    print(`  CA fingerprint: ${pki.rootFingerprint}`);
    print(
      "To add a compute node, create a join token here and start the node with it (it makes its own key):",
    );
    print(`  shoal pki join-token create --dir ${pki.dir} [--label k=v]`);
    print(
      `  shoal compute serve --orchestrators ${natsUrl.split(" ")[0]} --api https://${advertise}:${apiPort} --join TOKEN --ca-fingerprint ${pki.rootFingerprint}`,
    );
    print("Or issue its identity and start it with the CA certificate:");
    print(`  shoal pki issue compute --dir ${pki.dir} --id node-1 --out node-1`);
    print(
      `  shoal compute serve --orchestrators ${natsUrl.split(" ")[0]} -c Compute.TLS.CACert=${path.join(pki.dir, "ca.crt")} -c Compute.TLS.ClientCert=node-1.crt -c Compute.TLS.ClientKey=node-1.key --data-dir ${path.join(dataDir, "..", "node-1")}`,
    );
    // The CA a client must trust for the API is the fabric's only when the API certificate comes from it.
    const apiCa = {
      "self-signed": ` --ca-cert ${path.join(pki.dir, "ca.crt")}`,
      files: " --ca-cert CA-OF-YOUR-API-CERTIFICATE",
      acme: "",
    }[this.#apiTls?.source ?? "self-signed"];
    print(`Use the API: export SHOAL_API=https://${advertise}:${apiPort}; shoal agent alive${apiCa}`);
  }

  /**
   * SIGHUP: re-reads the API certificate files (or re-checks a PKI/ACME
   * certificate's names and age) and renews the NATS server and identity
   * certificates if due. Never throws; a bad certificate is logged with its
   * code and the current one kept.
   */
  async reload(): Promise<void> {
    await Promise.all([this.#apiTls?.reload(), this.#ownCerts?.check()]);
  }

  /** Stops gracefully: refuse new work, drain the API, stop dispatching, flush state, close transports. */
  close(): Promise<Error | undefined> {
    this.#closing ??= this.#shutdown();
    return this.#closing;
  }

  async #shutdown(): Promise<Error | undefined> {
    let error: Error | undefined;
    this.#jobs?.refuseNewWork();
    if (this.#api) {
      const api = this.#api;
      const forced = setTimeout(() => api.server.closeAllConnections?.(), DRAIN_TIMEOUT_MS);
      await api.close().catch((err) => {
        error ??= err;
      });
      clearTimeout(forced);
    }
    this.#dispatcher?.close();
    this.#nodes?.close();
    for (const cleanup of this.#cleanups.reverse()) {
      try {
        const result = await cleanup();
        if (result instanceof Error) error ??= result;
      } catch (err) {
        error ??= err as Error;
      }
    }
    this.#cleanups.length = 0;
    this.#log.info("orchestrator stopped");
    this.#closedResolve(error);
    return error;
  }

  closed(): Promise<Error | undefined> {
    return this.#closed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** For tests: the in-process services. */
  get services(): { jobs: JobService; nodes: NodeService; store: StateStore } {
    if (!this.#jobs || !this.#nodes || !this.#store) throw new Error("orchestrator not started");
    return { jobs: this.#jobs, nodes: this.#nodes, store: this.#store };
  }
}

/** A cluster's replicated object store `bucket` (created when missing), with the manager that reads it. */
async function sharedObjects(js: JetStreamClient, bucket: string, replicas: number): Promise<SharedObjects> {
  const [objects, jsm] = await Promise.all([
    new Objm(js).create(bucket, { replicas }),
    js.jetstreamManager(),
  ]);
  return { objects, jsm };
}

async function exists(p: string): Promise<boolean> {
  return fs.access(p).then(
    () => true,
    () => false,
  );
}

/**
 * A nats-server left running by an orchestrator that was killed (SIGKILL
 * gives it no chance to stop its child) holds the port and the JetStream
 * store: stop it, but only if it is ours (its command line names our config).
 */
async function killLeftoverServer(natsDir: string, log: Logger): Promise<void> {
  const pidFile = path.join(natsDir, "nats-server.pid");
  const pid = Number(await fs.readFile(pidFile, "utf8").catch(() => ""));
  if (!Number.isInteger(pid) || pid <= 0) return;
  const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
  if (!cmdline.includes(path.join(natsDir, "nats.conf"))) return;
  log.warn({ pid }, "stopping a nats-server left by a previous run");
  process.kill(pid, "SIGTERM");
  for (let i = 0; i < 100 && (await isRunning(pid)); i++) {
    await new Promise((r) => setTimeout(r, 50));
  }
  if (await isRunning(pid)) process.kill(pid, "SIGKILL");
}
