import type { IncomingMessage } from "node:http";
import type { Server as HttpsServer, ServerOptions } from "node:https";
import type { Socket } from "node:net";
import { PassThrough } from "node:stream";
import type { TLSSocket } from "node:tls";
import { Type as T } from "@sinclair/typebox";
import Fastify, {
  type FastifyError,
  type FastifyInstance,
  type FastifyReply,
  type FastifyRequest,
} from "fastify";
import { ANONYMOUS_PRINCIPAL, type Principal } from "../auth/index.js";
import {
  clientKey,
  isShoalError,
  JOB_LABEL_KEY,
  type Logger,
  LogThrottle,
  MAX_JOB_LABEL_VALUE,
  NodeLabelsSchema,
  Tally,
} from "../core/index.js";
import { isStoreFailure, ORCHESTRATOR_CODES, storeUnavailable } from "./errors.js";
import { type JobService, PAGE_TOKEN_PATTERN } from "./job-service.js";
import type { OrchestratorMetrics } from "./metrics.js";
import type { NodeService } from "./node-service.js";
import type { JobRecord } from "./records.js";

/** Largest request body (a job with an inline WASM module). */
export const DEFAULT_BODY_LIMIT = 32 * 1024 * 1024;

/**
 * How long a caller may take, per connection, before it is cut off: to finish
 * the TLS handshake, to send a request's headers (from the connection's start,
 * or from the first byte of a request), and to send a whole request with its
 * body (a 32 MiB module at about 1 Mbit/s). Without them a caller that
 * connects and then sends nothing, or headers a byte at a time, held its
 * connection for good (Node's TLS waits 120 s for a handshake, and fastify
 * sets no request timeout), and enough of them exhaust the orchestrator's
 * memory and descriptors before any authentication happens. Responses are not
 * limited: a followed job's history or logs may stream for hours. Node checks
 * the header and request timeouts every `checkMs`.
 */
export const API_TIMEOUTS = {
  handshakeMs: 10_000,
  headersMs: 30_000,
  requestMs: 300_000,
  checkMs: 5_000,
} as const;

export interface ApiOptions {
  jobs: JobService;
  nodes: NodeService;
  log: Logger;
  /** TLS of the listener (key, cert, or an SNICallback from the API TLS manager). */
  https: ServerOptions;
  /** The fabric CA bundle served at `GET /api/v1/pki/ca`. */
  caBundlePem: () => string;
  /** What `GET /api/v1/agent/node` says about this orchestrator. */
  nodeInfo: () => Record<string, unknown>;
  version: string;
  /**
   * Authentication and authorization (orchestrator/api-auth.ts): installed
   * before any route, it sets `req.principal` and decides every request.
   * Without it every caller is an unchecked anonymous principal (tests of
   * the routes alone).
   */
  security?: ApiSecurity;
  /** @default DEFAULT_BODY_LIMIT */
  bodyLimit?: number;
  /** Most connections one client address may hold open at once (`API.MaxConnsPerClient`); 0: no limit. @default 100 */
  maxConnsPerClient?: number;
  /** @default API_TIMEOUTS */
  timeouts?: Partial<Record<keyof typeof API_TIMEOUTS, number>>;
  /** Prometheus metrics: API requests are counted into it, and `GET agent/metrics` serves it. */
  metrics?: OrchestratorMetrics;
  /** Route groups kept in their own files (e.g. enrollment), registered after the core routes. */
  routes?: ((app: FastifyInstance) => void)[];
}

/**
 * Route config (`config: PUBLIC_ROUTE`) of endpoints that take no user token:
 * `GET pki/ca` (what a node pins) and `POST enroll` (the join token is the
 * credential). Authn/authz hooks must let these through.
 */
export const PUBLIC_ROUTE = { public: true } as const;

/** What the API needs of its security layer (implemented by ApiAuth). */
export interface ApiSecurity {
  /** Adds the authn/authz hooks and the auth routes; called before any other route is added. */
  install(app: FastifyInstance): void;
  /** Whether the caller may read a job (a listing shows no other). */
  canReadJob(req: FastifyRequest): (job: JobRecord) => boolean;
}

