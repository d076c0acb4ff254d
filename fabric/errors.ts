import { defineCodes, ShoalError } from "../core/index.js";

export const FABRIC_CODES = defineCodes("fabric", {
  SHOAL_TLS_NO_CLIENT_CERT: "The NATS server requires a client certificate and none was presented.",
  SHOAL_TLS_CLIENT_UNKNOWN_CA: "The client certificate is not issued by the fabric CA the server trusts.",
  SHOAL_TLS_CLIENT_CERT_EXPIRED: "The client certificate is past its notAfter date.",
  SHOAL_TLS_CLIENT_CERT_NOT_YET_VALID:
    "The client certificate's notBefore is in the future (clock skew or early use).",
  SHOAL_TLS_CLIENT_EKU: "The client certificate lacks the clientAuth extended key usage.",
  SHOAL_TLS_CLIENT_KEY_MISMATCH: "The client key file does not belong to the client certificate.",
  SHOAL_TLS_CLIENT_IDENTITY:
    "The client certificate's URI SAN is not the identity this daemon was configured with.",
  SHOAL_TLS_SERVER_UNKNOWN_CA: "The server's certificate does not chain to the CA file the client trusts.",
  SHOAL_TLS_SAN_MISMATCH: "The server's certificate is not valid for the host name or IP that was dialed.",
  SHOAL_TLS_SERVER_CERT_EXPIRED: "The server's certificate is past its notAfter date.",
  SHOAL_TLS_SERVER_CERT_NOT_YET_VALID: "The server's certificate's notBefore is in the future.",
  SHOAL_TLS_NOT_OFFERED: "The server at that address does not offer TLS (not a Shoal NATS server).",
  SHOAL_TLS_HANDSHAKE: "The TLS handshake failed for another reason; the message carries the TLS alert.",
  SHOAL_NATS_UNREACHABLE:
    "Nothing answers on the NATS address (refused, unreachable, DNS failure or no handshake).",
  SHOAL_NATS_AUTHORIZATION:
    "The broker does not know this identity: not enrolled, revoked, expired or deleted.",
  SHOAL_NATS_PERMISSION: "The broker refused a publish or subscribe outside this identity's subjects.",
  SHOAL_NATS_REQUEST_TIMEOUT: "A request got no reply in time.",
  SHOAL_NATS_NO_RESPONDERS: "A request went to a subject nobody listens on.",
  SHOAL_NATS_CLOSED: "The NATS connection is closed or draining.",
  SHOAL_NATS_MAX_PAYLOAD:
    "The broker's max_payload is below the 1 MiB a fabric message may need, or a message exceeded it.",
  SHOAL_NATS_SERVER_NOT_FOUND: "The nats-server binary cannot be found or executed.",
  SHOAL_NATS_SERVER_START: "The supervised nats-server exited or failed before it was ready.",
  SHOAL_NATS_SERVER_RELOAD: "The supervised nats-server refused a configuration reload.",
  SHOAL_NATS_ROUTE_REJECTED:
    "A route between two servers of the cluster was refused: a certificate not from the fabric CA, without the route name, or not valid for the dialed host.",
  SHOAL_NATS_CONFIG: "The broker configuration cannot be generated (bad identity, path or option).",
  SHOAL_NATS_STANDALONE_STORE:
    "The supervised nats-server was asked to join a cluster, but its JetStream store holds streams of a server that ran alone, which nats-server would orphan.",
  SHOAL_ENVELOPE_MALFORMED: "A fabric message is not a well-formed compact JWS envelope.",
  SHOAL_ENVELOPE_TOO_LARGE: "A fabric message exceeds the envelope size limit.",
  SHOAL_ENVELOPE_UNKNOWN_SENDER: "The envelope names a sender certificate this verifier does not know.",
  SHOAL_ENVELOPE_SIGNATURE: "The envelope's signature does not verify with the sender's certificate.",
  SHOAL_ENVELOPE_SENDER_CERT:
    "The sender's certificate does not chain to the fabric CA or is outside its validity.",
  SHOAL_ENVELOPE_REVOKED: "The sender's certificate or identity is revoked.",
  SHOAL_ENVELOPE_ISSUER: "The envelope's iss is not the identity in the sender's certificate.",
  SHOAL_ENVELOPE_ROLE: "The sender's identity may not send on the subject the envelope arrived on.",
  SHOAL_ENVELOPE_KIND: "The envelope's typ is unknown or does not match the subject.",
  SHOAL_ENVELOPE_AUDIENCE: "The envelope is addressed to another identity.",
  SHOAL_ENVELOPE_EXPIRED: "The envelope's exp is in the past (beyond the allowed clock skew).",
  SHOAL_ENVELOPE_NOT_YET_VALID: "The envelope's iat is in the future (beyond the allowed clock skew).",
  SHOAL_ENVELOPE_REPLAY: "An envelope with this jti was already accepted.",
  SHOAL_ENVELOPE_BODY_INVALID: "The envelope's body does not match the protocol schema for its kind.",
  SHOAL_ENVELOPE_SIGNER_KEY:
    "The signing key cannot sign envelopes (unsupported type or not the certificate's key).",
});

