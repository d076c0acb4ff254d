import { Type as T } from "@sinclair/typebox";
import type { FastifyInstance } from "fastify";
import { NodeLabelsSchema, parseDuration } from "../core/index.js";
import { DEFAULT_JOIN_TOKEN_TTL_MS } from "../pki/index.js";
import { PUBLIC_ROUTE } from "./api.js";
import type { EnrollmentService } from "./enrollment.js";
import { ORCHESTRATOR_CODES, OrchestratorError } from "./errors.js";

/** Largest CSR accepted (an RSA-4096 CSR is under 2 KiB in PEM). */
const MAX_CSR_CHARS = 16 * 1024;

const EnrollBody = T.Object(
  {
    Token: T.Optional(T.String({ minLength: 1, maxLength: 256 })),
    CSR: T.String({ minLength: 1, maxLength: MAX_CSR_CHARS }),
    NodeID: T.String({ minLength: 1, maxLength: 63 }),
  },
  { additionalProperties: false },
);
const CreateTokenBody = T.Union([
  T.Object(
    {
      TTL: T.Optional(T.String({ maxLength: 32 })),
      Uses: T.Optional(T.Integer({ minimum: 1, maximum: 100_000 })),
      Labels: T.Optional(NodeLabelsSchema),
    },
    { additionalProperties: false },
  ),
  T.Null(),
]);
const TokenIdParams = T.Object({ id: T.String({ pattern: "^[0-9a-f]{16}$" }) });

/**
 * Enrollment and join-token routes under /api/v1:
 * - `POST enroll` (public: the join token is the credential) `{Token, CSR, NodeID}` →
 *   201 `{NodeID, SPIFFEID, Certificate, CA, Labels, NotAfter, Serial}`; without `Token`
 *   the request waits for an operator: 202 `{NodeID, Status: "PENDING", KeyFingerprint,
 *   RequestedAt}`, and the same request again (a CSR of the same key) gets the 201 once
 *   approved, 403 SHOAL_ORCH_ENROLL_REJECTED once rejected;
 * - `POST pki/join-tokens` `{TTL, Uses, Labels}` → 201 `{Token, ID, ExpiresAt, MaxUses, Labels, CAFingerprint}`;
 * - `GET pki/join-tokens` → `{Items}` (never secrets);
 * - `DELETE pki/join-tokens/{id}` → `{Token}` (revoked).
 * The join-token routes are for administrators: the authz hooks decide who.
 */
export function registerEnrollmentRoutes(app: FastifyInstance, enrollment: EnrollmentService): void {
  const v1 = "/api/v1";
  app.post(`${v1}/enroll`, { schema: { body: EnrollBody }, config: PUBLIC_ROUTE }, async (req, reply) => {
    const body = req.body as { Token?: string; CSR: string; NodeID: string };
    const r = await enrollment.enroll({
      ...(body.Token === undefined ? {} : { token: body.Token }),
      csrPem: body.CSR,
      nodeId: body.NodeID,
      address: req.ip,
    });
    if ("pending" in r) {
      return reply.status(202).send({
        NodeID: r.pending.NodeID,
        Status: r.pending.State,
        KeyFingerprint: r.pending.KeyFingerprint,
        RequestedAt: r.pending.RequestedAt,
      });
    }
    return reply.status(201).send({
      NodeID: r.nodeId,
      SPIFFEID: r.spiffeId,
      Certificate: r.certPem,
      CA: r.caPem,
      Labels: r.labels,
      NotAfter: r.notAfter.toISOString(),
      Serial: r.serial,
    });
  });

  app.post(`${v1}/pki/join-tokens`, { schema: { body: CreateTokenBody } }, async (req, reply) => {
    const body = (req.body ?? {}) as { TTL?: string; Uses?: number; Labels?: Record<string, string> };
    let ttlMs = DEFAULT_JOIN_TOKEN_TTL_MS;
    if (body.TTL !== undefined) {
      try {
        ttlMs = parseDuration(body.TTL);
      } catch (cause) {
        throw new OrchestratorError(
          ORCHESTRATOR_CODES.SHOAL_ORCH_REQUEST_INVALID,
          `TTL ${body.TTL} is not a duration`,
          400,
          { cause, fix: "give TTL like 30m, 1h or 24h", field: "TTL" },
        );
      }
    }
    const created = await enrollment.createToken({ ttlMs, uses: body.Uses ?? 1, labels: body.Labels ?? {} });
    return reply.status(201).send({
      Token: created.token,
      ID: created.id,
      ExpiresAt: created.expiresAt.toISOString(),
      MaxUses: created.maxUses,
      Labels: created.labels,
      CAFingerprint: created.caFingerprint,
    });
  });
  app.get(`${v1}/pki/join-tokens`, async () => ({ Items: await enrollment.listTokens() }));
  app.delete(`${v1}/pki/join-tokens/:id`, { schema: { params: TokenIdParams } }, async (req) => ({
    Token: await enrollment.revokeToken((req.params as { id: string }).id),
  }));
}
