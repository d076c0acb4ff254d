import { promises as fs } from "node:fs";
import path from "node:path";
import { FileReadError, withFileLock, writeFileAtomic } from "../core/index.js";
import { PKI_CODES, PkiError } from "./errors.js";
import type { KeyType } from "./key-types.js";
import type { Role } from "./spiffe.js";

/** RFC 5280 CRL reason codes a revocation can name. */
export const REVOCATION_REASONS = [
  "unspecified",
  "keyCompromise",
  "cACompromise",
  "affiliationChanged",
  "superseded",
  "cessationOfOperation",
  "certificateHold",
  "privilegeWithdrawn",
] as const;
export type RevocationReason = (typeof REVOCATION_REASONS)[number];

export function assertRevocationReason(value: unknown): RevocationReason {
  if (typeof value !== "string" || !(REVOCATION_REASONS as readonly string[]).includes(value)) {
    throw new PkiError(
      PKI_CODES.SHOAL_PKI_UNKNOWN_REASON,
      `unknown revocation reason ${JSON.stringify(value)}`,
      {
        fix: `use one of ${REVOCATION_REASONS.join(", ")}`,
      },
    );
  }
  return value as RevocationReason;
}

export type CertificateStatus = "valid" | "revoked" | "expired";

/** One certificate this PKI issued. Dates are ISO strings in the file and Dates here. */
export interface InventoryEntry {
  /** Lower-case hex, no leading zeros. */
  serial: string;
  role: Role;
  id?: string;
  spiffeId?: string;
  /** Every SAN as text: DNS names, IP addresses and URIs. */
  sans: string[];
  notBefore: Date;
  notAfter: Date;
  fingerprint: string;
  /** `expired` is computed when listed; the file stores valid or revoked. */
  status: CertificateStatus;
  revokedAt?: Date;
  reason?: RevocationReason;
}

/**
 * An identity (SPIFFE id) taken away for good: every certificate it held was
 * revoked, and enrollment refuses to issue it again, whatever token is offered.
 * An operator can still issue it explicitly (`shoal pki issue`/`sign`).
 */
export interface RevokedIdentity {
  spiffeId: string;
  revokedAt: Date;
  reason: RevocationReason;
}

/** The single JSON file `DIR/inventory.json`, rewritten atomically under `DIR/inventory.json.lock`. */
export interface InventoryFile {
  version: 1;
  trustDomain: string;
  keyType: KeyType;
  /** True when ca.key and issuer.key are encrypted PKCS#8. */
  encrypted: boolean;
  /** The number of the last CRL made; each `crl()` increments it. */
  crlNumber: number;
  certificates: InventoryEntry[];
  /** Identities barred from enrolling again (absent in files written before revocation existed). */
  revokedIdentities?: RevokedIdentity[];
}

export const INVENTORY_FILE = "inventory.json";

function reviveEntry(raw: Record<string, unknown>): InventoryEntry {
  const entry = { ...raw } as unknown as InventoryEntry;
  entry.notBefore = new Date(raw.notBefore as string);
  entry.notAfter = new Date(raw.notAfter as string);
  if (raw.revokedAt) entry.revokedAt = new Date(raw.revokedAt as string);
  return entry;
}

function parseInventory(text: string, file: string): InventoryFile {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw corrupt(file, err);
  }
  const inv = data as Partial<InventoryFile>;
  if (
    typeof inv !== "object" ||
    inv === null ||
    inv.version !== 1 ||
    typeof inv.trustDomain !== "string" ||
    typeof inv.crlNumber !== "number" ||
    !Array.isArray(inv.certificates)
  ) {
    throw corrupt(file);
  }
  return {
    ...(inv as InventoryFile),
    certificates: (inv.certificates as unknown as Record<string, unknown>[]).map(reviveEntry),
    ...(Array.isArray(inv.revokedIdentities)
      ? { revokedIdentities: inv.revokedIdentities.map((r) => ({ ...r, revokedAt: new Date(r.revokedAt) })) }
      : {}),
  };
}

function corrupt(file: string, cause?: unknown): PkiError {
  return new PkiError(PKI_CODES.SHOAL_PKI_INVENTORY_CORRUPT, `${file} is not a valid Shoal PKI inventory`, {
    cause,
    fix: "restore the file from a backup; the certificates themselves are still valid",
  });
}

/** Reads the inventory of the PKI in `dir` (no lock: a reader sees one whole file or the other). */
export async function readInventory(dir: string): Promise<InventoryFile> {
  const file = path.join(dir, INVENTORY_FILE);
  let text: string;
  try {
    text = await fs.readFile(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") {
      throw new PkiError(PKI_CODES.SHOAL_PKI_NOT_FOUND, `${dir} holds no Shoal PKI (no ${INVENTORY_FILE})`, {
        cause: err,
        fix: "run `shoal pki init --dir DIR` first, or point --dir at the existing PKI",
      });
    }
    throw new FileReadError(file, err);
  }
  return parseInventory(text, file);
}

export async function writeInventory(dir: string, inventory: InventoryFile): Promise<void> {
  await writeFileAtomic(path.join(dir, INVENTORY_FILE), `${JSON.stringify(inventory, null, 2)}\n`, 0o644);
}

/**
 * How long a certificate stays in the inventory after it expired (revoked or
 * not): `pki list` shows it meanwhile. An expired certificate admits nothing
 * and verifies nothing, so it is of no use after that, while a node renewing
 * every 16 hours adds one and a half certificates a day. @default 7 days
 */
export const EXPIRED_RETENTION_MS = 7 * 24 * 60 * 60 * 1000;

/** True when a certificate expired longer ago than {@link EXPIRED_RETENTION_MS} at `now`. */
export function expiredLongAgo(notAfter: Date, now: Date): boolean {
  return notAfter.getTime() + EXPIRED_RETENTION_MS < now.getTime();
}

/**
 * Read-modify-write of the inventory under its lock, so concurrent `pki issue`
 * runs (in any process) never lose an entry. `change` may throw to abort; the
 * file is then left as it was. Each write also drops the certificates that
 * expired longer ago than {@link EXPIRED_RETENTION_MS}, so the file (rewritten
 * whole, and read again by the orchestrator at each change) does not grow
 * with every renewal ever made.
 */
export async function updateInventory<T>(dir: string, change: (inventory: InventoryFile) => T): Promise<T> {
  return withFileLock(path.join(dir, `${INVENTORY_FILE}.lock`), async () => {
    const inventory = await readInventory(dir);
    const result = change(inventory);
    const now = new Date();
    inventory.certificates = inventory.certificates.filter((e) => !expiredLongAgo(e.notAfter, now));
    await writeInventory(dir, inventory);
    return result;
  });
}

/** The entry's status at `at`: stored `revoked` wins, else `expired` after notAfter. */
export function statusAt(entry: InventoryEntry, at: Date): CertificateStatus {
  if (entry.status === "revoked") return "revoked";
  return entry.notAfter.getTime() < at.getTime() ? "expired" : "valid";
}