export type FabricCode = keyof typeof FABRIC_CODES;

/** Any failure of the fabric: TLS, broker, supervisor or envelope. */
export class FabricError extends ShoalError {
  declare readonly code: FabricCode;
  /** Structured details for callers and `--output json` (hosts, SANs, subjects...). */
  readonly details: Readonly<Record<string, unknown>>;

  constructor(
    code: FabricCode,
    message: string,
    options: { cause?: unknown; fix?: string; details?: Record<string, unknown> } = {},
  ) {
    super(code, message, options);
    this.details = Object.freeze({ ...(options.details ?? {}) });
  }

  override toJSON(): Record<string, unknown> {
    return { ...super.toJSON(), ...(Object.keys(this.details).length ? { details: this.details } : {}) };
  }
}

/** A TLS failure between a client and the broker, client or server side. */
export class TlsError extends FabricError {}

/** The broker refused the connection: the identity is not (or no longer) a user. */
export class BrokerAuthorizationError extends FabricError {
  constructor(
    readonly identity: string | undefined,
    readonly server: string,
    options: { cause?: unknown } = {},
  ) {
    super(
      FABRIC_CODES.SHOAL_NATS_AUTHORIZATION,
      `${server} refused ${identity ?? "this client"}: the identity is not a broker user (unknown, revoked, expired or deleted)`,
      {
        ...options,
        fix: "check `shoal node describe <id>` / `shoal pki list` on the orchestrator; enroll again or issue a new certificate if it was revoked or expired",
        details: { identity, server },
      },
    );
  }
}

/** The broker refused a publish or a subscription outside the identity's permissions. */
export class PermissionViolation extends FabricError {
  constructor(
    readonly operation: "publish" | "subscribe",
    readonly subject: string,
    readonly identity: string | undefined,
    options: { cause?: unknown } = {},
  ) {
    super(
      FABRIC_CODES.SHOAL_NATS_PERMISSION,
      `${identity ?? "this identity"} may not ${operation} ${operation === "publish" ? "on" : "to"} "${subject}"`,
      {
        ...options,
        fix: "use only the subjects of DESIGN.md 'Subjects and permissions' (see docs/fabric.md); a compute node talks only on its own subjects",
        details: { operation, subject, identity },
      },
    );
  }
}

/** The broker is not reachable at all at that address. */
export class BrokerUnreachableError extends FabricError {}

/** A request failed: timeout, no responders or a closed connection. */
export class RequestFailedError extends FabricError {}

/** The supervised nats-server could not be started, reloaded or configured. */
export class NatsServerError extends FabricError {}

/** An envelope was refused; `code` says which check failed. */
export class EnvelopeError extends FabricError {}