declare module "fastify" {
  interface FastifyRequest {
    /** The authenticated caller, set by the authn hook. */
    principal: Principal;
  }
}

const JobIdParams = T.Object({ id: T.String({ pattern: "^[A-Za-z0-9._-]{1,128}$" }) });
const JobStates = ["Pending", "Queued", "Running", "Completed", "Failed", "Stopped"] as const;
const ListQuery = T.Object(
  {
    state: T.Optional(T.Union(JobStates.map((s) => T.Literal(s)))),
    limit: T.Optional(T.Integer({ minimum: 1, maximum: 10_000 })),
    next_token: T.Optional(T.String({ pattern: PAGE_TOKEN_PATTERN })),
    /** `key=value`, repeatable: only jobs with every such label. */
    label: T.Optional(
      T.Array(T.String({ pattern: `^${JOB_LABEL_KEY}=.{0,${MAX_JOB_LABEL_VALUE}}$` }), { maxItems: 16 }),
    ),
  },
  { additionalProperties: false },
);
/** `key=value` pairs (the schema checked each holds a `=`) as a label map. */
function labelMap(pairs: readonly string[]): Record<string, string> {
  return Object.fromEntries(pairs.map((p) => [p.slice(0, p.indexOf("=")), p.slice(p.indexOf("=") + 1)]));
}

const FollowQuery = T.Object({ follow: T.Optional(T.Boolean()) }, { additionalProperties: false });
const SubmitBody = T.Object(
  { Job: T.Object({}, { additionalProperties: true }) },
  { additionalProperties: false },
);
const StopBody = T.Union([
  T.Object({ Reason: T.Optional(T.String({ maxLength: 1024 })) }, { additionalProperties: false }),
  T.Null(),
]);

/** The error body every failure answers with. */
export interface ApiErrorBody {
  error: { code: string; message: string; fix?: string; field?: string };
}

function errorReply(thrown: unknown): { status: number; body: ApiErrorBody } {
  // The broker or JetStream did not answer (a timeout, a lost quorum): the caller may retry.
  const err = isStoreFailure(thrown)
    ? storeUnavailable(`the state store failed: ${(thrown as Error).message}`, thrown)
    : thrown;
  const e = err as FastifyError & { status?: number; field?: string; fix?: string };
  if (e.validation) {
    const v = e.validation[0];
    const where = (v?.instancePath ?? "").replace(/^\//, "").replaceAll("/", ".");
    const field =
      v?.keyword === "additionalProperties"
        ? [where, String((v.params as { additionalProperty?: string }).additionalProperty)]
            .filter(Boolean)
            .join(".")
        : v?.keyword === "required"
          ? [where, String((v.params as { missingProperty?: string }).missingProperty)]
              .filter(Boolean)
              .join(".")
          : where;
    return {
      status: 400,
      body: {
        error: {
          code: ORCHESTRATOR_CODES.SHOAL_ORCH_REQUEST_INVALID,
          message: `${e.validationContext ?? "request"}${field ? ` ${field}` : ""}: ${v?.message ?? e.message}`,
          fix: "correct the request; docs/api.md describes every endpoint",
          field,
        },
      },
    };
  }
  if (isShoalError(err)) {
    const status = typeof e.status === "number" ? e.status : "field" in e ? 400 : 500;
    return {
      status,
      body: { error: { code: err.code, message: err.message, fix: err.fix, field: e.field } },
    };
  }
  if (typeof e.statusCode === "number" && e.statusCode >= 400 && e.statusCode < 500) {
    return {
      status: e.statusCode,
      body: {
        error: {
          code: ORCHESTRATOR_CODES.SHOAL_ORCH_REQUEST_INVALID,
          message: e.message,
          fix: "correct the request; docs/api.md describes every endpoint",
        },
      },
    };
  }
  return {
    status: 500,
    body: { error: { code: "SHOAL_INTERNAL", message: "internal error", fix: "report it with the log" } },
  };
}

/**
 * Closes a new connection at once when its address already holds `max` open
 * (as Nomad's `http_max_conns_per_client`): one client cannot take all the
 * connections, memory and descriptors the API has, whatever its requests.
 */
function limitConnsPerClient(server: HttpsServer, max: number, log: Logger): void {
  const open = new Tally();
  const complaints = new LogThrottle();
  server.on("connection", (socket: Socket) => {
    const address = clientKey(socket.remoteAddress ?? "");
    if (open.get(address) >= max) {
      complaints.warn(
        log,
        address,
        { client: address, max },
        "API connections from one address past API.MaxConnsPerClient: closed",
      );
      socket.destroy();
      return;
    }
    open.add(address);
    socket.once("close", () => open.remove(address));
  });
}

/** Resolves when `out` can take more again, or is closed. */
function room(out: PassThrough): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      out.off("drain", done);
      out.off("close", done);
      resolve();
    };
    out.on("drain", done);
    out.on("close", done);
  });
}

