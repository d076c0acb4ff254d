import { createPrivateKey, type KeyObject, randomBytes, sign, verify, X509Certificate } from "node:crypto";
import { parseSpiffeId } from "../pki/index.js";
import { EnvelopeError, FABRIC_CODES, type FabricCode } from "./errors.js";
import {
  algForKey,
  type EnvelopeAlg,
  type PeerCertificate,
  type PeerCertificateCache,
  x5tOf,
} from "./peer-cache.js";
import {
  BODY_SCHEMAS,
  describeInvalidBody,
  isValidBody,
  type MessageBody,
  type MessageKind,
} from "./protocol.js";
import type { ReplayGuard } from "./replay-guard.js";
import { type ParsedSubject, parseSubject } from "./subjects.js";
import { splitPem } from "./tls-diagnosis.js";

/** How long a signed envelope stays valid. @default 60 s */
export const DEFAULT_ENVELOPE_TTL_MS = 60_000;
/** Clock difference tolerated between sender and receiver. @default 30 s */
export const DEFAULT_CLOCK_SKEW_MS = 30_000;
/**
 * Longest lifetime a verifier accepts: twice what signers use. It bounds how long
 * an accepted id stays in the replay cache, and so how long a flood of signed
 * messages keeps its sender refused after it stops.
 */
export const MAX_ENVELOPE_TTL_MS = 120_000;
/** Largest envelope accepted, the broker's default max_payload. @default 1 MiB */
export const DEFAULT_MAX_ENVELOPE_BYTES = 1024 * 1024;

/**
 * Node's signing parameters per JWS alg (RFC 7518): ECDSA signatures in the JOSE
 * R||S form (`ieee-p1363`), RSA-PSS with MGF1 and a salt the size of the hash.
 */
const ALG_PARAMS: Record<EnvelopeAlg, { hash: string | null; options: Record<string, unknown> }> = {
  ES256: { hash: "sha256", options: { dsaEncoding: "ieee-p1363" } },
  ES384: { hash: "sha384", options: { dsaEncoding: "ieee-p1363" } },
  ES512: { hash: "sha512", options: { dsaEncoding: "ieee-p1363" } },
  PS256: { hash: "sha256", options: { padding: 6 /* RSA_PKCS1_PSS_PADDING */, saltLength: 32 } },
  EdDSA: { hash: null, options: {} },
};

/** The claims of every fabric envelope (DESIGN.md "Signed envelopes"). */
export interface EnvelopeClaims<K extends MessageKind = MessageKind> {
  readonly iss: string;
  readonly aud: string;
  readonly jti: string;
  /** Seconds since the epoch, as JWT. */
  readonly iat: number;
  readonly exp: number;
  readonly typ: K;
  readonly body: MessageBody<K>;
}

/** A verified envelope: who sent it (from the certificate), what, and the typed body. */
export interface VerifiedEnvelope<K extends MessageKind = MessageKind> {
  readonly iss: string;
  readonly aud: string;
  readonly jti: string;
  readonly iat: number;
  readonly exp: number;
  readonly kind: K;
  readonly body: MessageBody<K>;
  readonly sender: PeerCertificate;
}

/** The audience of a broadcast: every member of the trust domain. */
export function broadcastAudience(trustDomain: string): string {
  return `spiffe://${trustDomain}`;
}

export interface EnvelopeSignerOptions {
  /** PKCS#8 PEM of this daemon's TLS key. */
  readonly keyPem: string;
  /** This daemon's certificate file (leaf first). */
  readonly certPem: string;
  /** @default DEFAULT_ENVELOPE_TTL_MS */
  readonly ttlMs?: number;
  /** @default Date.now */
  readonly now?: () => number;
}

function b64json(value: unknown): string {
  return Buffer.from(JSON.stringify(value)).toString("base64url");
}

/**
 * Signs fabric messages as compact JWS with the daemon's TLS key; the header's
 * `x5t#S256` names the certificate so receivers find the key in their cache.
 *
 * The JWS is made with node:crypto's one-shot `sign()` in the JOSE signature
 * format rather than jose's `CompactSign`: jose 6 runs on WebCrypto, whose async
 * calls cost ~3x more per message here; test/fabric-envelope.test.ts proves the
 * tokens are interchangeable with jose in both directions.
 */
