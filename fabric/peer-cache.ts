import { createHash, type KeyObject, X509Certificate } from "node:crypto";
import { type IdentityRole, parseSpiffeId, verifyCertificate } from "../pki/index.js";
import { EnvelopeError, FABRIC_CODES } from "./errors.js";
import { splitPem } from "./tls-diagnosis.js";

/** JWS algorithms Shoal signs with, one per key type. */
export type EnvelopeAlg = "ES256" | "ES384" | "ES512" | "PS256" | "EdDSA";

/** A peer's verified certificate, ready for per-message signature checks. */
export interface PeerCertificate {
  /** JWS `x5t#S256`: base64url SHA-256 of the leaf's DER. */
  readonly x5t: string;
  /** `sha256:<hex>` of the leaf's DER (the PKI's fingerprint form). */
  readonly fingerprint: string;
  readonly serial: string;
  readonly identity: string;
  readonly role: IdentityRole;
  readonly id: string;
  readonly trustDomain: string;
  readonly notBefore: number;
  readonly notAfter: number;
  /** Imported once; verifying with a KeyObject avoids re-parsing per message. */
  readonly publicKey: KeyObject;
  readonly alg: EnvelopeAlg;
  readonly chainPem: string;
}

/** The JWS algorithm for a key, or undefined when Shoal does not sign with that key type. */
export function algForKey(key: KeyObject): EnvelopeAlg | undefined {
  const d = key.asymmetricKeyDetails;
  switch (key.asymmetricKeyType) {
    case "ec":
      return d?.namedCurve === "prime256v1"
        ? "ES256"
        : d?.namedCurve === "secp384r1"
          ? "ES384"
          : d?.namedCurve === "secp521r1"
            ? "ES512"
            : undefined;
    case "rsa":
    case "rsa-pss":
      return "PS256";
    case "ed25519":
      return "EdDSA";
    default:
      return undefined;
  }
}

export function x5tOf(der: Uint8Array): string {
  return createHash("sha256").update(der).digest("base64url");
}

export interface PeerCertificateCacheOptions {
  /** The fabric CA (root PEM) every peer chain must lead to. */
  readonly caPem: string;
  /** Peers must be in this trust domain. */
  readonly trustDomain: string;
  /** @default 10000 */
  readonly maxEntries?: number;
  /** @default Date.now */
  readonly now?: () => number;
}

/**
 * Peers' certificates by fingerprint. `add()` runs full path validation once (the
 * compute node presents its chain when it registers; the orchestrator in its
 * register reply); afterwards a lookup is a Map get and the public key is already
 * imported, so verifying an envelope costs one signature check. Revocation
 * removes entries and refuses them from then on.
 */
export class PeerCertificateCache {
  readonly #byX5t = new Map<string, PeerCertificate>();
  readonly #revokedSerials = new Set<string>();
  readonly #revokedFingerprints = new Set<string>();
  readonly #o: PeerCertificateCacheOptions;
  readonly #now: () => number;

  constructor(options: PeerCertificateCacheOptions) {
    this.#o = options;
    this.#now = options.now ?? Date.now;
  }

  get size(): number {
    return this.#byX5t.size;
  }

