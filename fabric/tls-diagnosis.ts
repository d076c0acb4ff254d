import { createPrivateKey, X509Certificate } from "node:crypto";
import net from "node:net";
import tls from "node:tls";
import { isUnknownCaCode } from "../pki/index.js";
import {
  BrokerAuthorizationError,
  BrokerUnreachableError,
  FABRIC_CODES,
  type FabricError,
  TlsError,
} from "./errors.js";

const CLIENT_AUTH_EKU = "1.3.6.1.5.5.7.3.2";

/** PEM texts of a client's TLS material (the files as read right now). */
export interface ClientTlsMaterial {
  readonly caPem: string;
  /** Leaf first, then intermediates; absent for "no client certificate". */
  readonly certPem?: string;
  readonly keyPem?: string;
  /** Where they came from, for messages. */
  readonly files: { readonly ca: string; readonly cert?: string; readonly key?: string };
}

export function splitPem(pem: string): string[] {
  return pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
}

function uriSans(cert: X509Certificate): string[] {
  return (cert.subjectAltName ?? "")
    .split(", ")
    .filter((s) => s.startsWith("URI:"))
    .map((s) => s.slice(4));
}

/** Does `chain` (leaf first) lead to one of `roots` by signatures and issuer names? */
function chainsTo(chain: X509Certificate[], roots: X509Certificate[]): boolean {
  let current = chain[0];
  const pool = [...chain.slice(1), ...roots];
  for (let depth = 0; current && depth < 8; depth++) {
    if (roots.some((r) => r.raw.equals((current as X509Certificate).raw))) return true;
    const c = current;
    const issuer = pool.find((p) => c.checkIssued(p) && c.verify(p.publicKey));
    if (!issuer) return false;
    if (roots.some((r) => r.raw.equals(issuer.raw))) return true;
    current = issuer;
  }
  return false;
}

/**
 * Checks the local client certificate before dialing, so the common mistakes get
 * a precise error instead of the server's one-size "bad certificate" alert (which
 * a TLS 1.3 client sees only as a timeout): no certificate, a key that does not
 * match, outside its validity, no clientAuth EKU, not issued by the fabric CA, or
 * not the configured identity. Returns the leaf's URI SAN.
 */
