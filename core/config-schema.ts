import os from "node:os";
import {
  type Static,
  type TArray,
  type TLiteral,
  type TSchema,
  type TString,
  type TUnion,
  Type,
} from "@sinclair/typebox";
import { nodeLabelsSchema } from "./node-labels.js";

/**
 * The one schema for Shoal's configuration. Every key has a `default` and a
 * `description`; docs/config.md documents each key and a test checks that it
 * lists them all. The TypeScript type {@link ShoalConfig} is derived from it.
 *
 * Leaves carry an `x-shoal` hint where a plain JSON type says too little:
 * `duration` ("30s", "5m", "24h"; see parseDuration), `size` ("512Mi"; see
 * parseByteSize) and `path` (a leading `~` is expanded to the home directory).
 * `x-shoal-expect` words what a patterned string must look like, for errors.
 */

/** Go-style durations: one or more `<number><unit>` with units ms, s, m, h, d. */
export const DURATION_PATTERN = "^(?:[0-9]+(?:\\.[0-9]+)?(?:ms|s|m|h|d))+$";
/** Byte sizes: a number with an optional SI (K, M, G, T) or binary (Ki, Mi, Gi, Ti) unit and optional `B`. */
export const SIZE_PATTERN = "^[0-9]+(?:\\.[0-9]+)?(?:[KMGT]i?)?B?$";
/** A SPIFFE ID as Shoal's certificates carry it: `spiffe://<trust-domain>/<role>/<id>`. */
export const SPIFFE_ID_PATTERN = "^spiffe://[a-z0-9.-]+/(orchestrator|compute|user)/[A-Za-z0-9._-]+$";

export type ConfigHint = "duration" | "size" | "path";

function section<T extends Record<string, TSchema>>(properties: T, description: string) {
  return Type.Object(properties, { additionalProperties: false, default: {}, description });
}

function str(def: string, description: string) {
  return Type.String({ default: def, description });
}

function pathKey(def: string, description: string) {
  return Type.String({ default: def, description, "x-shoal": "path" });
}

function duration(def: string, description: string) {
  return Type.String({ default: def, description, pattern: DURATION_PATTERN, "x-shoal": "duration" });
}

function size(def: string, description: string) {
  return Type.String({ default: def, description, pattern: SIZE_PATTERN, "x-shoal": "size" });
}

function bool(def: boolean, description: string) {
  return Type.Boolean({ default: def, description });
}

function port(def: number, description: string) {
  return Type.Integer({ default: def, minimum: 0, maximum: 65535, description });
}

function list<T extends TSchema = TString>(
  def: Static<T>[],
  description: string,
  item: T = Type.String({ minLength: 1 }) as TSchema as T,
): TArray<T> {
  return Type.Array(item, { default: def, description });
}

function oneOf<const T extends readonly string[]>(
  values: T,
  def: T[number],
  description: string,
): TUnion<TLiteral<T[number]>[]> {
  return Type.Union(
    values.map((v) => Type.Literal(v)),
    { default: def, description },
  );
}

const ABSOLUTE_PATH = Type.String({ pattern: "^/", "x-shoal-expect": "an absolute path" });

/** The log levels pino knows, plus `silent`. */
export const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"] as const;

/** The API's authentication methods (see docs/security.md). */
export const AUTH_METHODS = ["anonymous", "clientKey", "password", "sharedSecret", "mtls"] as const;

/** Default for `Compute.Resources.Memory`: the machine's memory, in MiB. */
const MACHINE_MEMORY = `${Math.floor(os.totalmem() / 2 ** 20)}Mi`;

