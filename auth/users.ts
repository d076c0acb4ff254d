import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import { writeFileAtomic } from "../core/index.js";
import { AUTH_CODES, AuthError } from "./errors.js";
import { assertPasswordStrength, type HashOptions, hashPassword } from "./password.js";
import type { AuthStore } from "./store.js";
import {
  DEFAULT_NAMESPACE,
  isAction,
  type Principal,
  ROLE_SCOPES,
  type RoleRecord,
  type UserRecord,
} from "./types.js";

/**
 * User, role and namespace names: the same rule as PKI ids, so that
 * `spiffe://td/user/<name>` maps onto a user, and KV-safe.
 */
const NAME_PATTERN = /^[a-z0-9][a-z0-9_-]{0,62}$/;

export function isValidName(name: unknown): name is string {
  return typeof name === "string" && NAME_PATTERN.test(name);
}

export function assertName(name: unknown, what: "user" | "role" | "namespace"): string {
  if (!isValidName(name)) {
    throw new AuthError(AUTH_CODES.SHOAL_AUTH_BAD_NAME, `invalid ${what} name ${JSON.stringify(name)}`, {
      fix: "use 1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit",
    });
  }
  return name;
}

/** The roles every Shoal installation has. They can be used but not redefined or deleted. */
export const BUILTIN_ROLES: readonly RoleRecord[] = Object.freeze([
  {
    name: "admin",
    description: "Everything, including users, roles and enrollment tokens.",
    actions: ["*"],
    scope: "cluster",
  },
  {
    name: "operator",
    description: "Manages nodes (list, describe, approve, reject, delete), reads jobs and the metrics.",
    actions: [
      "agent:metrics",
      "node:list",
      "node:read",
      "node:approve",
      "node:reject",
      "node:delete",
      "job:list",
      "job:read",
      "job:logs",
    ],
    scope: "cluster",
  },
  {
    name: "submitter",
    description: "Submits jobs in its namespace and lists, describes, follows, fetches and stops its own.",
    actions: ["job:submit", "job:list", "job:read", "job:logs", "job:results", "job:stop"],
    scope: "own",
  },
  {
    name: "reader",
    description: "Reads jobs (with logs and results) and nodes.",
    actions: ["job:list", "job:read", "job:logs", "job:results", "node:list", "node:read"],
    scope: "cluster",
  },
] satisfies RoleRecord[]);

export function isBuiltinRole(name: string): boolean {
  return BUILTIN_ROLES.some((r) => r.name === name);
}

export interface NewUser {
  name: string;
  /** Plain password, hashed here; omit for certificate or client-key users. */
  password?: string;
  roles: string[];
  /** @default DEFAULT_NAMESPACE */
  namespace?: string;
  clientKeys?: string[];
}

/** Users and roles over an {@link AuthStore}, with their validation rules. */
export class UserDirectory {
  readonly #store: AuthStore;
  readonly #hash: HashOptions;
  readonly #now: () => number;

  constructor(store: AuthStore, options: { hash?: HashOptions; now?: () => number } = {}) {
    this.#store = store;
    this.#hash = options.hash ?? {};
    this.#now = options.now ?? Date.now;
  }

  /** Writes the built-in roles into the store (at every start, so their definitions follow the code). */
  async ensureBuiltinRoles(): Promise<void> {
    for (const role of BUILTIN_ROLES) await this.#store.roles.put(role.name, role);
  }

