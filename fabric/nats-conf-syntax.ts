import { FABRIC_CODES, FabricError } from "./errors.js";

/** A nats-server configuration string: JSON-quoted, refusing control characters (no injected lines). */
export function quote(value: string, what: string): string {
  if (/[\u0000-\u001f\u007f]/.test(value)) {
    throw new FabricError(FABRIC_CODES.SHOAL_NATS_CONFIG, `${what} contains a control character`, {
      fix: `use a ${what} without control characters or newlines`,
      details: { value },
    });
  }
  return JSON.stringify(value);
}

export function quoteList(values: readonly string[], what: string): string {
  return `[${values.map((v) => quote(v, what)).join(", ")}]`;
}

/** Certificate, key and CA files of a `tls {}` block. */
export interface TlsFiles {
  readonly certFile: string;
  readonly keyFile: string;
  /** The fabric CA the peer's certificate must chain to. */
  readonly caFile: string;
  /** Handshake timeout in seconds. @default 2 */
  readonly timeoutSeconds?: number;
}

/**
 * The opening lines of a `tls {}` block with `verify_and_map` (the caller adds
 * its own lines and the closing brace). 2.9.10 refuses `min_version` and
 * `handshake_first` here; TLS 1.2 is already its floor.
 */
export function tlsLines(tls: TlsFiles, indent = ""): string[] {
  return [
    `${indent}tls {`,
    `${indent}  cert_file: ${quote(tls.certFile, "path")}`,
    `${indent}  key_file: ${quote(tls.keyFile, "path")}`,
    `${indent}  ca_file: ${quote(tls.caFile, "path")}`,
    `${indent}  verify_and_map: true`,
    `${indent}  timeout: ${tls.timeoutSeconds ?? 2}`,
  ];
}
