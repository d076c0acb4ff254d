/*
 * Assembly of DER from parts that are already DER-encoded. Every part is
 * produced by @peculiar/asn1-* (names, keys, extensions); this only wraps
 * finished parts in a tag and a definite length, so that the parts that are
 * the same for every certificate of an issuer are encoded once and the signed
 * TBSCertificate is not encoded twice. (Encoding, not signing, dominates the
 * cost of issuing a certificate with asn1-schema.)
 */

function lengthBytes(length: number): Buffer {
  if (length < 0x80) return Buffer.from([length]);
  const bytes: number[] = [];
  for (let n = length; n > 0; n = Math.floor(n / 256)) bytes.unshift(n & 0xff);
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}

/** A TLV with the given tag byte around the concatenated parts. */
export function derWrap(tag: number, ...parts: Uint8Array[]): Buffer {
  const body = Buffer.concat(parts);
  return Buffer.concat([Buffer.from([tag]), lengthBytes(body.length), body]);
}

export const DER_TAG = {
  INTEGER: 0x02,
  BIT_STRING: 0x03,
  SEQUENCE: 0x30,
  /** [0] EXPLICIT, constructed. */
  CONTEXT_0: 0xa0,
  /** [3] EXPLICIT, constructed. */
  CONTEXT_3: 0xa3,
} as const;

export function derSequence(...parts: Uint8Array[]): Buffer {
  return derWrap(DER_TAG.SEQUENCE, ...parts);
}

/** A BIT STRING with no unused bits (signatures). */
export function derBitString(bytes: Uint8Array): Buffer {
  return derWrap(DER_TAG.BIT_STRING, Buffer.from([0]), bytes);
}

/** An INTEGER from its big-endian two's-complement bytes (already minimal). */
export function derInteger(bytes: Uint8Array): Buffer {
  return derWrap(DER_TAG.INTEGER, bytes);
}
