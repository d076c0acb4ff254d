import { AsnConvert, OctetString } from "@peculiar/asn1-schema";
import {
  AlgorithmIdentifier,
  AuthorityKeyIdentifier,
  CertificateList,
  CRLNumber,
  CRLReason,
  CRLReasons,
  Extension,
  id_ce_authorityKeyIdentifier,
  id_ce_cRLNumber,
  id_ce_cRLReasons,
  KeyIdentifier,
  type Name,
  RevokedCertificate,
  TBSCertList,
  Time,
  Version,
} from "@peculiar/asn1-x509";
import type { Signer } from "./certificate-builder.js";
import { PKI_CODES, PkiError } from "./errors.js";
import type { RevocationReason } from "./inventory.js";
import { signatureAlgorithm, signDer } from "./key-types.js";
import { normalizeSerial, pemBlocks, toPem } from "./pem.js";

/** One revoked certificate as it appears in a CRL. */
export interface CrlEntry {
  /** Lower-case hex serial. */
  serial: string;
  revokedAt: Date;
  reason?: RevocationReason;
}

/** A CRL as read back: what `verify --crl` needs. */
export interface ParsedCrl {
  der: Buffer;
  issuer: Name;
  thisUpdate: Date;
  nextUpdate?: Date;
  number?: number;
  entries: CrlEntry[];
  tbs: Buffer;
  signatureOid: string;
  signature: Buffer;
}

/** @default 7 days: a CRL must be re-made (`shoal pki crl`) at least this often. */
export const DEFAULT_CRL_VALIDITY_MS = 7 * 24 * 3600 * 1000;

function serialBytes(hex: string): ArrayBuffer {
  let h = normalizeSerial(hex);
  if (h.length % 2) h = `0${h}`;
  let bytes = Buffer.from(h, "hex");
  if (bytes[0]! & 0x80) bytes = Buffer.concat([Buffer.from([0]), bytes]);
  return new Uint8Array(bytes).buffer;
}

function ext(extnID: string, value: unknown): Extension {
  return new Extension({ extnID, critical: false, extnValue: new OctetString(AsnConvert.serialize(value)) });
}

/** Builds and signs an X.509 v2 CRL (pure: the dates and number are inputs). Returns PEM. */
export function buildCrl(
  signer: Signer,
  opts: { number: number; thisUpdate: Date; nextUpdate: Date; entries: CrlEntry[] },
): string {
  const alg = signatureAlgorithm(signer.keyType);
  const algId = () =>
    new AlgorithmIdentifier(
      alg.parameters ? { algorithm: alg.oid, parameters: alg.parameters } : { algorithm: alg.oid },
    );
  const revoked = opts.entries.map(
    (e) =>
      new RevokedCertificate({
        userCertificate: serialBytes(e.serial),
        revocationDate: new Time(e.revokedAt),
        // RFC 5280 §5.3.1: omit the reason rather than say "unspecified".
        ...(e.reason && e.reason !== "unspecified"
          ? { crlEntryExtensions: [ext(id_ce_cRLReasons, new CRLReason(CRLReasons[e.reason]))] }
          : {}),
      }),
  );
  const tbs = new TBSCertList({
    version: Version.v2,
    signature: algId(),
    issuer: signer.name,
    thisUpdate: new Time(opts.thisUpdate),
    nextUpdate: new Time(opts.nextUpdate),
    ...(revoked.length > 0 ? { revokedCertificates: revoked } : {}),
    crlExtensions: [
      ext(
        id_ce_authorityKeyIdentifier,
        new AuthorityKeyIdentifier({ keyIdentifier: new KeyIdentifier(signer.keyId) }),
      ),
      ext(id_ce_cRLNumber, new CRLNumber(opts.number)),
    ],
  });
  const tbsDer = new Uint8Array(AsnConvert.serialize(tbs));
  const signature = signDer(signer.key, signer.keyType, tbsDer);
  const crl = new CertificateList({
    tbsCertList: tbs,
    signatureAlgorithm: algId(),
    signature: new Uint8Array(signature).buffer,
  });
  return toPem("X509 CRL", new Uint8Array(AsnConvert.serialize(crl)));
}

const REASON_NAMES = new Map<number, RevocationReason>(
  Object.entries(CRLReasons)
    .filter(([, v]) => typeof v === "number")
    .map(([k, v]) => [v as number, k as RevocationReason]),
);

/** Reads a PEM or DER CRL. `what` names it in errors. */
export function parseCrl(input: string | Uint8Array, what = "CRL"): ParsedCrl {
  const der =
    typeof input !== "string" && input[0] === 0x30
      ? Buffer.from(input)
      : pemBlocks(Buffer.from(input).toString("utf8"), "X509 CRL")[0];
  const bad = (cause?: unknown) =>
    new PkiError(PKI_CODES.SHOAL_PKI_BAD_CRL, `${what} is not a valid X.509 CRL`, {
      cause,
      fix: "make a fresh one with `shoal pki crl --dir DIR --out FILE`",
    });
  if (!der) throw bad();
  let list: CertificateList;
  try {
    list = AsnConvert.parse(der, CertificateList);
  } catch (err) {
    throw bad(err);
  }
  if (!list.tbsCertListRaw) throw bad();
  const tbs = list.tbsCertList;
  const numberExt = tbs.crlExtensions?.find((e) => e.extnID === id_ce_cRLNumber);
  const entries: CrlEntry[] = (tbs.revokedCertificates ?? []).map((r) => {
    const reasonExt = r.crlEntryExtensions?.find((e) => e.extnID === id_ce_cRLReasons);
    const reason = reasonExt
      ? REASON_NAMES.get(AsnConvert.parse(reasonExt.extnValue, CRLReason).reason)
      : undefined;
    return {
      serial: normalizeSerial(Buffer.from(r.userCertificate).toString("hex")),
      revokedAt: r.revocationDate.getTime(),
      ...(reason ? { reason } : {}),
    };
  });
  return {
    der,
    issuer: tbs.issuer,
    thisUpdate: tbs.thisUpdate.getTime(),
    ...(tbs.nextUpdate ? { nextUpdate: tbs.nextUpdate.getTime() } : {}),
    ...(numberExt ? { number: AsnConvert.parse(numberExt.extnValue, CRLNumber).value } : {}),
    entries,
    tbs: Buffer.from(list.tbsCertListRaw),
    signatureOid: list.signatureAlgorithm.algorithm,
    signature: Buffer.from(list.signature),
  };
}
