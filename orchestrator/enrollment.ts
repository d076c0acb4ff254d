import { isShoalError, type Logger, ShoalError } from "../core/index.js";
import {
  createJoinToken,
  type InventoryFile,
  type IssuedCertificate,
  isValidId,
  type JoinTokenView,
  listJoinTokens,
  PKI_CODES,
  type Pki,
  redeemJoinToken,
  revokeJoinToken,
  spiffeId,
  statusAt,
} from "../pki/index.js";
import { nodeNotFound, ORCHESTRATOR_CODES, OrchestratorError } from "./errors.js";
import { csrKeyFingerprint, type PendingEnrollment, type PendingEnrollments } from "./pending-enrollments.js";

function checkNodeId(nodeId: string): void {
  if (!isValidId(nodeId)) {
    throw new OrchestratorError(
      ORCHESTRATOR_CODES.SHOAL_ORCH_REQUEST_INVALID,
      `node id ${JSON.stringify(nodeId)} is not valid`,
      400,
      {
        fix: "ids are 1-63 characters of a-z 0-9 - _, starting with a letter or digit",
        field: "NodeID",
      },
    );
  }
}

/** What a node sends to `POST /api/v1/enroll`. */
export interface EnrollRequest {
  /** The join token, `shoal1.<id>.<secret>`; without one the request waits for an operator (PENDING). */
  token?: string;
  /** PKCS#10 PEM made with the node's own key; only its public key is used. */
  csrPem: string;
  /** The id the node asks for: it becomes `spiffe://<td>/compute/<id>`. */
  nodeId: string;
  /** The client's address, recorded with a request that waits for approval. */
  address?: string;
}

/** What enrollment gives back: the node's chain and the CA to trust. */
export interface EnrollResult {
  nodeId: string;
  spiffeId: string;
  /** Leaf then issuing CA. */
  certPem: string;
  /** The fabric root CA (what the node pinned). */
  caPem: string;
  /** The token's labels: the node's labels from now on. */
  labels: Record<string, string>;
  notAfter: Date;
  serial: string;
  /** Which join token enrolled it (its id, never the secret); none when an operator approved it. */
  tokenId?: string;
}

/** A request without a token that still waits for `shoal node approve`. */
export interface EnrollPending {
  pending: PendingEnrollment;
}

/** A refusal the API answers with its own code and this HTTP status. */
export class EnrollmentRefused extends ShoalError {
  constructor(
    readonly status: number,
    cause: ShoalError,
  ) {
    super(cause.code, cause.message, { cause, fix: cause.fix });
  }
}

/** HTTP statuses of the PKI's refusals: bad input is 400, a token that does not admit the node 401/403. */
const REFUSAL_STATUS: Record<string, number> = {
  [PKI_CODES.SHOAL_PKI_JOIN_TOKEN_INVALID]: 401,
  [PKI_CODES.SHOAL_PKI_JOIN_TOKEN_EXPIRED]: 403,
  [PKI_CODES.SHOAL_PKI_JOIN_TOKEN_USED]: 403,
  [PKI_CODES.SHOAL_PKI_JOIN_TOKEN_REVOKED]: 403,
  [PKI_CODES.SHOAL_PKI_IDENTITY_REVOKED]: 403,
  [PKI_CODES.SHOAL_PKI_JOIN_TOKEN_USES]: 400,
  [PKI_CODES.SHOAL_PKI_BAD_CSR]: 400,
  [PKI_CODES.SHOAL_PKI_BAD_PEM]: 400,
  [PKI_CODES.SHOAL_PKI_UNSUPPORTED_KEY]: 400,
  [PKI_CODES.SHOAL_PKI_BAD_ID]: 400,
  [PKI_CODES.SHOAL_PKI_VALIDITY]: 400,
};

function refusal(err: unknown): unknown {
  if (isShoalError(err) && !(err instanceof OrchestratorError) && REFUSAL_STATUS[err.code]) {
    return new EnrollmentRefused(REFUSAL_STATUS[err.code]!, err);
  }
  return err;
}

function idTaken(id: string, why: string): OrchestratorError {
  return new OrchestratorError(
    ORCHESTRATOR_CODES.SHOAL_ORCH_NODE_ID_TAKEN,
    `node id ${id} is already held by another live node (${why})`,
    409,
    {
      fix: `enroll with another id (--id), or retire the old node first (\`shoal node delete ${id}\` / \`shoal pki revoke SERIAL\`)`,
      field: "NodeID",
    },
  );
}

/**
 * Signs a compute node's CSR for `spiffe://<td>/compute/<id>` and records it
 * in the PKI inventory (which the orchestrator's inventory watcher turns into
 * a broker user). The CA decides names, usages and validity (`ttlMs`,
 * `PKI.CertTTL`); the CSR contributes only its public key, after its
 * signature is checked. With `exclusive`, the signing is refused
 * (SHOAL_ORCH_NODE_ID_TAKEN) while another certificate for that id is valid
 * — checked under the inventory lock, so two concurrent enrollments cannot
 * both take one id. Renewal (same node, new key) passes `exclusive: false`.
 */
