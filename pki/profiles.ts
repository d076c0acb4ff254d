import type { KeyObject } from "node:crypto";
import { isIP } from "node:net";
import type { SubjectPublicKeyInfo } from "@peculiar/asn1-x509";
import {
  buildName,
  type CertificateTemplate,
  type ExtKeyUsage,
  KeyUsageFlags,
  randomSerial,
} from "./certificate-builder.js";
import { PKI_CODES, PkiError } from "./errors.js";
import { type KeyType, publicKeyInfo } from "./key-types.js";
import { assertId, assertRole, type IdentityRole, type Role, spiffeId } from "./spiffe.js";

/** `notBefore` is set this far in the past so peers with a slightly slow clock accept new certificates. */
export const BACKDATE_MS = 5 * 60 * 1000;
/** @default 365 days for leaf certificates. */
export const DEFAULT_LEAF_DAYS = 365;
/** @default 3650 days for the root and issuing CA. */
export const DEFAULT_CA_DAYS = 3650;
/** Names every server certificate carries: the orchestrator's own client dials loopback. */
export const LOOPBACK_NAMES = { dns: ["localhost"], ips: ["127.0.0.1"] } as const;

const DAY_MS = 24 * 3600 * 1000;

/** What to issue. Tests may pin dates and usages; operators give role, id, names and days. */
export interface IssueRequest {
  role: Role;
  /** Identity id (required for orchestrator/compute/user); for servers an inventory label, default the first DNS name. */
  id?: string;
  /** Server only: extra DNS names (localhost is always added). */
  dns?: string[];
  /** Server only: extra IP addresses (127.0.0.1 is always added). */
  ip?: string[];
  /** @default 365 */
  days?: number;
  /** Key type of a key generated for this certificate. @default the PKI's key type */
  keyType?: KeyType;
  /** @default now - 5 minutes */
  notBefore?: Date;
  /** @default notBefore + days (an explicit date wins over days) */
  notAfter?: Date;
  /** Overrides the role's extended key usages (tests: a server-auth-only client certificate). */
  extKeyUsage?: ExtKeyUsage[];
}

/** A leaf template plus the inventory facts about it. */
export interface LeafPlan {
  template: CertificateTemplate;
  role: Role;
  id?: string;
  spiffeId?: string;
  sans: string[];
}

const DNS_LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;

function normalizeDns(name: string): string {
  const n = name.trim().toLowerCase().replace(/\.$/, "");
  if (n.length === 0 || n.length > 253 || isIP(n) || !n.split(".").every((l) => DNS_LABEL.test(l))) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_NAME, `invalid DNS name ${JSON.stringify(name)}`, {
      fix: "give host names like node1.example.com (IP addresses go in --ip)",
    });
  }
  return n;
}

function normalizeIp(ip: string): string {
  const trimmed = ip.trim();
  if (!isIP(trimmed)) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_NAME, `invalid IP address ${JSON.stringify(ip)}`, {
      fix: "give IPv4 (10.0.5.16) or IPv6 (fd00::16) addresses; host names go in --dns",
    });
  }
  return trimmed.toLowerCase();
}

/** Validity of a leaf, checked against the issuer's own: a leaf never outlives its CA. */
export function leafValidity(
  req: Pick<IssueRequest, "days" | "notBefore" | "notAfter">,
  now: Date,
  issuerNotAfter: Date,
): { notBefore: Date; notAfter: Date } {
  const days = req.days ?? DEFAULT_LEAF_DAYS;
  if (!Number.isFinite(days) || days <= 0) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_VALIDITY, `--days must be a positive number, not ${days}`, {
      fix: "give --days N with N >= 1",
    });
  }
  const notBefore = req.notBefore ?? new Date(now.getTime() - BACKDATE_MS);
  const notAfter = req.notAfter ?? new Date(now.getTime() + days * DAY_MS);
  if (notAfter.getTime() <= notBefore.getTime()) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_VALIDITY, "the certificate would expire before it starts", {
      fix: "give a notAfter later than notBefore",
    });
  }
  if (notAfter.getTime() > issuerNotAfter.getTime()) {
    const maxDays = Math.floor((issuerNotAfter.getTime() - now.getTime()) / DAY_MS);
    throw new PkiError(
      PKI_CODES.SHOAL_PKI_VALIDITY,
      `the certificate would expire ${notAfter.toISOString()}, after the issuing CA itself (${issuerNotAfter.toISOString()})`,
      { fix: `use --days ${maxDays} or less, or renew the CA with a longer validity` },
    );
  }
  return { notBefore, notAfter };
}

