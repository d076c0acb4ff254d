import { isAction, ROLE_SCOPES, type RoleRecord, type RoleScope } from "./types.js";
import { isValidName } from "./users.js";

/** Policy id of a role's generated policy, as it appears in decision reasons. */
export function rolePolicyId(role: string): string {
  return `role:${role}`;
}

const SCOPE_CONDITIONS: Record<RoleScope, string | undefined> = {
  cluster: undefined,
  namespace: `(resource is Shoal::Job && resource.namespace == principal.namespace) ||
  (resource is Shoal::Namespace && resource == principal.namespace)`,
  own: `(resource is Shoal::Job && resource.owner == principal && resource.namespace == principal.namespace) ||
  (resource is Shoal::Namespace && resource == principal.namespace) ||
  (resource is Shoal::Token && resource.owner == principal)`,
};

/**
 * Turns role records into Cedar policies, one per role:
 * `permit(principal in Shoal::Role::"<name>", action in [...], resource) when { <scope> };`.
 * Records that are not well formed (they come from a shared store) are
 * skipped and listed, never interpolated.
 */
export function rolePolicies(roles: readonly RoleRecord[]): {
  policies: Record<string, string>;
  skipped: string[];
} {
  const policies: Record<string, string> = {};
  const skipped: string[] = [];
  for (const role of roles) {
    const scope = role.scope ?? "cluster";
    if (
      !isValidName(role.name) ||
      !ROLE_SCOPES.includes(scope) ||
      !Array.isArray(role.actions) ||
      !role.actions.every((a) => a === "*" || isAction(a))
    ) {
      skipped.push(String(role.name));
      continue;
    }
    if (role.actions.length === 0) continue;
    const action = role.actions.includes("*")
      ? "action"
      : `action in [${[...new Set(role.actions)].map((a) => `Shoal::Action::"${a}"`).join(", ")}]`;
    const condition = SCOPE_CONDITIONS[scope];
    policies[rolePolicyId(role.name)] =
      `@id("${rolePolicyId(role.name)}")\npermit (principal in Shoal::Role::"${role.name}", ${action}, resource)` +
      (condition ? `\nwhen {\n  ${condition}\n};` : ";");
  }
  return { policies, skipped };
}
