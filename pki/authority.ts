import type { KeyObject, X509Certificate } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import type { SubjectPublicKeyInfo } from "@peculiar/asn1-x509";
import { FileWriteError, readFileChecked, writeFileAtomic } from "../core/index.js";
import { buildCertificate, type Signer, serialHex, signerFromCertificate } from "./certificate-builder.js";
import { describeCertificate } from "./certificate-info.js";
import { buildCrl, DEFAULT_CRL_VALIDITY_MS } from "./crl.js";
import { checkCsr } from "./csr.js";
import { PKI_CODES, PkiError } from "./errors.js";
import { barIdentity, revokeTokensOfBarred } from "./identity-revocation.js";
import {
  assertRevocationReason,
  INVENTORY_FILE,
  type InventoryEntry,
  type InventoryFile,
  type RevocationReason,
  readInventory,
  statusAt,
  updateInventory,
  writeInventory,
} from "./inventory.js";
import {
  assertKeyType,
  DEFAULT_KEY_TYPE,
  exportPrivateKey,
  generateKeyMaterial,
  generatePrivateKey,
  importPrivateKey,
  type KeyType,
  keyTypeOf,
} from "./key-types.js";
import { normalizeSerial, readCertificates, sha256Fingerprint, toPem } from "./pem.js";
import { caTemplates, DEFAULT_CA_DAYS, type IssueRequest, planLeaf } from "./profiles.js";
import { assertTrustDomain, DEFAULT_TRUST_DOMAIN, type Role } from "./spiffe.js";

/** File names inside a PKI directory (DESIGN.md "PKI"). */
export const PKI_FILES = {
  rootCert: "ca.crt",
  rootKey: "ca.key",
  issuerCert: "issuer.crt",
  issuerKey: "issuer.key",
  inventory: INVENTORY_FILE,
} as const;

/** @default "Shoal Root CA" */
export const DEFAULT_CA_NAME = "Shoal Root CA";

export interface InitPkiOptions {
  /** @default "shoal.local" */
  trustDomain?: string;
  /** Root CA common name. @default "Shoal Root CA" */
  name?: string;
  /** Key type of the CA keys and, by default, of issued keys. @default "ecdsa-p256" */
  keyType?: KeyType;
  /** Validity of the root and issuing CA. @default 3650 */
  days?: number;
  /** Replace an existing PKI in `dir`. @default false */
  force?: boolean;
  /** Encrypts ca.key and issuer.key (PKCS#8, AES-256-CBC). */
  passphrase?: string;
  /** The clock; tests pin it. @default new Date() */
  now?: Date;
}

/** A certificate just issued. `keyPem` is absent when the CA signed a CSR. */
export interface IssuedCertificate {
  /** Leaf, then the issuing CA. */
  certPem: string;
  /** Unencrypted PKCS#8 PEM of the new private key. */
  keyPem?: string;
  /** Lower-case hex. */
  serial: string;
  /** `sha256:<hex>` of the leaf DER. */
  fingerprint: string;
  notBefore: Date;
  notAfter: Date;
  spiffeId?: string;
  role: Role;
  id?: string;
  sans: string[];
}

async function exists(file: string): Promise<boolean> {
  return fs.access(file).then(
    () => true,
    () => false,
  );
}

/**
 * Creates a PKI in `dir`: a root CA (ca.crt, ca.key) and the online issuing CA
 * (issuer.crt, issuer.key) it signs, plus an empty inventory. Refuses to
 * overwrite an existing PKI without `force`. On failure no new file is left.
 */