export async function signComputeCsr(
  pki: Pki,
  csrPem: string,
  id: string,
  opts: { ttlMs: number; exclusive: boolean; now?: Date },
): Promise<IssuedCertificate> {
  const now = opts.now ?? new Date();
  const precondition = opts.exclusive
    ? (inv: InventoryFile) => {
        const live = inv.certificates.find(
          (e) => e.role === "compute" && e.id === id && statusAt(e, now) === "valid",
        );
        if (live) {
          throw idTaken(id, `certificate ${live.serial} valid until ${live.notAfter.toISOString()}`);
        }
      }
    : undefined;
  // notAfter from now, not from the backdated notBefore: `days` would cut 5 minutes off
  // every certificate, and a TTL under 5 minutes would be born expired.
  const notAfter = new Date(now.getTime() + opts.ttlMs);
  return pki.signCsr(csrPem, { role: "compute", id, notAfter }, { precondition });
}

export interface EnrollmentServiceOptions {
  pki: Pki;
  /** `PKI.CertTTL` in ms: the lifetime of an enrolled node's certificate. */
  certTtlMs: number;
  /** `Orchestrator.NodeManager.Identities`: SPIFFE ids held by certificates from another CA. */
  externalIdentities: readonly string[];
  /** Where requests without a token wait for an operator; without it a token is required. */
  pending?: PendingEnrollments;
  /**
   * Awaited after a certificate is issued, before it is handed out: the
   * daemon applies the inventory to the broker here, so a supervised
   * nats-server admits the node before the node can dial it. A failure is
   * logged, not thrown (the certificate exists; the inventory watcher retries).
   */
  onIssued?: () => Promise<void>;
  log: Logger;
}

/**
 * Zero-touch enrollment: a join token plus a CSR become a compute identity.
 * The token is checked and its use recorded under the token file's lock with
 * the signing inside, so a single-use token enrolls exactly one node however
 * many ask at once, and a refused enrollment (taken id, bad CSR) spends
 * nothing. Also the admin side of join tokens (create, list, revoke).
 */
export class EnrollmentService {
  readonly #o: EnrollmentServiceOptions;

  constructor(options: EnrollmentServiceOptions) {
    this.#o = options;
  }

