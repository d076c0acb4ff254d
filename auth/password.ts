import { randomBytes, scrypt, timingSafeEqual } from "node:crypto";
import { AUTH_CODES, AuthError } from "./errors.js";

/**
 * scrypt cost as log2(N). 17 (N = 131072, r = 8, p = 1, 128 MiB) is OWASP's
 * recommendation; about half a second per hash on a server core.
 * @default 17
 */
export const DEFAULT_SCRYPT_LOG_N = 17;
const R = 8;
const P = 1;
const SALT_BYTES = 16;
const HASH_BYTES = 32;
/** Refuse hashes that would make us burn more than this (a tampered user record could ask for any cost). */
const MAX_LOG_N = 20;
/** @default 12 */
export const MIN_PASSWORD_LENGTH = 12;

/** `$scrypt$ln=17,r=8,p=1$<salt, base64 no padding>$<hash, base64 no padding>` (PHC string format). */
const HASH_PATTERN =
  /^\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]{16,})\$([A-Za-z0-9+/]{43})$/;

export interface HashOptions {
  /** log2 of scrypt's N. @default DEFAULT_SCRYPT_LOG_N */
  logN?: number;
}

/** Refuses passwords shorter than {@link MIN_PASSWORD_LENGTH} characters. */
export function assertPasswordStrength(password: string): void {
  if ([...password].length < MIN_PASSWORD_LENGTH) {
    throw new AuthError(
      AUTH_CODES.SHOAL_AUTH_WEAK_PASSWORD,
      `password is shorter than ${MIN_PASSWORD_LENGTH} characters`,
      { fix: `choose a password of at least ${MIN_PASSWORD_LENGTH} characters (a passphrase is easiest)` },
    );
  }
}

/** Hashes a password with scrypt and a fresh 16-byte random salt. */
export async function hashPassword(password: string, options: HashOptions = {}): Promise<string> {
  const logN = options.logN ?? DEFAULT_SCRYPT_LOG_N;
  if (!Number.isInteger(logN) || logN < 14 || logN > MAX_LOG_N) {
    throw new RangeError(`scrypt logN must be an integer in 14..${MAX_LOG_N}`);
  }
  const salt = randomBytes(SALT_BYTES);
  const hash = await derive(password, salt, logN, R, P);
  return `$scrypt$ln=${logN},r=${R},p=${P}$${b64(salt)}$${b64(hash)}`;
}

/** True when `encoded` looks like a hash made by {@link hashPassword}. */
export function isPasswordHash(encoded: string): boolean {
  return parse(encoded) !== undefined;
}

/**
 * Checks a password against a stored hash in constant time (the comparison of
 * the derived keys; the derivation itself takes the same time for any
 * password). A malformed hash throws SHOAL_AUTH_PASSWORD_HASH.
 */
export async function verifyPassword(password: string, encoded: string): Promise<boolean> {
  const parsed = parse(encoded);
  if (!parsed) {
    throw new AuthError(
      AUTH_CODES.SHOAL_AUTH_PASSWORD_HASH,
      "stored password hash is not a Shoal scrypt hash",
      {
        fix: "set the password again (`shoal auth hash-password` makes a valid hash)",
      },
    );
  }
  const actual = await derive(password, parsed.salt, parsed.logN, parsed.r, parsed.p);
  return timingSafeEqual(actual, parsed.hash);
}

function parse(encoded: string) {
  const m = HASH_PATTERN.exec(encoded);
  if (!m) return undefined;
  const [logN, r, p] = [Number(m[1]), Number(m[2]), Number(m[3])];
  if (logN < 10 || logN > MAX_LOG_N || r < 1 || r > 16 || p < 1 || p > 4) return undefined;
  const salt = Buffer.from(m[4]!, "base64");
  const hash = Buffer.from(m[5]!, "base64");
  if (salt.length < SALT_BYTES || hash.length !== HASH_BYTES) return undefined;
  return { logN, r, p, salt, hash };
}

function derive(password: string, salt: Buffer, logN: number, r: number, p: number): Promise<Buffer> {
  const N = 2 ** logN;
  return new Promise((resolve, reject) => {
    scrypt(
      password.normalize("NFC"),
      salt,
      HASH_BYTES,
      { N, r, p, maxmem: 256 * N * r + 1024 * 1024 },
      (err, key) => (err ? reject(err) : resolve(key)),
    );
  });
}

function b64(buf: Buffer): string {
  return buf.toString("base64").replace(/=+$/, "");
}
