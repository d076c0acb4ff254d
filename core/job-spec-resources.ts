import { parseByteSize, parseDuration } from "./config-values.js";

/** The most CPU a task may ask for; more is a typo, not a machine. */
export const MAX_TASK_CPU = 1024;
/** The most memory a task may ask for: 1 TiB. */
export const MAX_TASK_MEMORY_BYTES = 2 ** 40;
/** The longest execution or queue timeout a job may ask for: 7 days. */
export const MAX_JOB_TIMEOUT_MS = 7 * 86_400_000;

const CPU_RE = /^(?:([0-9]+)m|([0-9]+(?:\.[0-9]+)?))$/;

/**
 * CPU cores in a Kubernetes-style quantity: `"500m"` → 0.5, `"2"` → 2,
 * `"0.25"` → 0.25, or a plain number of cores. Throws a RangeError otherwise.
 */
export function parseCpu(value: string | number): number {
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new RangeError(`not a CPU quantity: ${value}`);
    return value;
  }
  const m = CPU_RE.exec(value.trim());
  if (!m) throw new RangeError(`not a CPU quantity: ${JSON.stringify(value)} (use e.g. "500m" or "2")`);
  return m[1] !== undefined ? Number(m[1]) / 1000 : Number(m[2]);
}

/**
 * Bytes in a memory quantity: `"64Mi"`, `"1Gi"`, `"512M"`, `"100MB"`, `"1024"`
 * or a plain number of bytes. Throws a RangeError otherwise.
 */
export function parseMemory(value: string | number): number {
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new RangeError(`not a memory quantity: ${value}`);
    return Math.floor(value);
  }
  return parseByteSize(value.trim());
}

/**
 * Milliseconds in a job timeout: a number of seconds (`600`) or a duration
 * string (`"30s"`, `"5m"`, `"1h30m"`). Throws a RangeError otherwise.
 */
export function parseTimeoutMs(value: string | number): number {
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new RangeError(`not a timeout: ${value}`);
    return Math.round(value * 1000);
  }
  const trimmed = value.trim();
  if (/^[0-9]+(?:\.[0-9]+)?$/.test(trimmed)) return Math.round(Number(trimmed) * 1000);
  return parseDuration(trimmed);
}

const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB"] as const;

/** `67108864` → `"64 MiB"`, for messages. */
export function formatBytes(bytes: number): string {
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < BYTE_UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  const shown = unit === 0 || Number.isInteger(value) ? String(value) : value.toFixed(1);
  return `${shown} ${BYTE_UNITS[unit]}`;
}