export function preflightClientCertificate(
  m: ClientTlsMaterial,
  expectedIdentity: string | undefined,
  now: Date,
): string {
  if (!m.certPem || !m.keyPem) {
    throw new TlsError(
      FABRIC_CODES.SHOAL_TLS_NO_CLIENT_CERT,
      "no client certificate: the fabric's NATS server requires one",
      {
        fix: "set Compute.TLS.ClientCert/ClientKey (or enroll with `shoal compute serve --join TOKEN --ca-fingerprint ...`)",
      },
    );
  }
  const chain = splitPem(m.certPem).map((p) => new X509Certificate(p));
  const leaf = chain[0];
  if (!leaf) {
    throw new TlsError(FABRIC_CODES.SHOAL_TLS_NO_CLIENT_CERT, `${m.files.cert} holds no PEM certificate`, {
      fix: "point the client certificate setting at the .crt written by `shoal pki issue` or enrollment",
      details: { file: m.files.cert },
    });
  }
  const subject = uriSans(leaf)[0] ?? leaf.subject.replace(/\n/g, ", ");
  if (!leaf.checkPrivateKey(createPrivateKey(m.keyPem))) {
    throw new TlsError(
      FABRIC_CODES.SHOAL_TLS_CLIENT_KEY_MISMATCH,
      `${m.files.key} is not the key of ${m.files.cert} (${subject})`,
      {
        fix: "use the .key written next to the .crt (same PREFIX); after re-enrollment both files change together",
        details: { cert: m.files.cert, key: m.files.key },
      },
    );
  }
  const from = new Date(leaf.validFrom);
  const to = new Date(leaf.validTo);
  if (now > to) {
    throw new TlsError(
      FABRIC_CODES.SHOAL_TLS_CLIENT_CERT_EXPIRED,
      `client certificate ${subject} expired at ${to.toISOString()}`,
      {
        fix: "renew it (`shoal pki issue ...` on the orchestrator, or restart the compute node with --join to enroll again)",
        details: { identity: subject, notAfter: to.toISOString(), file: m.files.cert },
      },
    );
  }
  if (now < from) {
    throw new TlsError(
      FABRIC_CODES.SHOAL_TLS_CLIENT_CERT_NOT_YET_VALID,
      `client certificate ${subject} is valid only from ${from.toISOString()} (now ${now.toISOString()})`,
      {
        fix: "check this machine's clock (NTP); otherwise wait or reissue without a future start",
        details: { identity: subject, notBefore: from.toISOString(), file: m.files.cert },
      },
    );
  }
  const eku = leaf.keyUsage;
  if (eku && !eku.includes(CLIENT_AUTH_EKU)) {
    throw new TlsError(
      FABRIC_CODES.SHOAL_TLS_CLIENT_EKU,
      `client certificate ${subject} lacks the clientAuth EKU (has ${eku.join(", ") || "none"})`,
      {
        fix: "use an identity certificate (`shoal pki issue compute|orchestrator --id ID`), not a server-only certificate",
        details: { identity: subject, eku },
      },
    );
  }
  const roots = splitPem(m.caPem).map((p) => new X509Certificate(p));
  if (!chainsTo(chain, roots)) {
    throw new TlsError(
      FABRIC_CODES.SHOAL_TLS_CLIENT_UNKNOWN_CA,
      `client certificate ${subject} (issuer "${leaf.issuer.replace(/\n/g, ", ")}") does not chain to the fabric CA in ${m.files.ca}`,
      {
        fix: "use a certificate issued by this fabric's PKI (the .crt must contain the leaf and the intermediate), or the right --ca file",
        details: { identity: subject, issuer: leaf.issuer, caFile: m.files.ca },
      },
    );
  }
  if (expectedIdentity && subject !== expectedIdentity) {
    throw new TlsError(
      FABRIC_CODES.SHOAL_TLS_CLIENT_IDENTITY,
      `client certificate is for ${subject}, but this daemon is configured as ${expectedIdentity}`,
      {
        fix: "use the certificate issued for this node's id, or change the configured id to match the certificate",
        details: { certificate: subject, expected: expectedIdentity },
      },
    );
  }
  return subject;
}

/** What a probe of a NATS server found out, step by step. */
export interface ProbeResult {
  readonly tcpError?: string;
  readonly info?: { tls_required?: boolean; tls_available?: boolean; server_name?: string };
  readonly serverCertificate?: { sans: string[]; validFrom: string; validTo: string; fingerprint256: string };
  /** Node's verdict on the server chain against our CA (e.g. CERT_HAS_EXPIRED). */
  readonly serverChainError?: string;
  /** Set when the certificate is not valid for the dialed host. */
  readonly hostMismatch?: string;
  /** The TLS alert or socket error during or right after the handshake. */
  readonly tlsError?: { code: string | undefined; message: string };
  /** The TLS handshake completed (from the client's side). */
  readonly handshake?: boolean;
  /** The first protocol line after CONNECT+PING: "PONG" or "-ERR '...'" */
  readonly reply?: string;
}

/**
 * Dials a NATS server the way nats.js does (plain TCP, read INFO, upgrade to TLS)
 * but evaluates everything itself: it keeps the server's certificate, the chain
 * verdict, the host check and the precise TLS alert, then sends CONNECT+PING to
 * see whether the broker admits the identity.
 */
