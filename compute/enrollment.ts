import { createPublicKey, type KeyObject, randomBytes, timingSafeEqual, X509Certificate } from "node:crypto";
import { promises as fs } from "node:fs";
import https from "node:https";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { CORE_CODES, type Logger, ShoalError, writeFileAtomic } from "../core/index.js";
import {
  createCsr,
  exportPrivateKey,
  generatePrivateKey,
  isValidId,
  loadOrCreateKeyFile,
  publicKeyFingerprint,
  readCertificates,
  verifyCertificate,
} from "../pki/index.js";
import { COMPUTE_CODES, ComputeError } from "./errors.js";
import { type ComputeTlsFiles, defaultTlsFiles } from "./node-identity.js";

/** `[--join TOKEN] --ca-fingerprint sha256:HEX [--id ID]`: what a node needs to enroll itself. */
export interface JoinOptions {
  /**
   * The join token, `shoal1.<id>.<secret>` (`--join`, or `SHOAL_JOIN_TOKEN`).
   * Without one the node asks anyway and waits until an operator runs
   * `shoal node approve ID` (or `reject`).
   */
  token?: string;
  /** The fabric root CA's SHA-256, `sha256:HEX` (colons allowed) (`--ca-fingerprint`, or `SHOAL_CA_FINGERPRINT`). */
  caFingerprint: string;
  /** The id to ask for. @default the host name, lower-cased, with other characters as `-` */
  nodeId?: string;
  /** How often a node without a token asks whether it was approved. @default DEFAULT_ENROLL_POLL_MS */
  pollMs?: number;
}

/**
 * `DATA-DIR/<this>`: the key of a node that waits for approval (0600), kept so
 * a restart asks again with the same key; removed once enrolled or refused.
 */
export const PENDING_KEY_FILE = "pending-enrollment.key";
/** How often a node waiting for approval asks again. @default 2 s */
export const DEFAULT_ENROLL_POLL_MS = 2000;

/** Written next to the identity: who the node is and the labels its join token gave it. */
export const ENROLLMENT_FILE = "enrollment.json";
/** The API port when `Compute.API` is empty. */
export const DEFAULT_ENROLL_API_PORT = 1234;
/** @default 30 s per request to the API during enrollment. */
const REQUEST_TIMEOUT_MS = 30_000;
/** Largest answer read from the API (a CA bundle or a certificate chain). */
const MAX_RESPONSE_BYTES = 1024 * 1024;

/** What `DATA-DIR/tls/enrollment.json` holds. */
export interface EnrollmentRecord {
  NodeID: string;
  SPIFFEID: string;
  Labels: Record<string, string>;
  Serial: string;
  NotAfter: string;
  API: string;
  EnrolledAt: string;
}

function usage(message: string, fix: string): ShoalError {
  return new ShoalError(CORE_CODES.SHOAL_USAGE, message, { fix });
}

function enrollError(message: string, fix: string, cause?: unknown): ComputeError {
  return new ComputeError(COMPUTE_CODES.SHOAL_COMPUTE_ENROLL, message, { fix, ...(cause ? { cause } : {}) });
}

/** `sha256:AB:cd…` or bare hex → the 32 digest bytes. */
export function parseCaFingerprint(text: string): Buffer {
  const hex = text
    .trim()
    .replace(/^sha256:/i, "")
    .replaceAll(":", "")
    .toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(hex)) {
    throw usage(
      `--ca-fingerprint ${JSON.stringify(text)} is not a SHA-256 fingerprint`,
      "copy the `CA fingerprint: sha256:…` line the orchestrator printed (or `shoal pki inspect ca.crt`)",
    );
  }
  return Buffer.from(hex, "hex");
}

/** The orchestrator API used for enrollment: `Compute.API`, else https://<first orchestrator host>:1234. */
export function enrollmentApiUrl(configured: string, orchestrators: readonly string[]): string {
  if (configured) return configured.replace(/\/+$/, "");
  const first = orchestrators[0];
  if (!first) {
    throw usage(
      "no orchestrator to enroll with",
      "give --orchestrators tls://HOST:4222 (and --api if needed)",
    );
  }
  let host: string;
  try {
    host = new URL(first.includes("://") ? first : `tls://${first}`).hostname;
  } catch {
    throw usage(`--orchestrators ${first} is not a URL`, "give URLs like tls://orch.example.com:4222");
  }
  return `https://${host}:${DEFAULT_ENROLL_API_PORT}`;
}

/** The default node id: the host name made subject-safe (a-z 0-9 - _, at most 63). */
export function defaultNodeId(hostname: string = os.hostname()): string {
  const id = hostname
    .toLowerCase()
    .replace(/[^a-z0-9_-]+/g, "-")
    .replace(/^[-_]+/, "")
    .slice(0, 63);
  return id || "node";
}

