import { createPrivateKey, createPublicKey, X509Certificate } from "node:crypto";
import path from "node:path";
import { readFileChecked } from "../core/index.js";
import { parseSpiffeId, verifyCertificate } from "../pki/index.js";
import { COMPUTE_CODES, ComputeError } from "./errors.js";

/** Where a compute node's TLS files are; empty entries fall back to {@link defaultTlsFiles}. */
export interface ComputeTlsFiles {
  /** `Compute.TLS.CACert`: the fabric's root CA. */
  caCert: string;
  /** `Compute.TLS.ClientCert`: this node's chain, leaf first. */
  clientCert: string;
  /** `Compute.TLS.ClientKey`: this node's private key (0600). */
  clientKey: string;
}

/** The files enrollment writes, used when `Compute.TLS.*` is empty: `DATA-DIR/tls/{ca.crt,node.crt,node.key}`. */
export function defaultTlsFiles(dataDir: string): ComputeTlsFiles {
  const dir = path.join(dataDir, "tls");
  return {
    caCert: path.join(dir, "ca.crt"),
    clientCert: path.join(dir, "node.crt"),
    clientKey: path.join(dir, "node.key"),
  };
}

/** A compute node's proven identity: what its certificate says, checked against the CA. */
export interface NodeIdentity {
  /** The `<id>` of `spiffe://<td>/compute/<id>`. */
  id: string;
  spiffeId: string;
  trustDomain: string;
  files: ComputeTlsFiles;
  caPem: string;
  chainPem: string;
  keyPem: string;
  notAfter: Date;
  fingerprint: string;
}

function identityError(message: string, fix: string, cause?: unknown): ComputeError {
  return new ComputeError(COMPUTE_CODES.SHOAL_COMPUTE_IDENTITY, message, {
    fix,
    ...(cause ? { cause } : {}),
  });
}

/**
 * Loads and checks this node's identity before it dials anything: the
 * certificate must chain to the CA, be inside its validity window, carry the
 * clientAuth EKU and a `spiffe://<td>/compute/<id>` URI SAN, and the key must
 * be its key. The node id comes from the certificate, never from config.
 *
 * @throws ComputeError `SHOAL_COMPUTE_IDENTITY` naming the failed check and the fix.
 */
export async function loadNodeIdentity(files: ComputeTlsFiles, at: Date = new Date()): Promise<NodeIdentity> {
  const read = async (file: string, what: string) => {
    try {
      return (await readFileChecked(file)).toString("utf8");
    } catch (err) {
      throw identityError(
        `the node's ${what}: ${(err as Error).message}`,
        "set Compute.TLS.CACert, ClientCert and ClientKey to this node's files (e.g. from `shoal pki issue compute`), or enroll with --join",
        err,
      );
    }
  };
  const caPem = await read(files.caCert, "CA certificate");
  const chainPem = await read(files.clientCert, "certificate");
  const keyPem = await read(files.clientKey, "private key");

  let result: ReturnType<typeof verifyCertificate>;
  try {
    result = verifyCertificate(chainPem, { caPem, role: "compute", at });
  } catch (err) {
    throw identityError(
      `${files.clientCert} or ${files.caCert} is not a PEM certificate: ${(err as Error).message}`,
      "point Compute.TLS.ClientCert and CACert at PEM certificate files",
      err,
    );
  }
  if (!result.ok) {
    const [first] = result.failures;
    throw identityError(
      `the node certificate ${files.clientCert} cannot be used: ${result.failures.map((f) => `${f.code}: ${f.message}`).join("; ")}`,
      first?.fix ?? "issue a new compute certificate",
    );
  }
  const parsed = result.leaf.spiffeId ? parseSpiffeId(result.leaf.spiffeId) : undefined;
  if (parsed?.role !== "compute") {
    throw identityError(
      `the node certificate ${files.clientCert} carries no spiffe://<trust-domain>/compute/<id> URI SAN`,
      "issue a compute identity: shoal pki issue compute --id ID",
    );
  }
  let keyMatches = false;
  try {
    const leaf = new X509Certificate(chainPem);
    const certSpki = leaf.publicKey.export({ type: "spki", format: "der" });
    const keySpki = createPublicKey(createPrivateKey(keyPem)).export({ type: "spki", format: "der" });
    keyMatches = certSpki.equals(keySpki);
  } catch (err) {
    throw identityError(
      `${files.clientKey} is not a readable private key: ${(err as Error).message}`,
      "point Compute.TLS.ClientKey at the PEM key of the certificate",
      err,
    );
  }
  if (!keyMatches) {
    throw identityError(
      `${files.clientKey} is not the private key of ${files.clientCert}`,
      "use the .key file written together with the certificate",
    );
  }
  return {
    id: parsed.id,
    spiffeId: result.leaf.spiffeId!,
    trustDomain: parsed.trustDomain,
    files,
    caPem,
    chainPem,
    keyPem,
    notAfter: result.leaf.notAfter,
    fingerprint: result.leaf.fingerprint,
  };
}