  async addUser(user: NewUser): Promise<UserRecord> {
    const name = assertName(user.name, "user");
    const namespace = assertName(user.namespace ?? DEFAULT_NAMESPACE, "namespace");
    await this.#assertRolesExist(user.roles);
    const record: UserRecord = {
      name,
      roles: [...new Set(user.roles)],
      namespace,
      createdAt: new Date(this.#now()).toISOString(),
      uid: randomBytes(12).toString("base64url"),
      disabled: false,
    };
    if (user.clientKeys?.length) record.clientKeys = [...user.clientKeys];
    if (user.password !== undefined) {
      assertPasswordStrength(user.password);
      record.passwordHash = await hashPassword(user.password, this.#hash);
    }
    if (!(await this.#store.users.create(name, record))) {
      throw new AuthError(AUTH_CODES.SHOAL_AUTH_USER_EXISTS, `user ${name} already exists`, {
        fix: "choose another name, or delete the existing user first",
      });
    }
    return record;
  }

  async getUser(name: string): Promise<UserRecord | undefined> {
    return isValidName(name) ? this.#store.users.get(name) : undefined;
  }

  async listUsers(): Promise<UserRecord[]> {
    return (await this.#store.users.list()).map(([, u]) => u).sort((a, b) => a.name.localeCompare(b.name));
  }

  async deleteUser(name: string): Promise<void> {
    await this.#mustGet(name);
    await this.#store.users.delete(name);
  }

  async setPassword(name: string, password: string): Promise<void> {
    const user = await this.#mustGet(name);
    assertPasswordStrength(password);
    user.passwordHash = await hashPassword(password, this.#hash);
    await this.#store.users.put(name, user);
  }

  async setDisabled(name: string, disabled: boolean): Promise<void> {
    const user = await this.#mustGet(name);
    user.disabled = disabled;
    await this.#store.users.put(name, user);
  }

  /** The registered user a client key belongs to, if any. */
  async findByClientKey(clientId: string): Promise<UserRecord | undefined> {
    return (await this.#store.users.list()).map(([, u]) => u).find((u) => u.clientKeys?.includes(clientId));
  }

  async addRole(role: RoleRecord): Promise<RoleRecord> {
    const name = assertName(role.name, "role");
    if (isBuiltinRole(name)) {
      throw new AuthError(AUTH_CODES.SHOAL_AUTH_ROLE_BUILTIN, `role ${name} is built in`, {
        fix: "choose another name for a custom role",
      });
    }
    for (const action of role.actions) {
      if (action !== "*" && !isAction(action)) {
        throw new AuthError(
          AUTH_CODES.SHOAL_AUTH_UNKNOWN_ACTION,
          `unknown action ${JSON.stringify(action)}`,
          {
            fix: "use the actions listed in docs/auth.md (e.g. job:submit, node:approve)",
          },
        );
      }
    }
    const scope = role.scope ?? "cluster";
    if (!ROLE_SCOPES.includes(scope))
      throw new TypeError(`role scope must be one of ${ROLE_SCOPES.join(", ")}`);
    const record: RoleRecord = {
      name,
      description: role.description,
      actions: [...new Set(role.actions)],
      scope,
    };
    await this.#store.roles.put(name, record);
    return record;
  }

  async listRoles(): Promise<RoleRecord[]> {
    return (await this.#store.roles.list()).map(([, r]) => r).sort((a, b) => a.name.localeCompare(b.name));
  }

  async deleteRole(name: string): Promise<void> {
    if (isBuiltinRole(name)) {
      throw new AuthError(AUTH_CODES.SHOAL_AUTH_ROLE_BUILTIN, `role ${name} is built in`, {
        fix: "built-in roles cannot be deleted",
      });
    }
    if (!(await this.#store.roles.get(name))) throw roleNotFound(name);
    await this.#store.roles.delete(name);
  }

  async #mustGet(name: string): Promise<UserRecord> {
    const user = await this.getUser(name);
    if (!user) {
      throw new AuthError(AUTH_CODES.SHOAL_AUTH_USER_NOT_FOUND, `no user named ${name}`, {
        fix: "`shoal auth user list` shows the users",
      });
    }
    return user;
  }

  async #assertRolesExist(roles: string[]): Promise<void> {
    for (const role of roles) if (!(await this.#store.roles.get(role))) throw roleNotFound(role);
  }
}

function roleNotFound(name: string): AuthError {
  return new AuthError(AUTH_CODES.SHOAL_AUTH_ROLE_NOT_FOUND, `no role named ${name}`, {
    fix: "`shoal auth role list` shows the roles; `shoal auth role add` makes one",
  });
}

/**
 * The principal a verified token stands for, as its user is now. A token
 * names its user (`sub`) and carries the roles and namespace the user had when
 * it logged in; a registered user's token (password, client key, mtls) is
 * honoured only while that user exists, is the user it was issued to (a user
 * deleted and added again under the same name does not inherit the old
 * tokens) and is not disabled, and with the user's roles and namespace of
 * now. Anyone else's (a shared secret, a client of anonymous mode) is as the
 * token says.
 */
export async function currentPrincipal(
  token: { sub: string; iat: number; uid?: string },
  principal: Principal,
  lookup: (name: string) => UserRecord | undefined | Promise<UserRecord | undefined>,
): Promise<Principal> {
  if (principal.kind !== "user" || principal.method === "sharedSecret") return principal;
  const user = await lookup(token.sub);
  if (!user || !issuedTo(token, user)) {
    throw new AuthError(
      AUTH_CODES.SHOAL_AUTH_TOKEN_REVOKED,
      `user ${token.sub} was deleted: its tokens are void`,
      {
        fix: "log in as an existing user",
      },
    );
  }
  if (user.disabled) throw userDisabled(user.name);
  return { ...principal, roles: [...user.roles], namespace: user.namespace };
}

/**
 * Whether the token was issued to this user, not to an earlier one of the
 * same name: by the user's random id; for a token or a user from before ids
 * existed, by time (the user created no later than the second the token was
 * issued).
 */
function issuedTo(token: { iat: number; uid?: string }, user: UserRecord): boolean {
  if (token.uid !== undefined && user.uid !== undefined) return token.uid === user.uid;
  return Math.floor(Date.parse(user.createdAt) / 1000) <= token.iat;
}

export function userDisabled(name: string): AuthError {
  return new AuthError(AUTH_CODES.SHOAL_AUTH_USER_DISABLED, `user ${name} is disabled`, {
    fix: "ask an admin to enable the account",
  });
}

/** The file the generated first admin password is written to (0600), under the data dir. */
export const ADMIN_PASSWORD_FILE = "admin-password";

export interface BootstrapResult {
  created: boolean;
  name: string;
  /** Only when generated here: print it once, then forget it. */
  generatedPassword?: string;
  /** Where the generated password was written (0600). */
  passwordFile?: string;
}

/**
 * Creates the first admin if no user holds the admin role. The password comes
 * from `SHOAL_ADMIN_PASSWORD`, or is generated (24 random bytes) and written
 * 0600 to `<dataDir>/admin-password`. There is no default password.
 */
export async function bootstrapAdmin(options: {
  directory: UserDirectory;
  dataDir: string;
  env?: NodeJS.ProcessEnv;
  /** @default "admin" */
  name?: string;
}): Promise<BootstrapResult> {
  const name = options.name ?? "admin";
  await options.directory.ensureBuiltinRoles();
  const users = await options.directory.listUsers();
  if (users.some((u) => u.roles.includes("admin") && !u.disabled)) return { created: false, name };
  // Orchestrators of a cluster start together on one user store: whoever adds the admin first wins.
  const add = (password: string) =>
    options.directory.addUser({ name, password, roles: ["admin"] }).then(
      () => true,
      (err) => {
        if ((err as AuthError).code === AUTH_CODES.SHOAL_AUTH_USER_EXISTS) return false;
        throw err;
      },
    );
  const fromEnv = (options.env ?? process.env).SHOAL_ADMIN_PASSWORD;
  if (fromEnv !== undefined && fromEnv !== "") {
    return { created: await add(fromEnv), name };
  }
  const generatedPassword = randomBytes(24).toString("base64url");
  const passwordFile = path.join(options.dataDir, ADMIN_PASSWORD_FILE);
  await writeFileAtomic(passwordFile, `${generatedPassword}\n`, 0o600);
  if (!(await add(generatedPassword))) {
    await fs.rm(passwordFile, { force: true });
    return { created: false, name };
  }
  return { created: true, name, generatedPassword, passwordFile };
}
