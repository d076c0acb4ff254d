import { createHash, createPublicKey, type KeyObject, randomBytes, sign, verify } from "node:crypto";
import { AUTH_CODES, AuthError } from "./errors.js";
import type { AuthStore } from "./store.js";

/** A nonce lives this long before it must be used. @default 60_000 */
export const DEFAULT_NONCE_TTL_MS = 60_000;
/** Smallest RSA client key accepted. */
const MIN_RSA_BITS = 2048;

/** What the server hands out: sign {@link challengePayload} of it with the client key. */
export interface ClientKeyChallenge {
  nonce: string;
  audience: string;
  /** Unix milliseconds. */
  expiresAt: number;
}

/** What the client sends back. */
export interface ClientKeyResponse {
  nonce: string;
  /** The client's public key, SPKI PEM. */
  publicKey: string;
  /** base64url signature over {@link challengePayload}. */
  signature: string;
}

/**
 * The exact bytes a client signs: a fixed context string, the API audience,
 * the nonce and the client id. Binding the audience and the key into the
 * signed text means a captured signature is useless on another API, with
 * another key, or (the nonce being single-use) a second time.
 */
export function challengePayload(challenge: { nonce: string; audience: string }, clientId: string): Buffer {
  return Buffer.from(`shoal-client-key-v1\n${challenge.audience}\n${challenge.nonce}\n${clientId}\n`, "utf8");
}

/** A client's id: hex SHA-256 of its public key's DER SubjectPublicKeyInfo (like Bacalhau's client id). */
export function clientIdOf(publicKey: KeyObject | string): string {
  const key =
    typeof publicKey === "string" || publicKey.type === "private" ? createPublicKey(publicKey) : publicKey;
  return createHash("sha256")
    .update(key.export({ type: "spki", format: "der" }))
    .digest("hex");
}

/** Client side: signs a challenge with `~/.shoal/user_id.pem` (RSA ≥ 2048, EC P-256/P-384 or Ed25519). */
export function answerChallenge(challenge: ClientKeyChallenge, privateKey: KeyObject): ClientKeyResponse {
  const publicKey = createPublicKey(privateKey);
  const payload = challengePayload(challenge, clientIdOf(publicKey));
  return {
    nonce: challenge.nonce,
    publicKey: publicKey.export({ type: "spki", format: "pem" }).toString(),
    signature: sign(digestFor(publicKey), payload, privateKey).toString("base64url"),
  };
}

/**
 * Server side of the client-key method: issues single-use nonces (kept in the
 * {@link AuthStore} so any orchestrator can check them) and verifies answers.
 */
export class ClientKeyVerifier {
  readonly #store: AuthStore;
  readonly #audience: string;
  readonly #ttl: number;
  readonly #now: () => number;

  constructor(options: { store: AuthStore; audience: string; nonceTtlMs?: number; now?: () => number }) {
    this.#store = options.store;
    this.#audience = options.audience;
    this.#ttl = options.nonceTtlMs ?? DEFAULT_NONCE_TTL_MS;
    this.#now = options.now ?? Date.now;
  }

  /** Issues a nonce; with `clientId` (the caller's key, if it says) the nonce is good for that key only. */
  async challenge(options: { clientId?: string } = {}): Promise<ClientKeyChallenge> {
    const nonce = randomBytes(32).toString("base64url");
    const expiresAt = this.#now() + this.#ttl;
    await this.#store.nonces.put(nonce, {
      expiresAt,
      audience: this.#audience,
      ...(options.clientId === undefined ? {} : { clientId: options.clientId }),
    });
    return { nonce, audience: this.#audience, expiresAt };
  }

  /**
   * Consumes the nonce (whatever the outcome, so a failed try cannot be
   * retried against it) and checks the signature. Returns the client id.
   */
  async verify(response: ClientKeyResponse): Promise<string> {
    const record =
      typeof response.nonce === "string" ? await this.#store.nonces.take(response.nonce) : undefined;
    if (!record || record.audience !== this.#audience) {
      throw new AuthError(
        AUTH_CODES.SHOAL_AUTH_CHALLENGE_INVALID,
        "unknown or already used client-key nonce",
        {
          fix: "ask for a fresh challenge and sign it once",
        },
      );
    }
    if (record.expiresAt <= this.#now()) {
      throw new AuthError(AUTH_CODES.SHOAL_AUTH_CHALLENGE_EXPIRED, "client-key nonce has expired", {
        fix: `ask for a fresh challenge and answer it within ${Math.round(this.#ttl / 1000)} s`,
      });
    }
    const publicKey = parseClientKey(response.publicKey);
    const clientId = clientIdOf(publicKey);
    if (record.clientId !== undefined && record.clientId !== clientId) {
      throw new AuthError(
        AUTH_CODES.SHOAL_AUTH_CHALLENGE_INVALID,
        "client-key nonce was issued for another key",
        {
          fix: "ask for a challenge with this key's client id",
        },
      );
    }
    const payload = challengePayload({ nonce: response.nonce, audience: this.#audience }, clientId);
    let ok = false;
    try {
      ok =
        typeof response.signature === "string" &&
        verify(digestFor(publicKey), payload, publicKey, Buffer.from(response.signature, "base64url"));
    } catch {
      ok = false;
    }
    if (!ok) {
      throw new AuthError(AUTH_CODES.SHOAL_AUTH_SIGNATURE_INVALID, "client-key signature does not verify", {
        fix: "sign the challenge with the private key matching the public key sent",
      });
    }
    return clientId;
  }

  /** Deletes nonces that expired unused (the KV implementation may use a bucket TTL instead). */
  async prune(): Promise<number> {
    const now = this.#now();
    let removed = 0;
    for (const [nonce, record] of await this.#store.nonces.list()) {
      if (record.expiresAt <= now) {
        await this.#store.nonces.delete(nonce);
        removed++;
      }
    }
    return removed;
  }
}

function parseClientKey(pem: unknown): KeyObject {
  let key: KeyObject;
  try {
    if (typeof pem !== "string") throw new TypeError("not a string");
    key = createPublicKey({ key: pem, format: "pem" });
  } catch (err) {
    throw new AuthError(AUTH_CODES.SHOAL_AUTH_KEY_UNSUPPORTED, "client public key is not a PEM public key", {
      cause: err,
      fix: "send the SPKI PEM of ~/.shoal/user_id.pem's public key",
    });
  }
  const type = key.asymmetricKeyType;
  const d = key.asymmetricKeyDetails;
  const ok =
    (type === "rsa" && (d?.modulusLength ?? 0) >= MIN_RSA_BITS) ||
    (type === "ec" && (d?.namedCurve === "prime256v1" || d?.namedCurve === "secp384r1")) ||
    type === "ed25519";
  if (!ok) {
    throw new AuthError(AUTH_CODES.SHOAL_AUTH_KEY_UNSUPPORTED, `client key type ${type} is not accepted`, {
      fix: `use an RSA (≥ ${MIN_RSA_BITS} bits), EC P-256/P-384 or Ed25519 key`,
    });
  }
  return key;
}

function digestFor(key: KeyObject): string | null {
  return key.asymmetricKeyType === "ed25519" ? null : "sha256";
}