export async function initPki(
  dir: string,
  opts: InitPkiOptions = {},
): Promise<{ rootFingerprint: string; dir: string; trustDomain: string }> {
  const trustDomain = assertTrustDomain(opts.trustDomain ?? DEFAULT_TRUST_DOMAIN);
  const keyType = assertKeyType(opts.keyType ?? DEFAULT_KEY_TYPE);
  const name = opts.name ?? DEFAULT_CA_NAME;
  if (!opts.force) {
    for (const file of [PKI_FILES.rootCert, PKI_FILES.issuerCert, PKI_FILES.inventory]) {
      if (await exists(path.join(dir, file))) {
        throw new PkiError(PKI_CODES.SHOAL_PKI_EXISTS, `${dir} already holds a PKI (${file})`, {
          fix: "use another --dir, or pass --force to replace it (every certificate it issued stops verifying)",
        });
      }
    }
  }
  const rootKey = generatePrivateKey(keyType);
  const issuerKey = generatePrivateKey(keyType);
  const { root, issuer } = caTemplates({
    name,
    trustDomain,
    rootKey,
    issuerKey,
    now: opts.now ?? new Date(),
    days: opts.days ?? DEFAULT_CA_DAYS,
  });
  const rootDer = buildCertificate(root, { selfSigned: rootKey, keyType });
  const issuerDer = buildCertificate(issuer, signerFromCertificate(rootDer, rootKey, keyType));
  const inventory: InventoryFile = {
    version: 1,
    trustDomain,
    keyType,
    encrypted: opts.passphrase !== undefined,
    crlNumber: 0,
    certificates: [],
  };

  try {
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw new FileWriteError(dir, err);
  }
  const written: string[] = [];
  const write = async (file: string, data: string, mode: number) => {
    const full = path.join(dir, file);
    await writeFileAtomic(full, data, mode);
    written.push(full);
  };
  try {
    await write(PKI_FILES.rootKey, exportPrivateKey(rootKey, opts.passphrase), 0o600);
    await write(PKI_FILES.issuerKey, exportPrivateKey(issuerKey, opts.passphrase), 0o600);
    await write(PKI_FILES.rootCert, toPem("CERTIFICATE", rootDer), 0o644);
    await write(PKI_FILES.issuerCert, toPem("CERTIFICATE", issuerDer), 0o644);
    await writeInventory(dir, inventory);
  } catch (err) {
    if (!opts.force) await Promise.all(written.map((f) => fs.rm(f, { force: true })));
    throw err;
  }
  return { rootFingerprint: sha256Fingerprint(rootDer), dir, trustDomain };
}

/** Opens the PKI in `dir` with its issuing CA key (the root key is not needed and may be offline). */
export async function openPki(
  dir: string,
  opts: { passphrase?: string; now?: () => Date } = {},
): Promise<Pki> {
  const inventory = await readInventory(dir);
  const rootFile = path.join(dir, PKI_FILES.rootCert);
  const issuerFile = path.join(dir, PKI_FILES.issuerCert);
  const keyFile = path.join(dir, PKI_FILES.issuerKey);
  const [rootPem, issuerPem, keyPem] = await Promise.all([
    readFileChecked(rootFile),
    readFileChecked(issuerFile),
    readFileChecked(keyFile),
  ]);
  const [root] = readCertificates(rootPem, rootFile);
  const [issuer] = readCertificates(issuerPem, issuerFile);
  const key = importPrivateKey(keyPem, keyFile, opts.passphrase);
  if (!issuer!.checkPrivateKey(key)) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_KEY_MISMATCH, `${keyFile} is not the key of ${issuerFile}`, {
      fix: "restore the matching issuer.key and issuer.crt pair from the same `pki init`",
    });
  }
  return new Pki(
    dir,
    inventory.trustDomain,
    inventory.keyType,
    root!,
    issuer!,
    key,
    opts.now ?? (() => new Date()),
  );
}

/** An open PKI directory: issues, signs, revokes and lists certificates. */
export class Pki {
  readonly caCertPem: string;
  readonly issuerCertPem: string;
  readonly rootFingerprint: string;
  readonly issuerNotAfter: Date;
  readonly #signer: Signer;

  /** Use {@link openPki}. */
  constructor(
    readonly dir: string,
    readonly trustDomain: string,
    readonly keyType: KeyType,
    root: X509Certificate,
    issuer: X509Certificate,
    issuerKey: KeyObject,
    private readonly now: () => Date,
  ) {
    this.caCertPem = toPem("CERTIFICATE", root.raw);
    this.issuerCertPem = toPem("CERTIFICATE", issuer.raw);
    this.rootFingerprint = sha256Fingerprint(root.raw);
    this.issuerNotAfter = describeCertificate(issuer).notAfter;
    this.#signer = signerFromCertificate(issuer.raw, issuerKey, keyTypeOf(issuerKey));
  }

