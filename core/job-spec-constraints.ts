import { type Static, Type as T } from "@sinclair/typebox";

/** Label-selector operators, as in Bacalhau and Kubernetes. */
export const CONSTRAINT_OPERATORS = ["=", "!=", "exists", "!", "in", "notin", "gt", "lt"] as const;
export type ConstraintOperator = (typeof CONSTRAINT_OPERATORS)[number];

export const ConstraintSchema = T.Object(
  {
    /** The node label to look at. */
    Key: T.String({ minLength: 1, maxLength: 253 }),
    Operator: T.Union(
      CONSTRAINT_OPERATORS.map((op) => T.Literal(op)),
      { "x-shoal-noun": "operator" },
    ),
    /** One value for `=`, `!=`, `gt`, `lt`; at least one for `in`, `notin`; none for `exists`, `!`. */
    Values: T.Optional(T.Array(T.String({ maxLength: 256 }), { maxItems: 64 })),
  },
  { additionalProperties: false },
);
export type Constraint = Static<typeof ConstraintSchema>;

/**
 * What is wrong with a constraint that has the right shape but the wrong
 * number or kind of values, or undefined when it is fine.
 */
export function constraintProblem(c: Constraint): { field: "Values" | "Key"; message: string } | undefined {
  const n = c.Values?.length ?? 0;
  switch (c.Operator) {
    case "exists":
    case "!":
      return n === 0 ? undefined : { field: "Values", message: `operator "${c.Operator}" takes no values` };
    case "=":
    case "!=":
      return n === 1
        ? undefined
        : { field: "Values", message: `operator "${c.Operator}" takes exactly one value` };
    case "in":
    case "notin":
      return n >= 1
        ? undefined
        : { field: "Values", message: `operator "${c.Operator}" takes at least one value` };
    case "gt":
    case "lt":
      if (n !== 1) return { field: "Values", message: `operator "${c.Operator}" takes exactly one number` };
      return Number.isFinite(Number(c.Values![0])) && c.Values![0]!.trim() !== ""
        ? undefined
        : {
            field: "Values",
            message: `operator "${c.Operator}" compares numbers; ${JSON.stringify(c.Values![0])} is not one`,
          };
  }
}

/** True when a node with these labels satisfies the constraint. A missing label satisfies `!=`, `!` and `notin`. */
export function matchesConstraint(labels: Readonly<Record<string, string>>, c: Constraint): boolean {
  const has = Object.hasOwn(labels, c.Key);
  const value = has ? labels[c.Key]! : undefined;
  const values = c.Values ?? [];
  switch (c.Operator) {
    case "exists":
      return has;
    case "!":
      return !has;
    case "=":
      return value === values[0];
    case "!=":
      return value !== values[0];
    case "in":
      return value !== undefined && values.includes(value);
    case "notin":
      return value === undefined || !values.includes(value);
    case "gt":
    case "lt": {
      if (value === undefined || value.trim() === "") return false;
      const have = Number(value);
      const want = Number(values[0]);
      if (!Number.isFinite(have) || !Number.isFinite(want)) return false;
      return c.Operator === "gt" ? have > want : have < want;
    }
  }
}

/** `region in (eu, us)` — for the scheduler's reasons. */
export function describeConstraint(c: Constraint): string {
  const values = c.Values ?? [];
  switch (c.Operator) {
    case "exists":
      return `${c.Key} exists`;
    case "!":
      return `${c.Key} absent`;
    case "in":
    case "notin":
      return `${c.Key} ${c.Operator} (${values.join(", ")})`;
    default:
      return `${c.Key} ${c.Operator === "gt" ? ">" : c.Operator === "lt" ? "<" : c.Operator} ${values[0]}`;
  }
}

/** The first constraint these labels fail, or undefined when all match. */
export function firstUnmetConstraint(
  labels: Readonly<Record<string, string>>,
  constraints: readonly Constraint[],
): Constraint | undefined {
  return constraints.find((c) => !matchesConstraint(labels, c));
}