interface ApiAnswer {
  status: number;
  body: Buffer;
}

/** One HTTPS request; `ca` undefined means the body is checked by the caller (pinning), not the transport. */
function request(url: string, opts: { method: string; ca?: string; json?: unknown }): Promise<ApiAnswer> {
  const payload = opts.json === undefined ? undefined : Buffer.from(JSON.stringify(opts.json));
  return new Promise((resolve, reject) => {
    const req = https.request(
      url,
      {
        method: opts.method,
        timeout: REQUEST_TIMEOUT_MS,
        ...(opts.ca ? { ca: opts.ca, rejectUnauthorized: true } : { rejectUnauthorized: false }),
        // A fresh connection each time: the pinned fetch and the verified calls must not share one.
        agent: false,
        headers: {
          accept: "application/json, application/x-pem-file",
          ...(payload ? { "content-type": "application/json", "content-length": payload.length } : {}),
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on("data", (c: Buffer) => {
          size += c.length;
          if (size > MAX_RESPONSE_BYTES)
            req.destroy(new Error(`answer larger than ${MAX_RESPONSE_BYTES} bytes`));
          else chunks.push(c);
        });
        res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new Error(`no answer within ${REQUEST_TIMEOUT_MS / 1000} s`)));
    req.on("error", reject);
    req.end(payload);
  });
}

function transportError(url: string, err: unknown, pinned: boolean): ComputeError {
  const code = (err as NodeJS.ErrnoException).code ?? "";
  const message = (err as Error).message;
  if (pinned && /CERT|SELF_SIGNED|UNABLE_TO|ERR_TLS_CERT_ALTNAME/.test(code)) {
    return enrollError(
      `the API at ${url} presented a certificate the pinned CA does not vouch for (${code}: ${message})`,
      "point --api at the orchestrator whose CA fingerprint you pinned, by a host name or IP its API certificate names (Orchestrator.Advertise)",
      err,
    );
  }
  return enrollError(
    `cannot reach the orchestrator API at ${url}: ${code || message}`,
    "check the address (--api, default https://<first orchestrator host>:1234) and that the orchestrator runs",
    err,
  );
}

/**
 * Fetches `GET /api/v1/pki/ca` and keeps only the certificate whose SHA-256 is
 * the pinned fingerprint. The transport is not trusted here (nothing is
 * trusted yet): the pin is what authenticates the answer, and nothing else in
 * it is used. Every later call verifies TLS against the CA returned.
 *
 * @throws ComputeError SHOAL_COMPUTE_CA_MISMATCH when no certificate matches the pin.
 */
export async function fetchPinnedCa(apiUrl: string, fingerprint: Buffer): Promise<string> {
  const url = `${apiUrl}/api/v1/pki/ca`;
  let answer: ApiAnswer;
  try {
    answer = await request(url, { method: "GET" });
  } catch (err) {
    throw transportError(url, err, false);
  }
  if (answer.status !== 200) {
    throw enrollError(
      `${url} answered HTTP ${answer.status}, not the CA bundle`,
      "check that --api names a Shoal orchestrator",
    );
  }
  let certs: X509Certificate[] = [];
  try {
    certs = readCertificates(answer.body.toString("utf8"), url);
  } catch {
    // Not PEM: reported below as a mismatch, like any answer that is not the pinned CA.
  }
  const pinned = certs.find((c) => {
    const digest = Buffer.from(c.fingerprint256.replaceAll(":", ""), "hex");
    return digest.length === fingerprint.length && timingSafeEqual(digest, fingerprint);
  });
  if (!pinned) {
    const seen = certs.map((c) => `sha256:${c.fingerprint256.replaceAll(":", "").toLowerCase()}`);
    throw new ComputeError(
      COMPUTE_CODES.SHOAL_COMPUTE_CA_MISMATCH,
      `the CA served at ${url} (${seen.join(", ") || "no certificate"}) is not the pinned sha256:${fingerprint.toString("hex")}`,
      {
        fix: "check --ca-fingerprint against the orchestrator's banner or `shoal pki inspect ca.crt`; a mismatch can mean you reached the wrong host or someone in between",
      },
    );
  }
  return pinned.toString();
}

function parseJson<T>(answer: ApiAnswer, url: string): T {
  try {
    return JSON.parse(answer.body.toString("utf8")) as T;
  } catch (cause) {
    throw enrollError(`${url} answered HTTP ${answer.status} with no JSON`, "check --api", cause);
  }
}

/**
 * Trust, but verify: the chain returned must chain to the pinned CA, be a
 * compute identity for `nodeId` and carry our public key. Returns its SPIFFE id.
 */
function checkIssued(certPem: unknown, caPem: string, key: KeyObject, nodeId: string): string {
  let problem = "";
  try {
    const check = verifyCertificate(String(certPem), { caPem, role: "compute" });
    const leafSpki = new X509Certificate(String(certPem)).publicKey.export({ type: "spki", format: "der" });
    if (!check.ok) problem = check.failures.map((f) => f.code).join(", ");
    else if (!leafSpki.equals(createPublicKey(key).export({ type: "spki", format: "der" })))
      problem = "not our key";
    else if (!check.leaf.spiffeId?.endsWith(`/compute/${nodeId}`)) problem = `names ${check.leaf.spiffeId}`;
    else return check.leaf.spiffeId;
  } catch (err) {
    problem = (err as Error).message;
  }
  throw enrollError(
    `the certificate the orchestrator returned is not a valid compute identity ${nodeId} for this node's key: ${problem}`,
    "report it: the orchestrator and this node disagree on the PKI",
  );
}

/**
 * Asks for a certificate without a token until the orchestrator answers
 * anything but 202 (waiting for an operator): each request carries a CSR made
 * with the node's key, which proves it holds that key, so only this node gets
 * the certificate once approved. The API unreachable on the first request is
 * an error; later, while waiting, it is retried.
 */
async function waitForApproval(
  url: string,
  apiUrl: string,
  caPem: string,
  body: { CSR: string; NodeID: string },
  o: { key: KeyObject; pollMs: number; log: Logger; signal?: AbortSignal },
): Promise<ApiAnswer> {
  let waiting = false;
  for (;;) {
    try {
      const answer = await request(url, { method: "POST", ca: caPem, json: body });
      if (answer.status !== 202) return answer;
      if (!waiting) {
        waiting = true;
        o.log.warn(
          { node: body.NodeID, keyFingerprint: publicKeyFingerprint(o.key) },
          `waiting for an operator to run \`shoal node approve ${body.NodeID}\` (check the key fingerprint in \`shoal node list -o json\`)`,
        );
      }
    } catch (err) {
      if (!waiting) throw transportError(apiUrl, err, true);
      o.log.warn({ err: (err as Error).message }, "cannot reach the orchestrator API; asking again");
    }
    try {
      await sleep(o.pollMs, undefined, o.signal ? { signal: o.signal } : {});
    } catch (cause) {
      throw enrollError(
        `stopped while waiting for approval of ${body.NodeID}`,
        "start the node again: it asks with the same key",
        cause,
      );
    }
  }
}

/** Stage every file in a fresh directory, then rename it to `tls/`: the node has all of its identity or none. */
async function writeIdentityDir(
  target: string,
  files: { name: string; data: string; mode: number }[],
): Promise<void> {
  const parent = path.dirname(target);
  await fs.mkdir(parent, { recursive: true, mode: 0o700 });
  const stage = path.join(parent, `.tls-enroll-${randomBytes(6).toString("hex")}`);
  await fs.mkdir(stage, { mode: 0o700 });
  try {
    for (const f of files) await writeFileAtomic(path.join(stage, f.name), f.data, f.mode);
    // An empty tls/ (e.g. made by hand) may be replaced; one with files in it is the operator's.
    await fs.rmdir(target).catch(() => {});
    await fs.rename(stage, target);
    const dir = await fs.open(parent, "r");
    await dir.sync().finally(() => dir.close());
  } catch (err) {
    await fs.rm(stage, { recursive: true, force: true });
    throw (err as NodeJS.ErrnoException).code === "ENOTEMPTY" ||
      (err as NodeJS.ErrnoException).code === "EEXIST"
      ? enrollError(
          `${target} already holds files but no node identity`,
          `move ${target} away (or point Compute.TLS.* at the files) and start again`,
          err,
        )
      : err;
  }
}

async function exists(file: string): Promise<boolean> {
  return fs.access(file).then(
    () => true,
    () => false,
  );
}

/** Reads the labels a join token gave this node (empty when it was not enrolled by token). */
export async function readEnrollment(dataDir: string): Promise<EnrollmentRecord | undefined> {
  const file = path.join(path.dirname(defaultTlsFiles(dataDir).clientCert), ENROLLMENT_FILE);
  const text = await fs.readFile(file, "utf8").catch(() => undefined);
  return text === undefined ? undefined : (JSON.parse(text) as EnrollmentRecord);
}

/**
 * Zero-touch enrollment into `DATA-DIR/tls/`, done once: when the node's
 * certificate is already there it returns at once (a restart never
 * re-enrolls). Otherwise: fetch the CA and check it against the pinned
 * fingerprint, make the key here, send a CSR and the token over TLS verified
 * against that CA, check the chain that comes back (it must chain to the
 * pinned CA and name `spiffe://…/compute/<id>` for our key), and only then
 * write ca.crt, node.crt, node.key (0600) and enrollment.json, all at once.
 * On any failure nothing is written.
 *
 * @returns whether it enrolled now, and the node id.
 * @throws ComputeError SHOAL_COMPUTE_CA_MISMATCH, SHOAL_COMPUTE_ENROLL; the
 *   orchestrator's own code when it refuses (e.g. SHOAL_PKI_JOIN_TOKEN_USED,
 *   SHOAL_ORCH_NODE_ID_TAKEN); SHOAL_USAGE for a malformed flag.
 */
export async function ensureEnrolled(o: {
  dataDir: string;
  join: JoinOptions;
  /** `Compute.API`. */
  api: string;
  /** `Compute.Orchestrators`. */
  orchestrators: readonly string[];
  /** The configured `Compute.TLS.*` (enrollment writes only the defaults). */
  configured: ComputeTlsFiles;
  log: Logger;
  /** Stops waiting for approval (the node is closing). */
  signal?: AbortSignal;
}): Promise<{ enrolled: boolean }> {
  const files = defaultTlsFiles(o.dataDir);
  if (o.configured.clientCert || o.configured.clientKey) {
    throw usage(
      "--join enrolls into DATA-DIR/tls, but Compute.TLS.ClientCert/ClientKey name other files",
      "drop --join to use those files, or unset Compute.TLS.ClientCert and ClientKey",
    );
  }
  if (await exists(files.clientCert)) {
    o.log.info({ cert: files.clientCert }, "already enrolled: using the identity in the data directory");
    return { enrolled: false };
  }
  const fingerprint = parseCaFingerprint(o.join.caFingerprint);
  const nodeId = o.join.nodeId ?? defaultNodeId();
  if (!isValidId(nodeId)) {
    throw usage(
      `--id ${JSON.stringify(nodeId)} is not a valid node id`,
      "ids are 1-63 characters of a-z 0-9 - _, starting with a letter or digit",
    );
  }
  const apiUrl = enrollmentApiUrl(o.api, o.orchestrators);

  const caPem = await fetchPinnedCa(apiUrl, fingerprint);
  const url = `${apiUrl}/api/v1/enroll`;
  const { token } = o.join;
  const pendingKey = path.join(o.dataDir, PENDING_KEY_FILE);
  const key = token ? generatePrivateKey("ecdsa-p256") : await loadOrCreateKeyFile(pendingKey);
  const body = { ...(token ? { Token: token.trim() } : {}), CSR: createCsr(key, nodeId), NodeID: nodeId };
  let answer: ApiAnswer;
  try {
    answer = token
      ? await request(url, { method: "POST", ca: caPem, json: body }).catch((err: unknown) => {
          throw transportError(apiUrl, err, true);
        })
      : await waitForApproval(url, apiUrl, caPem, body, {
          key,
          pollMs: o.join.pollMs ?? DEFAULT_ENROLL_POLL_MS,
          log: o.log,
          ...(o.signal ? { signal: o.signal } : {}),
        });
    if (answer.status !== 201) {
      const refused = parseJson<{ error?: { code?: string; message?: string; fix?: string } }>(answer, url);
      if (!refused.error?.code) throw enrollError(`${url} answered HTTP ${answer.status}`, "check --api");
      // The orchestrator's own code (e.g. SHOAL_PKI_JOIN_TOKEN_USED), turned into an error here.
      throw new ShoalError(refused.error.code, `enrollment refused: ${refused.error.message ?? ""}`, {
        ...(refused.error.fix ? { fix: refused.error.fix } : {}),
      });
    }
  } catch (err) {
    // Refused (or unreachable): nothing of the attempt stays. Stopped while waiting: the key stays for the next start.
    if (!o.signal?.aborted) await fs.rm(pendingKey, { force: true });
    throw err;
  }
  const got = parseJson<{
    NodeID: string;
    SPIFFEID: string;
    Certificate: string;
    Labels: Record<string, string>;
    NotAfter: string;
    Serial: string;
  }>(answer, url);

  const spiffeId = checkIssued(got.Certificate, caPem, key, nodeId);
  const record: EnrollmentRecord = {
    NodeID: nodeId,
    SPIFFEID: spiffeId,
    Labels: got.Labels ?? {},
    Serial: got.Serial,
    NotAfter: got.NotAfter,
    API: apiUrl,
    EnrolledAt: new Date().toISOString(),
  };
  await writeIdentityDir(path.dirname(files.clientCert), [
    { name: path.basename(files.caCert), data: caPem, mode: 0o644 },
    { name: path.basename(files.clientKey), data: exportPrivateKey(key), mode: 0o600 },
    { name: path.basename(files.clientCert), data: got.Certificate, mode: 0o644 },
    { name: ENROLLMENT_FILE, data: `${JSON.stringify(record, null, 2)}\n`, mode: 0o644 },
  ]);
  await fs.rm(pendingKey, { force: true });
  o.log.info({ node: nodeId, identity: record.SPIFFEID, notAfter: record.NotAfter }, "enrolled");
  return { enrolled: true };
}