export function probeNatsServer(
  host: string,
  port: number,
  m: ClientTlsMaterial,
  timeoutMs = 5000,
): Promise<ProbeResult> {
  return new Promise((resolve) => {
    const out: {
      -readonly [K in keyof ProbeResult]: ProbeResult[K];
    } = {};
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(out);
    };
    const timer = setTimeout(() => {
      if (!out.info && !out.tcpError) out.tcpError = "ETIMEDOUT";
      finish();
    }, timeoutMs);
    const socket = net.connect(port, host);
    let buffered = "";
    socket.on("error", (e: NodeJS.ErrnoException) => {
      out.tcpError = e.code ?? e.message;
      finish();
    });
    socket.on("close", finish);
    socket.on("data", function onInfo(chunk: Buffer) {
      buffered += chunk.toString("latin1");
      const eol = buffered.indexOf("\r\n");
      if (eol < 0) return;
      socket.removeListener("data", onInfo);
      socket.removeAllListeners("close");
      socket.removeAllListeners("error");
      const line = buffered.slice(0, eol);
      try {
        out.info = line.startsWith("INFO ") ? JSON.parse(line.slice(5)) : {};
      } catch {
        out.info = {};
      }
      if (!out.info?.tls_required && !out.info?.tls_available) {
        finish();
        return;
      }
      const t = tls.connect({
        socket,
        ca: m.caPem,
        ...(m.certPem && m.keyPem ? { cert: m.certPem, key: m.keyPem } : {}),
        ...(net.isIP(host) ? {} : { servername: host }),
        rejectUnauthorized: false,
      });
      t.on("secureConnect", () => {
        out.handshake = true;
        const pc = t.getPeerCertificate();
        if (pc?.raw) {
          out.serverCertificate = {
            sans: (pc.subjectaltname ?? "").split(", ").filter(Boolean),
            validFrom: new Date(pc.valid_from).toISOString(),
            validTo: new Date(pc.valid_to).toISOString(),
            fingerprint256: pc.fingerprint256,
          };
          out.hostMismatch = tls.checkServerIdentity(host, pc)?.message;
        }
        const err = t.authorizationError as (Error & { code?: string }) | string | null;
        if (err) out.serverChainError = typeof err === "string" ? err : (err.code ?? err.message);
        t.write(
          'CONNECT {"verbose":false,"pedantic":false,"tls_required":true,"name":"shoal-probe","lang":"shoal","version":"0","protocol":1}\r\nPING\r\n',
        );
      });
      let reply = "";
      t.on("data", (c: Buffer) => {
        reply += c.toString("latin1");
        const end = reply.indexOf("\r\n");
        if (end >= 0) {
          out.reply = reply.slice(0, end);
          finish();
        }
      });
      t.on("error", (e: NodeJS.ErrnoException) => {
        out.tlsError = { code: e.code, message: e.message.split("\n")[0] ?? e.message };
        finish();
      });
      t.on("close", finish);
    });
  });
}

/**
 * Turns a probe into the one error that explains it, or `undefined` when the
 * probe found nothing wrong (the failure was transient).
 */
