import { createHash, X509Certificate } from "node:crypto";
import { PKI_CODES, PkiError } from "./errors.js";

const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----([\s\S]*?)-----END \1-----/g;

/** The DER bodies of every PEM block labelled `label` in `text`, in order. */
export function pemBlocks(text: string, label: string): Buffer[] {
  const out: Buffer[] = [];
  for (const m of text.matchAll(PEM_BLOCK)) {
    if (m[1] === label) out.push(Buffer.from((m[2] ?? "").replace(/\s+/g, ""), "base64"));
  }
  return out;
}

export function toPem(label: string, der: Uint8Array): string {
  const b64 = Buffer.from(der).toString("base64");
  const lines = b64.match(/.{1,64}/g) ?? [];
  return `-----BEGIN ${label}-----\n${lines.join("\n")}\n-----END ${label}-----\n`;
}

function isDer(data: Uint8Array): boolean {
  return data.length > 2 && data[0] === 0x30;
}

/**
 * The certificates in `input` (PEM text with one or more CERTIFICATE blocks, or one DER
 * certificate), each checked to parse. `what` names the source in error messages.
 */
export function readCertificates(input: string | Uint8Array, what = "input"): X509Certificate[] {
  let ders: Buffer[];
  if (typeof input !== "string" && isDer(input)) ders = [Buffer.from(input)];
  else ders = pemBlocks(Buffer.from(input).toString("utf8"), "CERTIFICATE");
  if (ders.length === 0) {
    throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_PEM, `${what} holds no PEM certificate`, {
      fix: "give a file with -----BEGIN CERTIFICATE----- blocks (e.g. PREFIX.crt or ca.crt)",
    });
  }
  return ders.map((der, i) => {
    try {
      return new X509Certificate(der);
    } catch (err) {
      throw new PkiError(PKI_CODES.SHOAL_PKI_BAD_PEM, `certificate ${i + 1} in ${what} is corrupt`, {
        cause: err,
        fix: "the PEM was truncated or edited; copy it again from its source",
      });
    }
  });
}

/** `sha256:<lower-case hex>` of DER bytes. */
export function sha256Fingerprint(der: Uint8Array): string {
  return `sha256:${createHash("sha256").update(der).digest("hex")}`;
}

/** `sha256:<hex>` of the first certificate in `pemOrDer`. */
export function certFingerprint(pemOrDer: string | Uint8Array): string {
  const [cert] = readCertificates(pemOrDer);
  return sha256Fingerprint(cert!.raw);
}

/** Normalises a serial to lower-case hex without leading zeros or colons. */
export function normalizeSerial(serial: string): string {
  const hex = serial
    .replace(/[:\s]/g, "")
    .toLowerCase()
    .replace(/^0x/, "")
    .replace(/^0+(?=.)/, "");
  return hex;
}
