import { Type as T } from "@sinclair/typebox";

/** Most labels one node may be given (a join token's, or an approval's). */
export const MAX_NODE_LABELS = 64;

/** A node label key: as a job's label keys, 1 to 128 characters. */
const NODE_LABEL_KEY = "^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$";
const NODE_LABEL_KEY_RE = new RegExp(NODE_LABEL_KEY);
/** The longest label value. */
const MAX_LABEL_VALUE = 256;

/**
 * The labels an operator gives a node — through its join token
 * (`POST pki/join-tokens`, or `shoal pki join-token create --dir` on the PKI
 * itself) or when approving its enrollment request
 * (`POST orchestrator/nodes/{id}/approve`): keys of 1 to 128 letters, digits,
 * '.', '_', '/' and '-' (starting with a letter or digit), values of at most
 * 256 characters, at most {@link MAX_NODE_LABELS}. One schema for every route,
 * so all refuse the same labels (the API with 400, `field: "Labels"`; a
 * node's `register` and `Compute.Labels` too). The key rule is the one
 * pattern property, with no other properties allowed, so TypeBox's checks
 * (fabric bodies, configuration) enforce it as well as the API's validator.
 */
export const NodeLabelsSchema = nodeLabelsSchema();

/** {@link NodeLabelsSchema} with extra schema options (a default, a description). */
export function nodeLabelsSchema(options: { default?: Record<string, string>; description?: string } = {}) {
  return T.Record(T.String({ pattern: NODE_LABEL_KEY }), T.String({ maxLength: MAX_LABEL_VALUE }), {
    additionalProperties: false,
    maxProperties: MAX_NODE_LABELS,
    ...options,
  });
}

/** Why `labels` are not valid node labels (see {@link NodeLabelsSchema}), or undefined when they are. */
export function nodeLabelsProblem(labels: Record<string, string>): string | undefined {
  const count = Object.keys(labels).length;
  if (count > MAX_NODE_LABELS) return `${count} labels, more than ${MAX_NODE_LABELS}`;
  for (const [key, value] of Object.entries(labels)) {
    if (!NODE_LABEL_KEY_RE.test(key)) {
      return `label key ${JSON.stringify(key)}: 1 to 128 letters, digits, '.', '_', '/' or '-', starting with a letter or digit`;
    }
    if (typeof value !== "string" || value.length > MAX_LABEL_VALUE) {
      return `label ${key}: a value of at most ${MAX_LABEL_VALUE} characters`;
    }
  }
  return undefined;
}