export function diagnoseProbe(
  server: string,
  host: string,
  r: ProbeResult,
  m: ClientTlsMaterial,
  identity: string | undefined,
): FabricError | undefined {
  if (r.tcpError) {
    return new BrokerUnreachableError(
      FABRIC_CODES.SHOAL_NATS_UNREACHABLE,
      `cannot reach NATS at ${server}: ${r.tcpError}`,
      {
        fix:
          r.tcpError === "ECONNREFUSED"
            ? "nothing listens there: start the orchestrator, or fix the address/port (Compute.Orchestrators, Orchestrator.Port)"
            : "check the host name, routing and firewalls between this machine and the orchestrator",
        details: { server, reason: r.tcpError },
      },
    );
  }
  if (!r.info?.tls_required && !r.info?.tls_available) {
    return new TlsError(
      FABRIC_CODES.SHOAL_TLS_NOT_OFFERED,
      `${server} does not offer TLS: it is not a Shoal NATS server`,
      {
        fix: "point the node at the orchestrator's NATS port (default 4222) with a tls:// URL",
        details: { server },
      },
    );
  }
  const sc = r.serverCertificate;
  const sans = sc?.sans ?? [];
  if (r.serverChainError === "CERT_HAS_EXPIRED") {
    return new TlsError(
      FABRIC_CODES.SHOAL_TLS_SERVER_CERT_EXPIRED,
      `the server certificate of ${server} expired at ${sc?.validTo}`,
      {
        fix: "renew the orchestrator's NATS server certificate (`shoal pki issue server ...`); it reloads the new file",
        details: { server, notAfter: sc?.validTo },
      },
    );
  }
  if (r.serverChainError === "CERT_NOT_YET_VALID") {
    return new TlsError(
      FABRIC_CODES.SHOAL_TLS_SERVER_CERT_NOT_YET_VALID,
      `the server certificate of ${server} is valid only from ${sc?.validFrom}`,
      {
        fix: "check the clocks of both machines (NTP)",
        details: { server, notBefore: sc?.validFrom },
      },
    );
  }
  if (isUnknownCaCode(r.serverChainError)) {
    return new TlsError(
      FABRIC_CODES.SHOAL_TLS_SERVER_UNKNOWN_CA,
      `the server certificate of ${server} does not chain to the CA in ${m.files.ca} (${r.serverChainError})`,
      {
        fix: "use the fabric's ca.crt (GET /api/v1/pki/ca, or --ca-fingerprint when joining) as the CA file",
        details: { server, caFile: m.files.ca, reason: r.serverChainError },
      },
    );
  }
  if (r.hostMismatch) {
    return new TlsError(
      FABRIC_CODES.SHOAL_TLS_SAN_MISMATCH,
      `the server certificate of ${server} is valid for ${sans.join(", ") || "no names"} — not ${host}`,
      {
        fix: `dial one of those names, or reissue the server certificate with ${net.isIP(host) ? "--ip" : "--dns"} ${host} (Orchestrator.Advertise)`,
        details: { server, host, sans },
      },
    );
  }
  if (r.serverChainError) {
    return new TlsError(
      FABRIC_CODES.SHOAL_TLS_HANDSHAKE,
      `the server certificate of ${server} is not acceptable: ${r.serverChainError}`,
      {
        fix: "reissue the orchestrator's server certificate from the fabric PKI",
        details: { server, reason: r.serverChainError },
      },
    );
  }
  if (!m.certPem && (r.tlsError || !r.reply)) {
    return new TlsError(
      FABRIC_CODES.SHOAL_TLS_NO_CLIENT_CERT,
      `${server} requires a client certificate and none was given`,
      {
        fix: "set the client certificate and key files (Compute.TLS.ClientCert/ClientKey)",
        details: { server, alert: r.tlsError?.message },
      },
    );
  }
  if (r.tlsError && !r.handshake) {
    return new TlsError(
      FABRIC_CODES.SHOAL_TLS_HANDSHAKE,
      `TLS handshake with ${server} failed: ${r.tlsError.message}`,
      {
        fix: "check the orchestrator's nats-server log for this client; it names the reason",
        details: { server, alert: r.tlsError.message, code: r.tlsError.code },
      },
    );
  }
  // Our certificate passed every local check, yet the server's TLS stack refused it
  // with a "bad certificate" alert: it does not trust the CA that issued it (an
  // unknown user gets -ERR after the handshake instead).
  if (r.tlsError && /bad certificate|unknown ca/i.test(r.tlsError.message)) {
    return new TlsError(
      FABRIC_CODES.SHOAL_TLS_CLIENT_UNKNOWN_CA,
      `${server} refused the client certificate (${r.tlsError.message}): it does not trust the CA in ${m.files.ca}`,
      {
        fix: "the server's tls {} block needs ca_file set to the fabric's ca.crt and verify_and_map: true",
        details: { server, alert: r.tlsError.message },
      },
    );
  }
  // The local certificate passed every check against the fabric CA, yet the broker
  // refused it after the handshake (an alert, a socket closed because the key is not
  // pinned, or -ERR): this identity or key is not admitted (unknown, revoked, expired).
  if (r.tlsError || !r.reply || (r.reply.startsWith("-ERR") && /authoriz/i.test(r.reply))) {
    return new BrokerAuthorizationError(identity, server, {
      cause: r.tlsError ?? r.reply ?? "connection closed right after the TLS handshake",
    });
  }
  return undefined;
}
