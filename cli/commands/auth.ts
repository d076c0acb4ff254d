import type { Argv } from "yargs";
import { CORE_CODES, ShoalError } from "../../core/index.js";
import { ApiClient, apiClientOptions, resolveApiUrl } from "../api-client.js";
import { login, storedToken } from "../auth-session.js";
import { TokenStore } from "../token-store.js";
import { type ApiArgs, printJson, printTable, withApiOptions, withClient } from "./api-options.js";
import { hashPasswordCommand, promptHidden, readPassword } from "./auth-tools.js";
import type { CommandModule } from "./index.js";

type Args = ApiArgs & { output?: unknown } & Record<string, unknown>;

const json = (argv: Args) => argv.output === "json";

/** The claims of a token, read without verifying it (for display; the API verifies). */
function claimsOf(token: string): Record<string, unknown> {
  try {
    return JSON.parse(Buffer.from(token.split(".")[1] ?? "", "base64url").toString("utf8"));
  } catch {
    return {};
  }
}

async function loginCommand(argv: Args): Promise<void> {
  const options = apiClientOptions(argv);
  const cert = argv.cert as string | undefined;
  const key = argv.key as string | undefined;
  if (Boolean(cert) !== Boolean(key)) {
    throw new ShoalError(CORE_CODES.SHOAL_USAGE, "--cert and --key go together", {
      fix: "give both the user certificate and its key (shoal pki issue user --id NAME --out PREFIX)",
    });
  }
  const client = await ApiClient.create({
    ...options,
    ...(cert && key ? { clientCert: { certFile: cert, keyFile: key } } : {}),
  });
  try {
    const reply = await login(client, {
      ...(argv.method ? { method: argv.method as string } : cert ? { method: "mtls" } : {}),
      ...(argv.user ? { user: argv.user as string } : {}),
      ...(process.stdin.isTTY ? { prompt: promptHidden } : {}),
    });
    await new TokenStore().set(client.url, storedToken(reply));
    if (json(argv)) printJson({ ...reply, Token: undefined });
    else {
      process.stdout.write(
        `logged in to ${client.url} as ${reply.Subject} (${reply.Roles.join(", ") || "no roles"}; namespace ${reply.Namespace}; by ${reply.Method}) until ${reply.ExpiresAt}\n`,
      );
    }
  } finally {
    client.close();
  }
}