  /**
   * A token enrolls at once; without one the request is recorded and waits
   * (`{ pending }`) until an operator approves — then the same request (a CSR
   * of the same key) gets the certificate — or rejects it
   * (SHOAL_ORCH_ENROLL_REJECTED).
   */
  async enroll(req: EnrollRequest): Promise<EnrollResult | EnrollPending> {
    const { pki } = this.#o;
    checkNodeId(req.nodeId);
    if (req.token === undefined) return this.#enrollWithoutToken(req);
    const token = req.token;
    const id = spiffeId(pki.trustDomain, "compute", req.nodeId);
    try {
      const {
        id: tokenId,
        labels,
        result: issued,
      } = await redeemJoinToken(pki.dir, token, {
        nodeId: req.nodeId,
        use: () => this.#sign(req.csrPem, req.nodeId),
      });
      this.#o.log.info(
        { node: req.nodeId, serial: issued.serial, tokenId, notAfter: issued.notAfter },
        "node enrolled",
      );
      await this.#issued(req.nodeId);
      return {
        nodeId: req.nodeId,
        spiffeId: id,
        certPem: issued.certPem,
        caPem: pki.caCertPem,
        labels,
        notAfter: issued.notAfter,
        serial: issued.serial,
        tokenId,
      };
    } catch (err) {
      if (isShoalError(err)) {
        this.#o.log.warn({ node: req.nodeId, code: err.code, reason: err.message }, "enrollment refused");
      }
      throw refusal(err);
    }
  }

  async #issued(nodeId: string): Promise<void> {
    await this.#o
      .onIssued?.()
      .catch((err: unknown) =>
        this.#o.log.warn({ node: nodeId, err }, "cannot apply the new identity to the broker yet"),
      );
  }

  /** Signs a new node's CSR, unless the id is declared elsewhere or held by a live certificate. */
  #sign(csrPem: string, nodeId: string): Promise<IssuedCertificate> {
    if (this.#o.externalIdentities.includes(spiffeId(this.#o.pki.trustDomain, "compute", nodeId))) {
      throw idTaken(nodeId, "declared in Orchestrator.NodeManager.Identities");
    }
    return signComputeCsr(this.#o.pki, csrPem, nodeId, { ttlMs: this.#o.certTtlMs, exclusive: true });
  }

  async #enrollWithoutToken(req: EnrollRequest): Promise<EnrollResult | EnrollPending> {
    const pending = this.#o.pending;
    if (!pending) {
      throw new OrchestratorError(
        ORCHESTRATOR_CODES.SHOAL_ORCH_REQUEST_INVALID,
        "this orchestrator enrolls only with a join token",
        400,
        { fix: "give --join TOKEN (from `shoal pki join-token create`)", field: "Token" },
      );
    }
    try {
      // The CSR's signature proves the caller holds the key; the entry is bound to that key.
      const keyFingerprint = csrKeyFingerprint(req.csrPem);
      if (this.#o.externalIdentities.includes(spiffeId(this.#o.pki.trustDomain, "compute", req.nodeId))) {
        throw idTaken(req.nodeId, "declared in Orchestrator.NodeManager.Identities");
      }
      const entry = await pending.request({
        nodeId: req.nodeId,
        csrPem: req.csrPem,
        keyFingerprint,
        address: req.address ?? "unknown",
      });
      if (entry.State === "REJECTED") {
        throw new OrchestratorError(
          ORCHESTRATOR_CODES.SHOAL_ORCH_ENROLL_REJECTED,
          `an operator rejected the enrollment of ${req.nodeId}${entry.DecidedBy ? ` (${entry.DecidedBy})` : ""}`,
          403,
          { fix: "ask the cluster's operator for a join token, or to approve a new request" },
        );
      }
      if (entry.State === "PENDING") {
        this.#o.log.info(
          { node: req.nodeId, keyFingerprint, address: entry.Address },
          "enrollment waits for approval",
        );
        return { pending: entry };
      }
      return {
        nodeId: req.nodeId,
        spiffeId: spiffeId(this.#o.pki.trustDomain, "compute", req.nodeId),
        certPem: entry.Certificate!,
        caPem: this.#o.pki.caCertPem,
        labels: entry.Labels ?? {},
        notAfter: new Date(entry.NotAfter!),
        serial: entry.Serial!,
      };
    } catch (err) {
      if (isShoalError(err)) {
        this.#o.log.warn({ node: req.nodeId, code: err.code, reason: err.message }, "enrollment refused");
      }
      throw refusal(err);
    }
  }

  /** Enrollment requests without a token (waiting, or decided and not yet expired). */
  listPending(): Promise<PendingEnrollment[]> {
    return this.#o.pending?.list() ?? Promise.resolve([]);
  }

  async getPending(nodeId: string): Promise<PendingEnrollment | undefined> {
    return this.#o.pending?.get(nodeId);
  }

  /**
   * `shoal node approve [--label k=v]...` of a waiting request: signs its CSR
   * and keeps `labels` with it; the node fetches both (labels as a join token's).
   */
  async approvePending(
    nodeId: string,
    by: string,
    labels: Record<string, string> = {},
  ): Promise<PendingEnrollment> {
    const decided = await this.#requirePending(nodeId).decide(nodeId, async (entry) => {
      const issued = await this.#sign(entry.CSR, nodeId).catch((err: unknown) => {
        throw refusal(err);
      });
      return {
        ...entry,
        State: "APPROVED",
        DecidedAt: new Date().toISOString(),
        DecidedBy: by,
        Certificate: issued.certPem,
        Serial: issued.serial,
        NotAfter: issued.notAfter.toISOString(),
        Labels: { ...labels },
      };
    });
    this.#o.log.info({ node: nodeId, serial: decided.Serial, by, labels }, "enrollment approved");
    await this.#issued(nodeId);
    return decided;
  }

  /** `shoal node reject` of a waiting request: nothing is issued, and the node is told so. */
  async rejectPending(nodeId: string, by: string): Promise<PendingEnrollment> {
    const decided = await this.#requirePending(nodeId).decide(nodeId, async (entry) => ({
      ...entry,
      State: "REJECTED",
      DecidedAt: new Date().toISOString(),
      DecidedBy: by,
    }));
    this.#o.log.info({ node: nodeId, by }, "enrollment rejected");
    return decided;
  }

  #requirePending(nodeId: string): PendingEnrollments {
    if (!this.#o.pending) throw nodeNotFound(nodeId);
    return this.#o.pending;
  }

  async createToken(opts: {
    ttlMs: number;
    uses: number;
    labels: Record<string, string>;
  }): Promise<Awaited<ReturnType<typeof createJoinToken>> & { caFingerprint: string }> {
    try {
      const created = await createJoinToken(this.#o.pki.dir, opts);
      return { ...created, caFingerprint: this.#o.pki.rootFingerprint };
    } catch (err) {
      throw refusal(err);
    }
  }

  listTokens(): Promise<JoinTokenView[]> {
    return listJoinTokens(this.#o.pki.dir);
  }

  async revokeToken(id: string): Promise<JoinTokenView> {
    try {
      return await revokeJoinToken(this.#o.pki.dir, id);
    } catch (err) {
      if (isShoalError(err, PKI_CODES.SHOAL_PKI_JOIN_TOKEN_INVALID)) throw new EnrollmentRefused(404, err);
      throw refusal(err);
    }
  }
}