/** The names, usages and validity of a leaf for a role (pure). */
export function planLeaf(
  req: IssueRequest,
  ctx: {
    trustDomain: string;
    publicKey: SubjectPublicKeyInfo;
    now: Date;
    issuerNotAfter: Date;
    keyType: KeyType;
  },
): LeafPlan {
  const role = assertRole(req.role);
  const { notBefore, notAfter } = leafValidity(req, ctx.now, ctx.issuerNotAfter);
  // keyEncipherment only means something for RSA key transport (TLS 1.2 RSA kex).
  const keyUsage =
    KeyUsageFlags.digitalSignature | (ctx.keyType === "rsa-3072" ? KeyUsageFlags.keyEncipherment : 0);
  const base = { serial: randomSerial(), publicKey: ctx.publicKey, notBefore, notAfter, keyUsage };
  if (role === "server") {
    if (req.id !== undefined) assertId(req.id, role);
    const dns = [...new Set([...LOOPBACK_NAMES.dns, ...(req.dns ?? []).map(normalizeDns)])];
    const ips = [...new Set([...LOOPBACK_NAMES.ips, ...(req.ip ?? []).map(normalizeIp)])];
    const commonName = dns.find((n) => n !== "localhost") ?? "localhost";
    return {
      template: {
        ...base,
        subject: buildName(commonName),
        extKeyUsage: req.extKeyUsage ?? ["serverAuth", "clientAuth"],
        dns,
        ips,
      },
      role,
      id: req.id ?? commonName,
      sans: [...dns, ...ips],
    };
  }
  if (req.dns?.length || req.ip?.length) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_NAME, `${role} certificates carry no DNS or IP names`, {
      fix: "drop --dns/--ip; identity certificates carry only their SPIFFE id (issue a server certificate for hosts)",
    });
  }
  const id = assertId(req.id, role);
  const uri = spiffeId(ctx.trustDomain, role as IdentityRole, id);
  return {
    template: {
      ...base,
      subject: buildName(id),
      extKeyUsage: req.extKeyUsage ?? ["clientAuth"],
      uris: [uri],
    },
    role,
    id,
    spiffeId: uri,
    sans: [uri],
  };
}

/** Templates for the root and the issuing intermediate. */
export function caTemplates(opts: {
  name: string;
  trustDomain: string;
  rootKey: KeyObject;
  issuerKey: KeyObject;
  now: Date;
  days: number;
}): { root: CertificateTemplate; issuer: CertificateTemplate } {
  if (!Number.isFinite(opts.days) || opts.days <= 0) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_VALIDITY, `--days must be a positive number, not ${opts.days}`, {
      fix: "give --days N with N >= 1",
    });
  }
  const notBefore = new Date(opts.now.getTime() - BACKDATE_MS);
  const notAfter = new Date(opts.now.getTime() + opts.days * DAY_MS);
  const issuerName = /\bRoot\b/.test(opts.name)
    ? opts.name.replace(/\bRoot\b/, "Issuing")
    : `${opts.name} Issuing CA`;
  return {
    // pathLen 1: the root signs one intermediate level, which signs only leaves (pathLen 0).
    root: {
      serial: randomSerial(),
      subject: buildName(opts.name, opts.trustDomain),
      publicKey: publicKeyInfo(opts.rootKey),
      notBefore,
      notAfter,
      ca: { pathLen: 1 },
      keyUsage: KeyUsageFlags.keyCertSign | KeyUsageFlags.cRLSign,
    },
    issuer: {
      serial: randomSerial(),
      subject: buildName(issuerName, opts.trustDomain),
      publicKey: publicKeyInfo(opts.issuerKey),
      // Within the root's window, as path validation expects.
      notBefore,
      notAfter,
      ca: { pathLen: 0 },
      keyUsage: KeyUsageFlags.digitalSignature | KeyUsageFlags.keyCertSign | KeyUsageFlags.cRLSign,
    },
  };
}