export const ConfigSchema = Type.Object(
  {
    DataDir: pathKey(
      "~/.shoal",
      "Directory for this node's state: its PKI, keys and certificates, the generated nats-server config, tokens.",
    ),
    Logging: section(
      {
        Level: oneOf(LOG_LEVELS, "info", "Lowest level that is logged."),
        Format: oneOf(
          ["json", "text"],
          "json",
          "`json` for log collectors, `text` for reading on a terminal (still one line per event).",
        ),
      },
      "Logging of the daemons (to stderr).",
    ),
    API: section(
      {
        Host: str("0.0.0.0", "Address the HTTPS API listens on."),
        Port: port(1234, "Port the HTTPS API listens on (0 picks a free port)."),
        MaxConnsPerClient: Type.Integer({
          default: 100,
          minimum: 0,
          description:
            "Most connections one client address may hold open to the API at once; more are closed at once. 0 means no limit (e.g. behind a reverse proxy, where every client has its address).",
        }),
        TLS: section(
          {
            CertFile: pathKey(
              "",
              "PEM certificate chain for the API server; with KeyFile, overrides SelfSigned.",
            ),
            KeyFile: pathKey("", "PEM private key for CertFile."),
            SelfSigned: bool(
              true,
              "With no CertFile/KeyFile and no AutoCert, serve HTTPS with a server certificate issued by the built-in PKI.",
            ),
            AutoCert: str(
              "",
              "Domain name to obtain an ACME (Let's Encrypt) certificate for; empty turns ACME off.",
            ),
            AutoCertDirectory: str(
              "https://acme-v02.api.letsencrypt.org/directory",
              "ACME directory URL used with AutoCert.",
            ),
            AutoCertCachePath: pathKey(
              "",
              "Where ACME account keys and certificates are kept; empty means DATA-DIR/autocert.",
            ),
            CAFile: pathKey(
              "",
              "Client side: CA certificate to trust for the API (e.g. the fabric's ca.crt); empty means the system roots.",
            ),
            Insecure: bool(
              false,
              "Client side: skip verification of the API's certificate. Dangerous; prints a warning.",
            ),
          },
          "TLS of the HTTPS API.",
        ),
        Auth: section(
          {
            Methods: list(
              ["anonymous", "clientKey", "password", "mtls"],
              "Authentication methods the API offers (any of anonymous, clientKey, password, sharedSecret, mtls).",
              oneOf(AUTH_METHODS, "anonymous", "An authentication method."),
            ),
            AccessPolicyPath: pathKey(
              "",
              "Cedar policy file for authorization; empty means the built-in default policy set.",
            ),
            TokenTTL: duration("24h", "Lifetime of the API tokens the orchestrator issues."),
          },
          "Authentication and authorization of API users.",
        ),
      },
      "The orchestrator's HTTPS API, and how clients reach it.",
    ),
    Orchestrator: section(
      {
        Enabled: bool(false, "Run the orchestrator (set by `shoal orchestrator serve`)."),
        Host: str("0.0.0.0", "Address the supervised nats-server listens on for clients."),
        Port: port(4222, "Port the supervised nats-server listens on for clients (mTLS)."),
        Advertise: str(
          "",
          "Host name or IP that compute nodes dial; added to the NATS server certificate. Empty means this host's name.",
        ),
        TLS: section(
          {
            CACert: pathKey(
              "",
              "CA certificate that client certificates must chain to; empty means DATA-DIR/pki/ca.crt.",
            ),
            ServerCert: pathKey(
              "",
              "NATS server certificate chain; empty means one issued by the built-in PKI.",
            ),
            ServerKey: pathKey("", "Private key for ServerCert."),
            ServerTimeout: duration("5s", "TLS handshake timeout of the NATS server."),
          },
          "mTLS of the NATS listener. Set all of CACert, ServerCert and ServerKey, or none.",
        ),
        NATS: section(
          {
            ServerPath: str(
              "nats-server",
              "nats-server binary to supervise (looked up on PATH unless absolute).",
            ),
            Servers: list(
              [],
              "URLs of operator-run NATS servers to use instead of a supervised one (JetStream and the users block Shoal writes to DATA-DIR/nats-external-authorization.conf required); empty means supervised.",
            ),
          },
          "The NATS broker.",
        ),
        NodeManager: section(
          {
            ManualApproval: bool(
              false,
              "New compute nodes stay PENDING until an operator runs `shoal node approve`.",
            ),
            DisconnectTimeout: duration(
              "30s",
              "A node with no heartbeat for this long is marked disconnected.",
            ),
            Identities: list(
              [],
              "Extra identities allowed on the broker when their CA lives outside Shoal, as SPIFFE IDs.",
              Type.String({
                pattern: SPIFFE_ID_PATTERN,
                "x-shoal-expect": "a SPIFFE ID like spiffe://shoal.local/compute/node-1",
              }),
            ),
          },
          "Compute node registry.",
        ),
        Cluster: section(
          {
            Name: str(
              "",
              "NATS cluster name, the same on every orchestrator of the cluster; setting it turns on clustering (routes, clustered JetStream).",
            ),
            Host: str("0.0.0.0", "Address the cluster route listener binds."),
            Port: port(
              6222,
              "Port of the cluster route listener (mutual TLS with the fabric CA); 0 lets nats-server choose.",
            ),
            Advertise: str(
              "",
              "Host:port the other orchestrators dial for routes (its host goes into the NATS server certificate); empty means Host:Port.",
            ),
            Peers: list(
              [],
              "Route addresses of the other orchestrators, host:port (or nats-route://host:port), e.g. orch-2:6222; new KV buckets get min(3, peers + 1) copies.",
            ),
            Lease: duration(
              "10s",
              "An orchestrator renews its lease every quarter of this; one not renewed for this long is presumed gone and its unfinished jobs are taken over by another.",
            ),
          },
          "Clustering of several orchestrators' NATS servers.",
        ),
        Scheduler: section(
          {
            QueueTimeout: duration("5m", "A job that finds no node for this long fails."),
            ExecutionTimeout: duration("30m", "Default time limit of one execution when the job sets none."),
            RetryBudget: Type.Integer({
              default: 3,
              minimum: 0,
              description: "How many times a failed execution is retried on another node.",
            }),
            MaxUnfinishedJobs: Type.Integer({
              default: 10_000,
              minimum: 0,
              description:
                "Jobs not yet ended (Pending, Queued, Running) the orchestrator holds at most, counting every orchestrator's in a cluster; past it new jobs are refused (HTTP 429) until some end; 0 sets no limit.",
            }),
            MaxUnfinishedJobsPerSubmitter: Type.Integer({
              default: 1_000,
              minimum: 0,
              description:
                "Jobs not yet ended that one submitter may have at most, so one user cannot fill the queue for everyone; past it their new jobs are refused (HTTP 429); 0 sets no limit.",
            }),
          },
          "Job scheduling.",
        ),
        JobGC: section(
          {
            Threshold: duration(
              "24h",
              "A job that ended this long ago is removed with its executions, history, logs and result files; 0s keeps every job.",
            ),
            MaxJobs: Type.Integer({
              default: 100_000,
              minimum: 0,
              description:
                "Finished jobs kept at most: beyond it the ones that ended first are removed, whatever their age; 0 sets no limit.",
            }),
          },
          "Removal of finished jobs.",
        ),
        Storage: section(
          {
            MinFree: size(
              "256Mi",
              "Free space kept on the data directory's file system: below it new jobs are refused (HTTP 507) and result files are held back on the nodes; 0 keeps none.",
            ),
          },
          "The data directory's disk.",
        ),
      },
      "The orchestrator daemon.",
    ),
    Compute: section(
      {
        Enabled: bool(false, "Run the compute node (set by `shoal compute serve`)."),
        Orchestrators: list(["tls://127.0.0.1:4222"], "NATS URLs of the orchestrators to connect to."),
        API: str(
          "",
          "Orchestrator API URL used for enrollment and renewal; empty means https://<first orchestrator host>:1234.",
        ),
        TLS: section(
          {
            CACert: pathKey(
              "",
              "CA certificate the orchestrator's certificate must chain to; empty means DATA-DIR's.",
            ),
            ClientCert: pathKey(
              "",
              "This node's certificate chain; empty means the one obtained by enrollment.",
            ),
            ClientKey: pathKey("", "Private key for ClientCert."),
          },
          "mTLS to the orchestrators. Set ClientCert and ClientKey together.",
        ),
        Heartbeat: section(
          { Interval: duration("5s", "How often the node sends a heartbeat.") },
          "Heartbeats to the orchestrator.",
        ),
        Labels: nodeLabelsSchema({
          default: {},
          description:
            "Labels that job constraints match, as a map (in env and -c: `k=v,k2=v2`): at most 64, keys of 1 to 128 letters, digits, '.', '_', '/' or '-' starting with a letter or digit, values of at most 256 characters.",
        }),
        Resources: section(
          {
            CPU: Type.Number({
              default: os.availableParallelism(),
              exclusiveMinimum: 0,
              description: "CPU cores offered to jobs; defaults to the machine's.",
            }),
            Memory: size(MACHINE_MEMORY, "Memory offered to jobs, e.g. 4Gi; defaults to the machine's."),
          },
          "Capacity offered to jobs.",
        ),
        Engines: section(
          {
            Exec: section(
              {
                Allow: list(
                  [],
                  "Absolute paths of the native commands jobs may run; empty turns the exec engine off.",
                  ABSOLUTE_PATH,
                ),
              },
              "The `exec` engine.",
            ),
            WASM: section(
              { MaxMemory: size("256Mi", "Largest linear memory a WebAssembly job may use.") },
              "The `wasm` engine.",
            ),
          },
          "Executor engines.",
        ),
        JobSelection: section(
          {
            Locality: oneOf(
              ["anywhere", "local"],
              "anywhere",
              "`local` accepts only jobs whose inputs are on this node; `anywhere` accepts all.",
            ),
            RejectStatelessJobs: bool(false, "Reject jobs that have no inputs."),
            AcceptNetworkedJobs: bool(false, "Accept jobs that ask for network access."),
            AllowedSubmitters: list(
              [],
              "Users (names or SPIFFE IDs) whose jobs this node accepts; empty means any authorized user.",
            ),
          },
          "Which jobs this node bids on.",
        ),
        Inputs: section(
          {
            AllowedPaths: list(
              [],
              "Absolute host paths jobs may mount as inputs; empty means none.",
              ABSOLUTE_PATH,
            ),
          },
          "Job inputs.",
        ),
        Storage: section(
          {
            MinFree: size(
              "256Mi",
              "Free space kept on the data directory's file system: below it the node declines jobs; 0 keeps none.",
            ),
          },
          "The data directory's disk.",
        ),
      },
      "The compute daemon.",
    ),
    PKI: section(
      {
        TrustDomain: Type.String({
          default: "shoal.local",
          pattern: "^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$",
          "x-shoal-expect": "a lower-case DNS name like shoal.local",
          description: "SPIFFE trust domain of every identity: spiffe://<TrustDomain>/<role>/<id>.",
        }),
        CertTTL: duration(
          "24h",
          "Orchestrator: lifetime of the compute certificates it renews and of its own NATS server and identity certificates.",
        ),
        RenewBefore: duration(
          "8h",
          "Renew a certificate this long before it expires (never before two thirds of its lifetime). Read by compute nodes and the orchestrator.",
        ),
      },
      "The built-in PKI.",
    ),
  },
  { additionalProperties: false },
);

/** Shoal's configuration, as loaded, validated and frozen by loadConfig. */
export type ShoalConfig = Static<typeof ConfigSchema>;
