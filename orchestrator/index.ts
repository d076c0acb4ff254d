/**
 * The orchestrator: the daemon (`shoal orchestrator serve`), its HTTPS API, the
 * node registry, the dispatcher and the KV-backed job store.
 */

export { type ApiErrorBody, type ApiOptions, type ApiSecurity, buildApi } from "./api.js";
export {
  ApiAuth,
  type ApiAuthOptions,
  apiAudience,
  HANDLER_AUTHORIZED_ROUTES,
  PUBLIC_ROUTES,
  ROUTE_RULES,
  type RouteRule,
  TOKEN_KEY_FILE,
} from "./api-auth.js";
export * from "./api-tls.js";
export { AUTH_BUCKETS, type AuthStoreListeners, KvAuthStore, type WatchableAuthStore } from "./auth-store.js";
export { Orchestrator, type OrchestratorEndpoints, type OrchestratorOptions } from "./daemon.js";
export {
  Dispatcher,
  type JobRequirements,
  type NodeChannel,
  type PlaceFn,
  type Placement,
} from "./dispatcher.js";
export { ORCHESTRATOR_CODES, OrchestratorError } from "./errors.js";
export { type ExecutionResults, JobService, type ParsedJob } from "./job-service.js";
export type { LogEntry } from "./log-store.js";
export { NodeService, type NodeView } from "./node-service.js";
export type {
  ExecutionRecord,
  ExecutionState,
  JobEvent,
  JobRecord,
  JobState,
  JobView,
  NodeHealth,
  NodeRecord,
  ResultFile,
} from "./records.js";
export { isSafeResultName } from "./results-store.js";