/** Streams objects as NDJSON until `end` is called or the client goes away. */
function ndjson(req: FastifyRequest, reply: FastifyReply) {
  const out = new PassThrough();
  let stop: () => void = () => {};
  req.raw.on("close", () => {
    stop();
    out.destroy();
  });
  reply.header("content-type", "application/x-ndjson").header("cache-control", "no-cache");
  return {
    stream: out,
    write: (obj: unknown) => out.write(`${JSON.stringify(obj)}\n`),
    end: () => out.end(),
    onClose: (fn: () => void) => {
      stop = fn;
    },
    /**
     * Sends each item as it comes, taking the next only when the client has
     * room for it, then ends. A failure cuts the response short (the client
     * sees it end without its final line) and rejects.
     */
    async sendAll(items: AsyncIterable<unknown>): Promise<void> {
      try {
        for await (const item of items) {
          if (out.destroyed) return;
          if (!out.write(`${JSON.stringify(item)}\n`)) await room(out);
        }
        out.end();
      } catch (err) {
        out.destroy();
        throw err;
      }
    },
  };
}

/**
 * The HTTPS API under /api/v1. Every request goes through the same pipeline:
 * `onRequest` authn (sets `req.principal`) → `preValidation` authz (Cedar)
 * → schema validation of params, query and body → a thin handler
 * that calls JobService / NodeService. Errors become
 * `{ error: { code, message, fix, field } }` with a 4xx/5xx status.
 */