  /** Verifies `chainPem` (leaf first) against the CA and caches it; throws EnvelopeError on failure. */
  add(chainPem: string): PeerCertificate {
    const leafPem = splitPem(chainPem)[0];
    if (!leafPem) {
      throw new EnvelopeError(
        FABRIC_CODES.SHOAL_ENVELOPE_SENDER_CERT,
        "the presented chain holds no certificate",
        {
          fix: "the sender must present its certificate file (leaf, then intermediate)",
        },
      );
    }
    const leaf = new X509Certificate(leafPem);
    const x5t = x5tOf(leaf.raw);
    const cached = this.#byX5t.get(x5t);
    if (cached && cached.notAfter > this.#now()) return cached;
    const fingerprint = `sha256:${Buffer.from(x5t, "base64url").toString("hex")}`;
    const serial = leaf.serialNumber.toLowerCase().replace(/^0+(?=.)/, "");
    if (this.#revokedSerials.has(serial) || this.#revokedFingerprints.has(fingerprint)) {
      throw new EnvelopeError(
        FABRIC_CODES.SHOAL_ENVELOPE_REVOKED,
        `certificate ${fingerprint} (serial ${serial}) is revoked`,
        {
          fix: "the sender must enroll again or be issued a new certificate",
          details: { fingerprint, serial },
        },
      );
    }
    const result = verifyCertificate(chainPem, {
      caPem: this.#o.caPem,
      trustDomain: this.#o.trustDomain,
      at: new Date(this.#now()),
    });
    const spiffe = result.leaf.spiffeId ? parseSpiffeId(result.leaf.spiffeId) : undefined;
    if (!result.ok || !spiffe || spiffe.role === "user") {
      const first = result.ok ? undefined : result.failures[0];
      throw new EnvelopeError(
        FABRIC_CODES.SHOAL_ENVELOPE_SENDER_CERT,
        `sender certificate ${result.leaf.spiffeId ?? result.leaf.subject} is not acceptable: ${first?.message ?? "it is not a compute or orchestrator identity"}`,
        {
          fix: first?.fix ?? "sign fabric messages with a compute or orchestrator certificate",
          details: { failures: result.ok ? [] : result.failures, fingerprint },
        },
      );
    }
    const alg = algForKey(leaf.publicKey);
    if (!alg) {
      throw new EnvelopeError(
        FABRIC_CODES.SHOAL_ENVELOPE_SENDER_CERT,
        `sender certificate key type ${leaf.publicKey.asymmetricKeyType} cannot sign envelopes`,
        {
          fix: "issue the certificate with an ecdsa-p256, ecdsa-p384 or rsa-3072 key",
        },
      );
    }
    const peer: PeerCertificate = {
      x5t,
      fingerprint,
      serial,
      identity: result.leaf.spiffeId as string,
      role: spiffe.role,
      id: spiffe.id,
      trustDomain: spiffe.trustDomain,
      notBefore: result.leaf.notBefore.getTime(),
      notAfter: result.leaf.notAfter.getTime(),
      publicKey: leaf.publicKey,
      alg,
      chainPem,
    };
    if (this.#byX5t.size >= (this.#o.maxEntries ?? 10_000)) this.#evictOne();
    this.#byX5t.set(x5t, peer);
    return peer;
  }

  /** O(1) lookup by the JWS `x5t#S256` header. */
  get(x5t: string): PeerCertificate | undefined {
    return this.#byX5t.get(x5t);
  }

  /** True if this fingerprint or serial was revoked (so a lookup miss can say "revoked"). */
  isRevoked(x5tOrFingerprint: string): boolean {
    const fp = x5tOrFingerprint.startsWith("sha256:")
      ? x5tOrFingerprint
      : `sha256:${Buffer.from(x5tOrFingerprint, "base64url").toString("hex")}`;
    return this.#revokedFingerprints.has(fp);
  }

  /**
   * Applies a revocation: serials and fingerprints are refused for good; an
   * identity (a deleted node) loses its cached certificates and must present
   * its chain again. Returns how many cached entries were removed.
   */
  revoke(r: {
    serials?: readonly string[];
    fingerprints?: readonly string[];
    identities?: readonly string[];
  }): number {
    for (const s of r.serials ?? [])
      this.#revokedSerials.add(
        s
          .toLowerCase()
          .replace(/[:\s]/g, "")
          .replace(/^0+(?=.)/, ""),
      );
    for (const f of r.fingerprints ?? []) this.#revokedFingerprints.add(f.toLowerCase());
    const identities = new Set(r.identities ?? []);
    let removed = 0;
    for (const [x5t, p] of this.#byX5t) {
      if (
        this.#revokedSerials.has(p.serial) ||
        this.#revokedFingerprints.has(p.fingerprint) ||
        identities.has(p.identity)
      ) {
        if (!identities.has(p.identity)) this.#revokedFingerprints.add(p.fingerprint);
        this.#byX5t.delete(x5t);
        removed++;
      }
    }
    return removed;
  }

  /** Drops an expired entry if any, else the oldest. */
  #evictOne(): void {
    const now = this.#now();
    for (const [x5t, p] of this.#byX5t) {
      if (p.notAfter <= now) {
        this.#byX5t.delete(x5t);
        return;
      }
    }
    const oldest = this.#byX5t.keys().next();
    if (!oldest.done) this.#byX5t.delete(oldest.value);
  }
}