  /**
   * Mints a certificate for `req` without recording it (pure apart from the
   * clock and randomness); {@link issue} records it. Exposed for benchmarks
   * and callers that record in bulk.
   */
  mint(req: IssueRequest, csrKey?: { spki: SubjectPublicKeyInfo; keyType: KeyType }): IssuedCertificate {
    const material = csrKey ? undefined : generateKeyMaterial(assertKeyType(req.keyType ?? this.keyType));
    const plan = planLeaf(req, {
      trustDomain: this.trustDomain,
      publicKey: csrKey?.spki ?? material!.spki,
      now: this.now(),
      issuerNotAfter: this.issuerNotAfter,
      keyType: csrKey?.keyType ?? req.keyType ?? this.keyType,
    });
    const der = buildCertificate(plan.template, this.#signer);
    return {
      certPem: toPem("CERTIFICATE", der) + this.issuerCertPem,
      ...(material ? { keyPem: material.privateKeyPem } : {}),
      serial: serialHex(plan.template.serial),
      fingerprint: sha256Fingerprint(der),
      notBefore: plan.template.notBefore,
      notAfter: plan.template.notAfter,
      ...(plan.spiffeId ? { spiffeId: plan.spiffeId } : {}),
      role: plan.role,
      ...(plan.id ? { id: plan.id } : {}),
      sans: plan.sans,
    };
  }

  /**
   * Issues a certificate with a new key and records it in the inventory. With
   * `out`, PREFIX.crt/PREFIX.key are written before the record, and removed if
   * recording fails, so a failed run leaves nothing behind.
   */
  async issue(req: IssueRequest, opts: { out?: string } = {}): Promise<IssuedCertificate> {
    return this.#record(this.mint(req), opts.out);
  }

  /**
   * Signs a CSR after checking its signature. The CA alone decides names and
   * usages from `req` (role, id, dns, ip); whatever the CSR asks for is ignored.
   * `precondition` is checked against the inventory under its lock (see #record).
   */
  async signCsr(
    csrPem: string | Uint8Array,
    req: Omit<IssueRequest, "keyType">,
    opts: { out?: string; precondition?: (inventory: InventoryFile) => void } = {},
  ): Promise<IssuedCertificate> {
    const csr = checkCsr(csrPem);
    return this.#record(this.mint(req, csr), opts.out, opts.precondition);
  }

  /**
   * `precondition` runs under the inventory lock just before the record is
   * added and may throw to refuse it (e.g. "this id is already held"), so the
   * check and the record cannot be split by a concurrent issuer.
   */
  async #record(
    issued: IssuedCertificate,
    out: string | undefined,
    precondition?: (inventory: InventoryFile) => void,
  ): Promise<IssuedCertificate> {
    if (out) await writeIssued(out, issued);
    try {
      await updateInventory(this.dir, (inv) => {
        precondition?.(inv);
        inv.certificates.push(inventoryEntry(issued));
      });
    } catch (err) {
      if (out) await removeIssued(out);
      throw err;
    }
    return issued;
  }

  /** Marks a certificate revoked (by serial or by its PEM); see {@link revokeCertificate}. */
  async revoke(serialOrCertPem: string, reason: RevocationReason = "unspecified"): Promise<InventoryEntry> {
    return revokeCertificate(this.dir, serialOrCertPem, reason, this.now());
  }

