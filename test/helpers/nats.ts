import { promises as fs } from "node:fs";
import os from "node:os";
import path from "node:path";
import type { Logger } from "../../core/index.js";
import {
  type BrokerIdentity,
  brokerIdentityFromCertificate,
  connectFabric,
  EnvelopeSigner,
  EnvelopeVerifier,
  type FabricConnection,
  FabricMessenger,
  NatsSupervisor,
  PeerCertificateCache,
  ReplayGuard,
  subjects,
} from "../../fabric/index.js";
import {
  type IdentityRole,
  type IssuedCertificate,
  type IssueRequest,
  initPki,
  openPki,
  type Pki,
  writeIssued,
} from "../../pki/index.js";

/** What tap's `t` offers that the launcher needs. */
interface Teardown {
  teardown(fn: () => unknown): void;
}

export interface TestIdentity {
  readonly spiffeId: string;
  readonly certFile: string;
  readonly keyFile: string;
  readonly issued: IssuedCertificate;
  readonly broker: BrokerIdentity;
}

export interface TestFabric {
  readonly dir: string;
  readonly pki: Pki;
  readonly trustDomain: string;
  readonly caFile: string;
  readonly caPem: string;
  readonly supervisor: NatsSupervisor;
  /** `tls://127.0.0.1:<port>` */
  readonly url: string;
  /** Mints an identity certificate into the temp dir; `admit` (default true) makes it a broker user and reloads. */
  identity(
    role: IdentityRole,
    id: string,
    opts?: Partial<IssueRequest> & { admit?: boolean },
  ): Promise<TestIdentity>;
  /** The broker identities admitted so far (mutable through `identity()` and `setIdentities`). */
  identities: BrokerIdentity[];
}

export interface StartTestFabricOptions {
  /** Listen address. @default "127.0.0.1" */
  readonly host?: string;
  /** Extra IPs for the server certificate (127.0.0.1 and localhost are always there). */
  readonly serverIps?: string[];
  readonly jetStream?: boolean;
  readonly logger?: Logger;
  /** @default "test.local" */
  readonly trustDomain?: string;
  /** Overrides for the server certificate (e.g. an expired one). */
  readonly serverCert?: Partial<IssueRequest>;
}

/**
 * Starts a real nats-server with a generated mTLS config (through NatsSupervisor)
 * on a port nats-server picks, with a fresh PKI in a temp dir; everything is torn
 * down by `t.teardown`.
 */
export async function startTestFabric(t: Teardown, opts: StartTestFabricOptions = {}): Promise<TestFabric> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-fabric-"));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const trustDomain = opts.trustDomain ?? "test.local";
  await initPki(path.join(dir, "pki"), { trustDomain });
  const pki = await openPki(path.join(dir, "pki"));
  const caFile = path.join(dir, "pki", "ca.crt");
  const serverPrefix = path.join(dir, "server");
  await writeIssued(
    serverPrefix,
    pki.mint({ role: "server", dns: ["localhost"], ip: opts.serverIps ?? [], ...opts.serverCert }),
  );
  const identities: BrokerIdentity[] = [];
  const supervisor = new NatsSupervisor({
    dir: path.join(dir, "nats"),
    host: opts.host ?? "127.0.0.1",
    port: -1,
    tls: { certFile: `${serverPrefix}.crt`, keyFile: `${serverPrefix}.key`, caFile },
    identities,
    ...(opts.jetStream === undefined ? {} : { jetStream: opts.jetStream }),
    ...(opts.logger ? { logger: opts.logger } : {}),
  });
  await supervisor.start();
  t.teardown(() => supervisor.close());
  const fabric: TestFabric = {
    dir,
    pki,
    trustDomain,
    caFile,
    caPem: pki.caCertPem,
    supervisor,
    url: supervisor.url,
    identities,
    async identity(role, id, o = {}) {
      const { admit = true, ...req } = o;
      const issued = pki.mint({ role, id, ...req });
      const prefix = path.join(dir, `${role}-${id}-${issued.serial.slice(0, 8)}`);
      await writeIssued(prefix, issued);
      const broker = brokerIdentityFromCertificate(issued.certPem) as BrokerIdentity;
      if (admit) {
        fabric.identities = [...fabric.identities, broker];
        await supervisor.setIdentities(fabric.identities);
      }
      return {
        spiffeId: issued.spiffeId as string,
        certFile: `${prefix}.crt`,
        keyFile: `${prefix}.key`,
        issued,
        broker,
      };
    },
  };
  return fabric;
}

/** Connects to the test fabric as `identity` (closed at teardown). */
export async function joinFabric(
  t: Teardown,
  fabric: TestFabric,
  identity: TestIdentity,
): Promise<FabricConnection> {
  const conn = await connectFabric({
    servers: fabric.url,
    caFile: fabric.caFile,
    certFile: identity.certFile,
    keyFile: identity.keyFile,
    identity: identity.spiffeId,
  });
  t.teardown(() => conn.close());
  return conn;
}

/**
 * Connects as compute `node` and registers with `orch` (which learns the
 * node's chain from it, as from a real node): a node's side of the fabric,
 * without a ComputeNode, for sending it crafted messages.
 */
export async function registeredNode(
  t: Teardown,
  fabric: TestFabric,
  node: TestIdentity,
  orch: TestIdentity,
): Promise<{ id: string; conn: FabricConnection; signer: EnvelopeSigner; messenger: FabricMessenger }> {
  const conn = await joinFabric(t, fabric, node);
  const [certPem, keyPem] = await Promise.all([
    fs.readFile(node.certFile, "utf8"),
    fs.readFile(node.keyFile, "utf8"),
  ]);
  const peers = new PeerCertificateCache({ caPem: fabric.caPem, trustDomain: fabric.trustDomain });
  peers.add(orch.issued.certPem);
  const signer = new EnvelopeSigner({ certPem, keyPem });
  const messenger = new FabricMessenger(
    conn,
    signer,
    new EnvelopeVerifier({ identity: node.spiffeId, peers, replayGuard: new ReplayGuard() }),
  );
  const id = node.spiffeId.split("/").pop()!;
  await messenger.requestSigned(subjects.computeOut(id, "register"), "register", orch.spiffeId, {
    nodeId: id,
    chainPem: certPem,
    labels: {},
    capacity: { cpu: 1, memory: 1 },
    engines: ["wasm"],
    version: "test",
    executions: [],
  });
  return { id, conn, signer, messenger };
}