export class EnvelopeSigner {
  readonly identity: string;
  readonly x5t: string;
  readonly alg: EnvelopeAlg;
  readonly chainPem: string;
  readonly #key: KeyObject;
  readonly #header: string;
  readonly #ttlMs: number;
  readonly #now: () => number;

  constructor(o: EnvelopeSignerOptions) {
    const leafPem = splitPem(o.certPem)[0];
    const leaf = leafPem ? new X509Certificate(leafPem) : undefined;
    const key = createPrivateKey(o.keyPem);
    const alg = algForKey(key);
    const identity = leaf?.subjectAltName?.match(/URI:(spiffe:\/\/[^,\s]+)/)?.[1];
    if (!leaf || !alg || !leaf.checkPrivateKey(key) || !identity || !parseSpiffeId(identity)) {
      throw new EnvelopeError(
        FABRIC_CODES.SHOAL_ENVELOPE_SIGNER_KEY,
        "this key and certificate cannot sign fabric envelopes",
        {
          fix: "use the daemon's identity certificate and its own key (EC P-256/P-384 or RSA), as written by `shoal pki issue`",
        },
      );
    }
    this.#key = key;
    this.alg = alg;
    this.identity = identity;
    this.x5t = x5tOf(leaf.raw);
    this.chainPem = o.certPem;
    this.#header = b64json({ alg, "x5t#S256": this.x5t });
    this.#ttlMs = o.ttlMs ?? DEFAULT_ENVELOPE_TTL_MS;
    this.#now = o.now ?? Date.now;
  }

  /** A compact JWS carrying `body` of `kind` for `aud`. */
  sign<K extends MessageKind>(kind: K, aud: string, body: MessageBody<K>, ttlMs = this.#ttlMs): string {
    const now = this.#now();
    const claims: EnvelopeClaims<K> = {
      iss: this.identity,
      aud,
      jti: randomBytes(16).toString("base64url"),
      iat: Math.floor(now / 1000),
      exp: Math.ceil((now + ttlMs) / 1000),
      typ: kind,
      body,
    };
    const input = `${this.#header}.${b64json(claims)}`;
    const p = ALG_PARAMS[this.alg];
    const signature = sign(p.hash, Buffer.from(input), { key: this.#key, ...p.options });
    return `${input}.${signature.toString("base64url")}`;
  }
}

export interface EnvelopeVerifierOptions {
  /** This daemon's SPIFFE id: envelopes must be addressed to it (or to the trust domain, for broadcasts). */
  readonly identity: string;
  readonly peers: PeerCertificateCache;
  readonly replayGuard: ReplayGuard;
  /** @default DEFAULT_CLOCK_SKEW_MS */
  readonly clockSkewMs?: number;
  /** @default DEFAULT_MAX_ENVELOPE_BYTES */
  readonly maxBytes?: number;
  /** @default Date.now */
  readonly now?: () => number;
}

export interface VerifyEnvelopeOptions {
  /** The subject the message arrived on; decides which sender role and kind are allowed. */
  readonly subject: string;
  /** Overrides the expected `aud` (default: this verifier's identity). */
  readonly expectedAud?: string;
  /** For replies: the identity that was asked. */
  readonly expectedIss?: string;
}

function refuse(
  code: FabricCode,
  message: string,
  fix: string,
  details: Record<string, unknown> = {},
): never {
  throw new EnvelopeError(code, message, { fix, details });
}

const HEADER_CACHE_LIMIT = 10_000;
const SUBJECT_CACHE_LIMIT = 10_000;
const DOT = 0x2e;

/**
 * Where the signature and the claims of an envelope are base64url-decoded, one
 * after the other: a fixed buffer instead of a new one from Buffer's pool per
 * message, which kept ~400 bytes a message of short-lived ArrayBuffer memory
 * churning through the cache beside OpenSSL's tables. Holds segments of up to
 * 64 KiB of base64url; longer ones get their own buffer.
 */
const DECODE_SCRATCH = Buffer.allocUnsafeSlow(48 * 1024);

/**
 * The bytes of the base64url text `jws[start, end)`. When they are in
 * DECODE_SCRATCH they are valid only until the next call: use them at once.
 */
function decodeSegment(jws: Buffer, start: number, end: number): Buffer {
  const text = jws.toString("latin1", start, end);
  if (((end - start) * 3) / 4 > DECODE_SCRATCH.length) return Buffer.from(text, "base64url");
  return DECODE_SCRATCH.subarray(0, DECODE_SCRATCH.write(text, 0, "base64url"));
}

/**
 * Verifies fabric envelopes: size, form, sender certificate (by fingerprint, from
 * the cache), signature, `iss` against the certificate, validity, revocation, the
 * sender's role against the subject, `typ`, `aud`, `iat`/`exp` with clock skew,
 * the body schema, and finally the replay cache. Each failure throws an
 * {@link EnvelopeError} whose code names the check.
 */
export class EnvelopeVerifier {
  readonly identity: string;
  readonly #o: EnvelopeVerifierOptions;
  readonly #audiences: Set<string>;
  readonly #skew: number;
  readonly #now: () => number;
  /** Parsed protected headers by their base64url text: senders reuse one header. */
  readonly #headers = new Map<string, { alg: string; x5t: string }>();
  readonly #subjects = new Map<string, ParsedSubject>();
  /** The id part of this daemon's identity: replies must arrive on `_INBOX_<id>`. */
  readonly #id: string;

  constructor(o: EnvelopeVerifierOptions) {
    const me = parseSpiffeId(o.identity);
    if (!me) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_AUDIENCE,
        `${o.identity} is not a SPIFFE id`,
        "configure the verifier with this daemon's identity",
      );
    }
    this.identity = o.identity;
    this.#id = me.id;
    this.#o = o;
    this.#audiences = new Set([o.identity, broadcastAudience(me.trustDomain)]);
    this.#skew = o.clockSkewMs ?? DEFAULT_CLOCK_SKEW_MS;
    this.#now = o.now ?? Date.now;
  }