  /** A fresh CRL (PEM) signed by the issuing CA, listing every revoked certificate. */
  async crl(opts: { validityMs?: number } = {}): Promise<string> {
    const now = this.now();
    return updateInventory(this.dir, (inv) => {
      inv.crlNumber += 1;
      return buildCrl(this.#signer, {
        number: inv.crlNumber,
        thisUpdate: now,
        nextUpdate: new Date(now.getTime() + (opts.validityMs ?? DEFAULT_CRL_VALIDITY_MS)),
        entries: inv.certificates
          .filter((e) => e.status === "revoked")
          .map((e) => ({
            serial: e.serial,
            revokedAt: e.revokedAt ?? now,
            ...(e.reason ? { reason: e.reason } : {}),
          })),
      });
    });
  }

  /** Every certificate issued, with its status now (valid, revoked or expired). */
  async list(): Promise<InventoryEntry[]> {
    return listCertificates(this.dir, this.now());
  }
}

/**
 * Marks a certificate of the PKI in `dir` revoked, by serial (hex, colons
 * allowed) or by its PEM. Needs no CA key. Revoking twice keeps the first date.
 * Unless the reason is superseded or certificateHold, the certificate's
 * identity is also barred from enrolling again and its join tokens revoked.
 */
export async function revokeCertificate(
  dir: string,
  serialOrCertPem: string,
  reason: RevocationReason = "unspecified",
  at: Date = new Date(),
): Promise<InventoryEntry> {
  assertRevocationReason(reason);
  let serial: string;
  let fingerprint: string | undefined;
  if (serialOrCertPem.includes("-----BEGIN")) {
    const info = describeCertificate(readCertificates(serialOrCertPem, "the certificate")[0]!);
    serial = info.serial;
    fingerprint = info.fingerprint;
  } else {
    serial = normalizeSerial(serialOrCertPem);
  }
  const [entry, barred] = await updateInventory(dir, (inv) => {
    // normalizeSerial: inventories written before serials lost every leading zero kept one nibble.
    const entry = inv.certificates.find((e) => normalizeSerial(e.serial) === serial);
    if (!entry || (fingerprint && entry.fingerprint !== fingerprint)) {
      throw new PkiError(PKI_CODES.SHOAL_PKI_UNKNOWN_SERIAL, `this PKI never issued serial ${serial}`, {
        fix: "check the serial with `shoal pki list --dir DIR`, or use the --dir of the CA that issued it",
      });
    }
    if (entry.status !== "revoked") {
      entry.status = "revoked";
      entry.revokedAt = at;
      entry.reason = reason;
    }
    return [{ ...entry }, barIdentity(inv, entry, reason, at)] as const;
  });
  await revokeTokensOfBarred(dir, barred, at);
  return entry;
}

/** Every certificate the PKI in `dir` issued, with its status at `at`. Needs no CA key. */
export async function listCertificates(dir: string, at: Date = new Date()): Promise<InventoryEntry[]> {
  const inv = await readInventory(dir);
  return inv.certificates.map((e) => ({ ...e, status: statusAt(e, at) }));
}

function inventoryEntry(issued: IssuedCertificate): InventoryEntry {
  return {
    serial: issued.serial,
    role: issued.role,
    ...(issued.id ? { id: issued.id } : {}),
    ...(issued.spiffeId ? { spiffeId: issued.spiffeId } : {}),
    sans: issued.sans,
    notBefore: issued.notBefore,
    notAfter: issued.notAfter,
    fingerprint: issued.fingerprint,
    status: "valid",
  };
}

/**
 * Writes PREFIX.crt (leaf + issuer) and, when there is a key, PREFIX.key (0600),
 * each atomically; if the second write fails the first is removed.
 */
export async function writeIssued(
  prefix: string,
  issued: Pick<IssuedCertificate, "certPem" | "keyPem">,
): Promise<void> {
  const written: string[] = [];
  try {
    if (issued.keyPem !== undefined) {
      await writeFileAtomic(`${prefix}.key`, issued.keyPem, 0o600);
      written.push(`${prefix}.key`);
    }
    await writeFileAtomic(`${prefix}.crt`, issued.certPem, 0o644);
  } catch (err) {
    await Promise.all(written.map((f) => fs.rm(f, { force: true })));
    throw err;
  }
}

async function removeIssued(prefix: string): Promise<void> {
  await Promise.all([fs.rm(`${prefix}.crt`, { force: true }), fs.rm(`${prefix}.key`, { force: true })]);
}