export function buildApi(o: ApiOptions): FastifyInstance {
  const timeouts = { ...API_TIMEOUTS, ...o.timeouts };
  const app = Fastify({
    https: {
      handshakeTimeout: timeouts.handshakeMs,
      connectionsCheckingInterval: timeouts.checkMs,
      ...o.https,
    },
    requestTimeout: timeouts.requestMs,
    bodyLimit: o.bodyLimit ?? DEFAULT_BODY_LIMIT,
    // Per-request lines only for failures: the API is on the hot path of every job.
    loggerInstance: o.log.child({}, { level: o.log.levelVal > 40 ? o.log.level : "warn" }),
    // Unknown fields are errors, not silently dropped (fastify's default drops them).
    ajv: { customOptions: { removeAdditional: false, coerceTypes: "array" } },
  }) as unknown as FastifyInstance;
  const server = app.server as unknown as HttpsServer;
  server.headersTimeout = timeouts.headersMs;
  // Node's header timeout starts with a request's first byte: a connection that sends none
  // is cut off after the same time, unless a request comes (whose response may then stream
  // for hours; after it, keep-alive's own timeout takes over).
  server.on("secureConnection", (socket: TLSSocket) => socket.setTimeout(timeouts.headersMs));
  server.on("request", (req: IncomingMessage) => req.socket.setTimeout(0));
  const perClient = o.maxConnsPerClient ?? 100;
  if (perClient > 0) limitConnsPerClient(server, perClient, o.log);

  // An empty body with a JSON content type (DELETE, POST .../approve) is no body, not an error.
  const parseJson = app.getDefaultJsonParser("error", "error");
  app.removeContentTypeParser("application/json");
  app.addContentTypeParser("application/json", { parseAs: "string" }, (req, body, done) => {
    if (body === "") done(null, undefined);
    else parseJson(req, body as string, done);
  });

  app.decorateRequest("principal", null as unknown as Principal);
  if (o.security) o.security.install(app);
  else {
    app.addHook("onRequest", async (req) => {
      req.principal = ANONYMOUS_PRINCIPAL;
    });
  }

  const metrics = o.metrics;
  if (metrics) {
    app.addHook("onResponse", async (req, reply) => {
      const route = req.routeOptions.url ?? "unmatched";
      metrics.apiRequest(req.method, route, reply.statusCode, reply.elapsedTime / 1000);
    });
  }

  app.setErrorHandler((err, req, reply) => {
    const { status, body } = errorReply(err);
    if (status >= 500) req.log.error({ err }, "request failed");
    void reply.status(status).send(body);
  });
  app.setNotFoundHandler((req, reply) => {
    void reply.status(404).send({
      error: {
        code: ORCHESTRATOR_CODES.SHOAL_ORCH_REQUEST_INVALID,
        message: `no route ${req.method} ${req.url.split("?")[0]}`,
        fix: "docs/api.md lists the endpoints",
      },
    } satisfies ApiErrorBody);
  });

  const v1 = "/api/v1";

  app.get(`${v1}/agent/alive`, async () => ({ Status: "OK" }));
  app.get(`${v1}/agent/version`, async () => ({ Version: o.version }));
  app.get(`${v1}/agent/node`, async () => o.nodeInfo());
  if (metrics) {
    app.get(`${v1}/agent/metrics`, async (_req, reply) => {
      const { contentType, text } = await metrics.render();
      return reply.header("content-type", contentType).send(text);
    });
  }
  app.get(`${v1}/pki/ca`, { config: PUBLIC_ROUTE }, async (_req, reply) =>
    reply.type("application/x-pem-file").send(o.caBundlePem()),
  );

  app.put(`${v1}/orchestrator/jobs`, { schema: { body: SubmitBody } }, async (req, reply) => {
    const p = req.principal;
    const spec = (req.body as { Job: Record<string, unknown> }).Job;
    // A job without a namespace goes to its submitter's, where the submitter can see it.
    const job = await o.jobs.submit(
      { ...spec, Namespace: spec.Namespace ?? p.namespace },
      { sub: p.id, namespace: p.namespace, method: p.method },
    );
    return reply.status(201).send({ JobID: job.ID, Job: job });
  });
  app.get(`${v1}/orchestrator/jobs`, { schema: { querystring: ListQuery } }, async (req) => {
    const q = req.query as {
      state?: (typeof JobStates)[number];
      limit?: number;
      next_token?: string;
      label?: string[];
    };
    const page = o.jobs.list({
      state: q.state,
      ...(q.label ? { labels: labelMap(q.label) } : {}),
      limit: q.limit ?? 100,
      ...(q.next_token ? { after: q.next_token } : {}),
      ...(o.security ? { visible: o.security.canReadJob(req) } : {}),
    });
    return page.next ? { Items: page.items, NextToken: page.next } : { Items: page.items };
  });
  app.get(`${v1}/orchestrator/jobs/:id`, { schema: { params: JobIdParams } }, async (req) => ({
    Job: o.jobs.get((req.params as { id: string }).id),
  }));
  app.delete(`${v1}/orchestrator/jobs/:id`, { schema: { params: JobIdParams } }, async (req) => {
    const job = await o.jobs.stop((req.params as { id: string }).id);
    return { JobID: job.ID, State: job.State, Job: job };
  });
  app.post(
    `${v1}/orchestrator/jobs/:id/stop`,
    { schema: { params: JobIdParams, body: StopBody } },
    async (req) => {
      const reason = (req.body as { Reason?: string } | null)?.Reason;
      const job = await o.jobs.stop((req.params as { id: string }).id, reason);
      return { JobID: job.ID, State: job.State, Job: job };
    },
  );
  app.get(`${v1}/orchestrator/jobs/:id/executions`, { schema: { params: JobIdParams } }, async (req) => ({
    Items: o.jobs.executions((req.params as { id: string }).id),
  }));

  // With ?follow=true the history streams as NDJSON until the job is final,
  // then one last line {"Job": ...}: this is what `job run --wait` watches.
  app.get(
    `${v1}/orchestrator/jobs/:id/history`,
    { schema: { params: JobIdParams, querystring: FollowQuery } },
    async (req, reply) => {
      const id = (req.params as { id: string }).id;
      if (!(req.query as { follow?: boolean }).follow) return { Items: await o.jobs.history(id) };
      const s = ndjson(req, reply);
      s.onClose(
        o.jobs.follow(
          id,
          (event) => s.write({ Event: event }),
          (job) => {
            s.write({ Job: job });
            s.end();
          },
        ),
      );
      return reply.send(s.stream);
    },
  );

  app.get(
    `${v1}/orchestrator/jobs/:id/logs`,
    { schema: { params: JobIdParams, querystring: FollowQuery } },
    async (req, reply) => {
      const id = (req.params as { id: string }).id;
      const gone = new AbortController();
      const lines = (req.query as { follow?: boolean }).follow
        ? o.jobs.followLogs(id, gone.signal)
        : o.jobs.logs(id);
      const s = ndjson(req, reply);
      s.onClose(() => gone.abort());
      void s.sendAll(lines).catch((err) => req.log.error({ err, job: id }, "cannot stream the job's logs"));
      return reply.send(s.stream);
    },
  );

  app.get(`${v1}/orchestrator/jobs/:id/results`, { schema: { params: JobIdParams } }, async (req) => ({
    Items: o.jobs.results((req.params as { id: string }).id),
  }));
  app.get(
    `${v1}/orchestrator/jobs/:id/results/:execution/*`,
    {
      schema: {
        params: T.Object({ id: T.String(), execution: T.String(), "*": T.String({ minLength: 1 }) }),
      },
    },
    async (req, reply) => {
      const p = req.params as { id: string; execution: string; "*": string };
      const { file, stream } = await o.jobs.openResult(p.id, p.execution, p["*"]);
      return reply
        .type("application/octet-stream")
        .header("content-length", file.size)
        .header("x-shoal-sha256", file.sha256)
        .send(stream);
    },
  );

  const NodeIdParams = T.Object({ id: T.String({ pattern: "^[A-Za-z0-9._-]{1,128}$" }) });
  app.get(`${v1}/orchestrator/nodes`, async () => ({ Items: await o.nodes.list() }));
  app.get(`${v1}/orchestrator/nodes/:id`, { schema: { params: NodeIdParams } }, async (req) => ({
    Node: await o.nodes.get((req.params as { id: string }).id),
  }));
  // Labels only for an enrollment request (as a join token would give them); a registered node's come from the node.
  const ApproveBody = T.Union([
    T.Object({ Labels: T.Optional(NodeLabelsSchema) }, { additionalProperties: false }),
    T.Null(),
  ]);
  app.post(
    `${v1}/orchestrator/nodes/:id/approve`,
    { schema: { params: NodeIdParams, body: ApproveBody } },
    async (req) => ({
      Node: await o.nodes.approve(
        (req.params as { id: string }).id,
        req.principal.id,
        (req.body as { Labels?: Record<string, string> } | null)?.Labels,
      ),
    }),
  );
  app.post(`${v1}/orchestrator/nodes/:id/reject`, { schema: { params: NodeIdParams } }, async (req) => ({
    Node: await o.nodes.reject((req.params as { id: string }).id, req.principal.id),
  }));
  app.delete(`${v1}/orchestrator/nodes/:id`, { schema: { params: NodeIdParams } }, async (req) => {
    const id = (req.params as { id: string }).id;
    await o.nodes.delete(id);
    return { NodeID: id, Deleted: true };
  });

  for (const register of o.routes ?? []) register(app);
  return app;
}