/** `shoal auth login | logout | info | user ... | role ... | token revoke | hash-password`. */
export const authCommand: CommandModule = (cli) =>
  cli.command("auth", "log in to the API; manage users, roles and tokens", (yargs) => {
    const api = withApiOptions(yargs);
    return hashPasswordCommand(api as unknown as Argv)
      .command(
        "login",
        "log in and keep the token (~/.shoal/tokens.json); password from a prompt or SHOAL_PASSWORD",
        (y) =>
          y
            .option("method", {
              type: "string",
              choices: ["clientKey", "password", "sharedSecret", "mtls"],
              describe: "authentication method [default: password with --user, else clientKey]",
            })
            .option("user", { type: "string", describe: "user name (password login) [default: $SHOAL_USER]" })
            .option("cert", { type: "string", describe: "user certificate PEM for mtls" })
            .option("key", { type: "string", describe: "its private key PEM" }),
        (argv) => loginCommand(argv as Args),
      )
      .command(
        "logout",
        "revoke this API's stored token and forget it",
        () => {},
        async (argv: Args) => {
          const store = new TokenStore();
          const url = resolveApiUrl(apiClientOptions(argv).url);
          const entry = await store.get(url);
          if (entry && entry.method !== "env") {
            await withClient(argv, (c) =>
              c.request("DELETE", "/api/v1/auth/tokens", { body: { Token: entry.token } }),
            );
          }
          const had = await store.delete(url);
          process.stdout.write(had ? `logged out of ${url}\n` : `no token stored for ${url}\n`);
        },
      )
      .command(
        "info",
        "who the stored token (or SHOAL_TOKEN) says you are, and until when",
        () => {},
        async (argv: Args) => {
          const url = resolveApiUrl(apiClientOptions(argv).url);
          const entry = await new TokenStore().get(url);
          if (!entry) {
            throw new ShoalError(CORE_CODES.SHOAL_USAGE, `no valid token for ${url}`, {
              fix: "log in with `shoal auth login` (commands log in by client key on their own when the API offers it)",
            });
          }
          const c = claimsOf(entry.token);
          const info = {
            API: url,
            Subject: c.sub,
            Roles: c.roles,
            Namespace: c.ns,
            Method: c.method,
            ExpiresAt: typeof c.exp === "number" ? new Date(c.exp * 1000).toISOString() : entry.expiresAt,
            JTI: c.jti,
            Source: entry.method === "env" ? "SHOAL_TOKEN / SHOAL_TOKEN_FILE" : "token store",
          };
          if (json(argv)) return printJson(info);
          for (const [k, v] of Object.entries(info)) {
            process.stdout.write(
              `${`${k}:`.padEnd(11)}${Array.isArray(v) ? v.join(", ") : String(v ?? "")}\n`,
            );
          }
        },
      )
      .command("user", "API users (admin)", (y) =>
        y
          .command(
            "add <name>",
            "add a user; its password from SHOAL_PASSWORD or a prompt (none with --no-password)",
            (y) =>
              y
                .positional("name", { type: "string", demandOption: true })
                .option("role", {
                  type: "string",
                  array: true,
                  demandOption: true,
                  describe: "role(s) to grant",
                })
                .option("namespace", { type: "string", describe: "the user's namespace [default: default]" })
                .option("client-key", {
                  type: "string",
                  array: true,
                  describe: "client id (sha256 of the public key) whose clientKey logins act as this user",
                })
                .option("password", {
                  type: "boolean",
                  default: true,
                  describe: "set a password (--no-password: certificate or client-key logins only)",
                }),
            async (argv: Args) => {
              const body = {
                Name: argv.name,
                Roles: argv.role,
                ...(argv.namespace ? { Namespace: argv.namespace } : {}),
                ...(argv["client-key"] ? { ClientKeys: argv["client-key"] } : {}),
                ...(argv.password ? { Password: await readPassword() } : {}),
              };
              const r = await withClient(argv, (c) =>
                c.post<{ User: Record<string, unknown> }>("/api/v1/auth/users", body),
              );
              if (json(argv)) printJson(r.User);
              else process.stdout.write(`user ${argv.name} added\n`);
            },
          )
          .command(
            "list",
            "every user with roles and namespace",
            () => {},
            async (argv: Args) => {
              const { Items } = await withClient(argv, (c) =>
                c.get<{ Items: { Name: string; Roles: string[]; Namespace: string; Disabled: boolean }[] }>(
                  "/api/v1/auth/users",
                ),
              );
              if (json(argv)) return printJson(Items);
              printTable(
                ["NAME", "ROLES", "NAMESPACE", "DISABLED"],
                Items.map((u) => [u.Name, u.Roles.join(","), u.Namespace, String(u.Disabled)]),
              );
            },
          )
          .command(
            "delete <name>",
            "delete a user (its tokens stay valid until they expire: revoke them)",
            (y) => y.positional("name", { type: "string", demandOption: true }),
            async (argv: Args) => {
              await withClient(argv, (c) =>
                c.delete(`/api/v1/auth/users/${encodeURIComponent(String(argv.name))}`),
              );
              process.stdout.write(`user ${argv.name} deleted\n`);
            },
          )
          .demandCommand(1, "name a subcommand; see shoal auth user --help"),
      )
      .command("role", "roles (admin)", (y) =>
        y
          .command(
            "list",
            "every role with its actions and scope",
            () => {},
            async (argv: Args) => {
              const { Items } = await withClient(argv, (c) =>
                c.get<{ Items: { name: string; actions: string[]; scope?: string; description: string }[] }>(
                  "/api/v1/auth/roles",
                ),
              );
              if (json(argv)) return printJson(Items);
              printTable(
                ["NAME", "SCOPE", "ACTIONS"],
                Items.map((r) => [r.name, r.scope ?? "cluster", r.actions.join(",")]),
              );
            },
          )
          .command(
            "add <name>",
            "define a role",
            (y) =>
              y
                .positional("name", { type: "string", demandOption: true })
                .option("allow", {
                  type: "string",
                  array: true,
                  demandOption: true,
                  describe: "action(s) it grants, e.g. job:submit node:approve, or *",
                })
                .option("scope", {
                  choices: ["cluster", "namespace", "own"] as const,
                  default: "cluster" as const,
                  describe: "where the actions apply",
                })
                .option("description", { type: "string", default: "" }),
            async (argv: Args) => {
              const r = await withClient(argv, (c) =>
                c.post<{ Role: unknown }>("/api/v1/auth/roles", {
                  Name: argv.name,
                  Actions: argv.allow,
                  Scope: argv.scope,
                  Description: argv.description,
                }),
              );
              if (json(argv)) printJson(r.Role);
              else process.stdout.write(`role ${argv.name} added\n`);
            },
          )
          .demandCommand(1, "name a subcommand; see shoal auth role --help"),
      )
      .command("token", "API tokens", (y) =>
        y
          .command(
            "revoke [token]",
            "revoke a token (or --jti ID) on every orchestrator sharing the store",
            (y) =>
              y
                .positional("token", { type: "string", describe: "the token itself" })
                .option("jti", { type: "string", describe: "the token's id (admins)" }),
            async (argv: Args) => {
              if (!argv.token === !argv.jti) {
                throw new ShoalError(CORE_CODES.SHOAL_USAGE, "give a TOKEN or --jti ID", {
                  fix: "shoal auth token revoke TOKEN, or shoal auth token revoke --jti ID",
                });
              }
              const body = argv.token ? { Token: argv.token } : { JTI: argv.jti };
              const r = await withClient(argv, (c) =>
                c.request<{ JTI: string }>("DELETE", "/api/v1/auth/tokens", { body }),
              );
              if (json(argv)) printJson(r);
              else process.stdout.write(`token ${r.JTI} revoked\n`);
            },
          )
          .demandCommand(1, "name a subcommand; see shoal auth token --help"),
      )
      .demandCommand(1, "name a subcommand; see shoal auth --help");
  });
