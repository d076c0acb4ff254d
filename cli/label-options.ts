import { CORE_CODES, ShoalError } from "../core/index.js";

/**
 * `--label k=v` (repeatable, or comma-separated) as a label map: what an
 * operator gives a node, on `shoal pki join-token create` and `shoal node
 * approve`. A pair without `=` or without a key is a SHOAL_USAGE error; the
 * API checks the lengths (one schema for both routes).
 */
export function parseLabelOptions(value: unknown): Record<string, string> {
  const labels: Record<string, string> = {};
  if (value === undefined) return labels;
  const pairs = ([] as unknown[])
    .concat(value)
    .flatMap((v) => String(v).split(","))
    .map((v) => v.trim())
    .filter(Boolean);
  for (const pair of pairs) {
    const [k, ...v] = pair.split("=");
    if (!k || v.length === 0) {
      throw new ShoalError(CORE_CODES.SHOAL_USAGE, `--label ${pair} is not k=v`, {
        fix: "give labels as --label region=eu",
      });
    }
    labels[k] = v.join("=");
  }
  return labels;
}
