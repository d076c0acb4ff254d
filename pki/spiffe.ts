import { PKI_CODES, PkiError } from "./errors.js";

/** Roles a certificate can be issued for. `server` is a TLS server; the others are identities. */
export const ROLES = ["server", "orchestrator", "compute", "user"] as const;
export type Role = (typeof ROLES)[number];
/** Roles whose certificates carry only the URI SAN `spiffe://<td>/<role>/<id>`. */
export const IDENTITY_ROLES = ["orchestrator", "compute", "user"] as const;
export type IdentityRole = (typeof IDENTITY_ROLES)[number];

/** @default "shoal.local" */
export const DEFAULT_TRUST_DOMAIN = "shoal.local";

export function isRole(value: unknown): value is Role {
  return typeof value === "string" && (ROLES as readonly string[]).includes(value);
}

export function isIdentityRole(value: unknown): value is IdentityRole {
  return typeof value === "string" && (IDENTITY_ROLES as readonly string[]).includes(value);
}

export function assertRole(value: unknown): Role {
  if (!isRole(value)) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_UNKNOWN_ROLE, `unknown role ${JSON.stringify(value)}`, {
      fix: `use one of ${ROLES.join(", ")}`,
    });
  }
  return value;
}

/**
 * Ids name NATS subjects (`shoal.compute.<id>.in`) and inbox prefixes (`_INBOX_<id>.>`),
 * so they must not hold `.`, `*`, `>` or white space: lower-case letters, digits, `-`
 * and `_`, starting with a letter or digit, at most 63 characters.
 */
const ID_PATTERN = /^[a-z0-9][a-z0-9_-]{0,62}$/;

export function isValidId(id: string): boolean {
  return ID_PATTERN.test(id);
}

export function assertId(id: unknown, role: string): string {
  if (typeof id !== "string" || !isValidId(id)) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_ID, `invalid ${role} id ${JSON.stringify(id)}`, {
      fix: "use 1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit (no '.', '*', '>' or spaces)",
    });
  }
  return id;
}

/** Trust domains are DNS-like names (RFC 1123 labels, lower case). */
const TRUST_DOMAIN_PATTERN =
  /^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$/;

export function assertTrustDomain(td: unknown): string {
  if (typeof td !== "string" || !TRUST_DOMAIN_PATTERN.test(td)) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_NAME, `invalid trust domain ${JSON.stringify(td)}`, {
      fix: "use a lower-case DNS-style name such as shoal.local or prod.example.com",
    });
  }
  return td;
}

/** `spiffe://<trust-domain>/<role>/<id>`, after validating each part. */
export function spiffeId(trustDomain: string, role: IdentityRole, id: string): string {
  assertTrustDomain(trustDomain);
  if (!isIdentityRole(role)) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_UNKNOWN_ROLE, `${JSON.stringify(role)} has no SPIFFE id`, {
      fix: `use one of ${IDENTITY_ROLES.join(", ")}`,
    });
  }
  assertId(id, role);
  return `spiffe://${trustDomain}/${role}/${id}`;
}

/** Splits a Shoal SPIFFE id; undefined for anything that is not exactly `spiffe://td/role/id`. */
export function parseSpiffeId(
  uri: string,
): { trustDomain: string; role: IdentityRole; id: string } | undefined {
  const m = /^spiffe:\/\/([^/]+)\/([^/]+)\/([^/]+)$/.exec(uri);
  if (!m) return undefined;
  const [, trustDomain, role, id] = m as unknown as [string, string, string, string];
  if (!TRUST_DOMAIN_PATTERN.test(trustDomain) || !isIdentityRole(role) || !isValidId(id)) return undefined;
  return { trustDomain, role, id };
}