  /**
   * Verifies a compact JWS given as text or as the bytes it arrived in (a NATS
   * message's `data`: no UTF-8 decode of the whole token, and the signing input
   * is checked in place).
   */
  verify(token: string | Uint8Array, opts: VerifyEnvelopeOptions): VerifiedEnvelope {
    const jws =
      typeof token === "string"
        ? Buffer.from(token, "utf8")
        : Buffer.from(token.buffer, token.byteOffset, token.byteLength);
    const max = this.#o.maxBytes ?? DEFAULT_MAX_ENVELOPE_BYTES;
    if (jws.length > max) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_TOO_LARGE,
        `envelope of ${jws.length} bytes exceeds ${max}`,
        "chunk large payloads (results, logs) and sign their digests",
        { size: jws.length, max },
      );
    }
    const d1 = jws.indexOf(DOT);
    const d2 = jws.indexOf(DOT, d1 + 1);
    if (d1 <= 0 || d2 <= d1 + 1 || d2 === jws.length - 1 || jws.indexOf(DOT, d2 + 1) !== -1) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_MALFORMED,
        "not a compact JWS (header.payload.signature)",
        "send envelopes made by EnvelopeSigner",
      );
    }
    const header = this.#header(jws.toString("latin1", 0, d1));
    const sender = this.#o.peers.get(header.x5t);
    if (!sender) {
      if (this.#o.peers.isRevoked(header.x5t)) {
        refuse(
          FABRIC_CODES.SHOAL_ENVELOPE_REVOKED,
          "the sender's certificate is revoked",
          "the sender must be issued a new certificate",
          { x5t: header.x5t },
        );
      }
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_UNKNOWN_SENDER,
        `no verified certificate with fingerprint ${header.x5t}`,
        "the sender must present its chain first (register / register-reply)",
        { x5t: header.x5t },
      );
    }
    if (header.alg !== sender.alg) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_SIGNATURE,
        `alg ${header.alg} does not fit the sender's ${sender.alg} key`,
        "sign with EnvelopeSigner",
        { alg: header.alg },
      );
    }
    const p = ALG_PARAMS[sender.alg];
    const ok = verify(
      p.hash,
      jws.subarray(0, d2),
      { key: sender.publicKey, ...p.options },
      decodeSegment(jws, d2 + 1, jws.length),
    );
    if (!ok) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_SIGNATURE,
        `signature of an envelope from ${sender.identity} does not verify`,
        "the message was altered in transit or signed with another key; it is dropped",
        { sender: sender.identity },
      );
    }
    let claims: EnvelopeClaims;
    try {
      claims = JSON.parse(decodeSegment(jws, d1 + 1, d2).toString("utf8"));
    } catch {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_MALFORMED,
        "envelope payload is not JSON",
        "send envelopes made by EnvelopeSigner",
      );
    }
    if (
      typeof claims !== "object" ||
      claims === null ||
      typeof claims.iss !== "string" ||
      typeof claims.aud !== "string" ||
      typeof claims.jti !== "string" ||
      typeof claims.iat !== "number" ||
      typeof claims.exp !== "number" ||
      typeof claims.typ !== "string" ||
      claims.jti.length < 16 ||
      claims.jti.length > 64
    ) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_MALFORMED,
        "envelope claims are missing or of the wrong type",
        "send envelopes made by EnvelopeSigner",
      );
    }
    if (claims.iss !== sender.identity) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_ISSUER,
        `iss ${claims.iss} is not the certificate's identity ${sender.identity}`,
        "a node can only speak as the identity in its certificate",
        { iss: claims.iss, certificate: sender.identity },
      );
    }
    const now = this.#now();
    if (now < sender.notBefore - this.#skew || now >= sender.notAfter + this.#skew) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_SENDER_CERT,
        `the certificate of ${sender.identity} is outside its validity`,
        "the sender must renew its certificate",
        { notAfter: new Date(sender.notAfter).toISOString() },
      );
    }
    this.#checkSubject(opts, sender, claims.typ);
    if (!(claims.typ in BODY_SCHEMAS)) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_KIND,
        `unknown message kind ${claims.typ}`,
        "sender and receiver run incompatible Shoal versions",
        { typ: claims.typ },
      );
    }
    const expectedAud = opts.expectedAud;
    if (expectedAud ? claims.aud !== expectedAud : !this.#audiences.has(claims.aud)) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_AUDIENCE,
        `envelope is for ${claims.aud}, not ${expectedAud ?? this.identity}`,
        "it was sent to the wrong node; it is dropped",
        { aud: claims.aud },
      );
    }
    const iatMs = claims.iat * 1000;
    const expMs = claims.exp * 1000;
    if (expMs + this.#skew <= now) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_EXPIRED,
        `envelope from ${sender.identity} expired at ${new Date(expMs).toISOString()}`,
        "check both machines' clocks (NTP); stale messages are dropped",
        { exp: claims.exp },
      );
    }
    if (iatMs - this.#skew > now || expMs - iatMs > MAX_ENVELOPE_TTL_MS || expMs < iatMs) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_NOT_YET_VALID,
        `envelope from ${sender.identity} is dated ${new Date(iatMs).toISOString()} with a lifetime the verifier does not accept`,
        "check both machines' clocks (NTP)",
        { iat: claims.iat, exp: claims.exp },
      );
    }
    const kind = claims.typ as MessageKind;
    if (!isValidBody(kind, claims.body)) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_BODY_INVALID,
        `invalid ${kind} body from ${sender.identity}: ${describeInvalidBody(kind, claims.body)}`,
        "sender and receiver run incompatible Shoal versions, or the sender is faulty",
        { kind },
      );
    }
    const verdict = this.#o.replayGuard.check(sender.identity, claims.jti, expMs + this.#skew);
    if (verdict !== "fresh") {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_REPLAY,
        verdict === "replay"
          ? `envelope ${claims.jti} from ${sender.identity} was already accepted`
          : verdict === "issuer-full"
            ? `${sender.identity} has as many unexpired envelopes as one sender may (a flood); refusing its messages until they expire`
            : verdict === "over-share"
              ? `${sender.identity} holds more than its share of a crowded replay cache (a flood); refusing its messages until they expire`
              : "replay cache is full; refusing until entries expire",
        "replays are dropped; if this is not an attack, the sender retransmitted a signed message instead of signing anew",
        { jti: claims.jti, sender: sender.identity },
      );
    }
    return {
      iss: claims.iss,
      aud: claims.aud,
      jti: claims.jti,
      iat: claims.iat,
      exp: claims.exp,
      kind,
      body: claims.body,
      sender,
    };
  }

  #header(b64: string): { alg: string; x5t: string } {
    const hit = this.#headers.get(b64);
    if (hit) return hit;
    let h: Record<string, unknown>;
    try {
      h = JSON.parse(Buffer.from(b64, "base64url").toString("utf8"));
    } catch {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_MALFORMED,
        "envelope header is not JSON",
        "send envelopes made by EnvelopeSigner",
      );
    }
    const known = new Set(["alg", "x5t#S256"]);
    if (
      typeof h.alg !== "string" ||
      typeof h["x5t#S256"] !== "string" ||
      Object.keys(h).some((k) => !known.has(k))
    ) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_MALFORMED,
        "envelope header must hold exactly alg and x5t#S256",
        "send envelopes made by EnvelopeSigner",
      );
    }
    const parsed = { alg: h.alg, x5t: h["x5t#S256"] as string };
    if (this.#headers.size >= HEADER_CACHE_LIMIT) this.#headers.clear();
    this.#headers.set(b64, parsed);
    return parsed;
  }

  /**
   * `parseSubject` remembered for the fabric's fixed subjects (a node's `out.<kind>`,
   * `in`, broadcasts), which every message repeats; inbox subjects are one per
   * request and are parsed each time.
   */
  #subject(subject: string): ParsedSubject | undefined {
    const hit = this.#subjects.get(subject);
    if (hit) return hit;
    const parsed = parseSubject(subject);
    if (parsed && parsed.type !== "inbox") {
      if (this.#subjects.size >= SUBJECT_CACHE_LIMIT) this.#subjects.clear();
      this.#subjects.set(subject, parsed);
    }
    return parsed;
  }

  /** The sender's role and the message kind must fit the subject it arrived on. */
  #checkSubject(opts: VerifyEnvelopeOptions, sender: PeerCertificate, typ: string): void {
    const s = this.#subject(opts.subject);
    // The reason of a refusal, or the kind the subject carries; built only on failure.
    let why: string | undefined;
    let expected: string | undefined;
    if (!s) why = "not a fabric subject";
    else if (s.type === "compute-out") {
      if (sender.role !== "compute" || sender.id !== s.nodeId)
        why = `only compute ${s.nodeId} publishes there`;
      else if (typ !== s.kind) expected = s.kind;
    } else if (s.type === "compute-in") {
      if (sender.role !== "orchestrator") why = "only the orchestrator publishes there";
    } else if (s.type === "broadcast") {
      if (sender.role !== "orchestrator") why = "only the orchestrator broadcasts";
      else if (typ !== s.kind) expected = s.kind;
    } else if (s.owner !== this.#id) why = "a reply on another identity's inbox";
    else if (opts.expectedIss && opts.expectedIss !== sender.identity)
      why = `the request went to ${opts.expectedIss}`;
    if (why !== undefined) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_ROLE,
        `${sender.identity} may not send ${typ} on ${opts.subject}: ${why}`,
        "the message is dropped; a node speaks only on its own subjects",
        { subject: opts.subject, sender: sender.identity },
      );
    }
    if (expected !== undefined) {
      refuse(
        FABRIC_CODES.SHOAL_ENVELOPE_KIND,
        `${typ} arrived on ${opts.subject}, which carries ${expected}`,
        "the message is dropped",
        { subject: opts.subject, typ },
      );
    }
  }
}
