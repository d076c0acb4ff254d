/**
 * The fabric: mTLS NATS connections with typed failures, subject names and
 * least-privilege permissions, signed envelopes with a replay guard, and the
 * supervised nats-server with its generated configuration.
 */
export {
  type BrokerIdentity,
  type BrokerUser,
  type BrokerUsers,
  brokerIdentityFromCertificate,
  computeBrokerUsers,
  type ExclusionReason,
  sameBrokerUsers,
  usersLosingKeys,
} from "./broker-users.js";
export {
  connectFabric,
  diagnoseServer,
  FabricConnection,
  type FabricConnectOptions,
  type FabricStatus,
  toFabricError,
} from "./connection.js";
export {
  broadcastAudience,
  DEFAULT_CLOCK_SKEW_MS,
  DEFAULT_ENVELOPE_TTL_MS,
  DEFAULT_MAX_ENVELOPE_BYTES,
  type EnvelopeClaims,
  EnvelopeSigner,
  type EnvelopeSignerOptions,
  EnvelopeVerifier,
  type EnvelopeVerifierOptions,
  MAX_ENVELOPE_TTL_MS,
  type VerifiedEnvelope,
  type VerifyEnvelopeOptions,
} from "./envelope.js";
export {
  BrokerAuthorizationError,
  BrokerUnreachableError,
  EnvelopeError,
  FABRIC_CODES,
  type FabricCode,
  FabricError,
  NatsServerError,
  PermissionViolation,
  RequestFailedError,
  TlsError,
} from "./errors.js";
export {
  type Clock,
  MODULE_SERVE_MAX_WAIT_MS,
  NODE_CONTROL_LIMITS,
  NODE_MESSAGE_LIMIT,
  NODE_MODULE_BYTES,
  NODE_SEND_RATE,
  nodeControlLimits,
  Pacer,
  type Rate,
  RateLimit,
  TokenBucket,
} from "./message-rate.js";
export { FabricMessenger, type SignedReplier, type VerifiedHandler } from "./messenger.js";
export { type NatsClusterState, routeCertificateName, routeUrl } from "./nats-cluster.js";
export {
  type NatsServerState,
  renderAuthorization,
  renderExternalAuthorization,
  renderNatsConfig,
} from "./nats-config.js";
export { ExternalAuthorization, type ExternalAuthorizationOptions } from "./nats-external.js";
export { type ClientRejection, type NatsLogLevel, type NatsLogLine, parseNatsLogLine } from "./nats-log.js";
export { NatsSupervisor, type NatsSupervisorOptions, type NatsSupervisorStatus } from "./nats-supervisor.js";
export {
  algForKey,
  type EnvelopeAlg,
  type PeerCertificate,
  PeerCertificateCache,
  type PeerCertificateCacheOptions,
} from "./peer-cache.js";
export { DEFAULT_RESPONSE_WINDOW_MS, type NatsPermissions, permissionsFor } from "./permissions.js";
export * from "./protocol.js";
export { ReplayGuard, type ReplayGuardOptions, type ReplayVerdict } from "./replay-guard.js";
export { type ParsedSubject, parseSubject, SUBJECT_ROOT, subjects } from "./subjects.js";
export {
  type ClientTlsMaterial,
  diagnoseProbe,
  type ProbeResult,
  preflightClientCertificate,
  probeNatsServer,
} from "./tls-diagnosis.js";
