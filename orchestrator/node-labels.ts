import { Type as T } from "@sinclair/typebox";

/** Most labels one node may be given (a join token's, or an approval's). */
export const MAX_NODE_LABELS = 64;

/**
 * The labels an operator gives a node — through its join token
 * (`POST pki/join-tokens`) or when approving its enrollment request
 * (`POST orchestrator/nodes/{id}/approve`): keys of 1 to 128 characters,
 * values of at most 256, at most {@link MAX_NODE_LABELS}. One schema for both
 * routes, so both refuse the same labels (400, `field: "Labels"`).
 * `propertyNames` carries the key limits: a TypeBox record key's own
 * constraints do not reach the JSON schema.
 */
export const NodeLabelsSchema = T.Record(T.String(), T.String({ maxLength: 256 }), {
  propertyNames: { minLength: 1, maxLength: 128 },
  maxProperties: MAX_NODE_LABELS,
});
