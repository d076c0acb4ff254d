import type { KeyObject } from "node:crypto";
import os from "node:os";
import path from "node:path";
import { answerChallenge, type ClientKeyChallenge, type MethodDescription } from "../auth/index.js";
import { CORE_CODES, ShoalError } from "../core/index.js";
import { loadOrCreateKeyFile } from "../pki/index.js";
import { ApiClient, type ApiClientOptions } from "./api-client.js";
import { type StoredToken, TokenStore, tokenStoreKey } from "./token-store.js";

/** The client key of the clientKey method (Bacalhau's `user_id.pem`), created on first use. */
export const DEFAULT_USER_KEY_FILE = path.join(os.homedir(), ".shoal", "user_id.pem");

/** What `POST /api/v1/auth/{method}` answers. */
export interface TokenReply {
  Token: string;
  ExpiresAt: string;
  Subject: string;
  Roles: string[];
  Namespace: string;
  Method: string;
  JTI: string;
}

/** How to log in; anything missing is asked for (password on a TTY) or read from the environment. */
export interface LoginOptions {
  method?: string;
  user?: string;
  /** Ask for a shorter-lived token. */
  ttlSeconds?: number;
  /** Reads a secret without echo; absent means non-interactive (environment only). */
  prompt?: (question: string) => Promise<string>;
  /** @default process.env (SHOAL_PASSWORD, SHOAL_USER, SHOAL_SHARED_SECRET) */
  env?: NodeJS.ProcessEnv;
  /** @default DEFAULT_USER_KEY_FILE */
  keyFile?: string;
}

/**
 * Logs in to the API at `client.url` and returns the token reply. The method
 * is the one asked for, else password when a user is named, else clientKey
 * when the API offers it (the key `~/.shoal/user_id.pem` is made on first
 * use, as Bacalhau does), else password.
 */
export async function login(client: ApiClient, o: LoginOptions = {}): Promise<TokenReply> {
  const env = o.env ?? process.env;
  const offered = (await client.get<{ Methods: MethodDescription[] }>("/api/v1/auth")).Methods.map(
    (m) => m.name as string,
  );
  const user = o.user ?? env.SHOAL_USER;
  const method =
    o.method ??
    (user
      ? "password"
      : offered.includes("clientKey")
        ? "clientKey"
        : offered.find((m) => m !== "anonymous"));
  if (!method || !offered.includes(method)) {
    throw new ShoalError(
      CORE_CODES.SHOAL_USAGE,
      `the API at ${client.url} does not offer ${method ?? "a login"}`,
      {
        fix: `use --method with one of: ${offered.join(", ")}`,
      },
    );
  }
  const ttl = o.ttlSeconds ? { TTLSeconds: o.ttlSeconds } : {};
  const post = (body: Record<string, unknown>) =>
    client.post<TokenReply>(`/api/v1/auth/${method}`, { ...body, ...ttl });
  switch (method) {
    case "password": {
      if (!user) {
        throw new ShoalError(CORE_CODES.SHOAL_USAGE, "password login needs a user name", {
          fix: "give --user NAME (or set SHOAL_USER)",
        });
      }
      const password = env.SHOAL_PASSWORD || (await ask(o, `password for ${user}: `, "SHOAL_PASSWORD"));
      return post({ username: user, password });
    }
    case "sharedSecret":
      return post({
        secret: env.SHOAL_SHARED_SECRET || (await ask(o, "shared secret: ", "SHOAL_SHARED_SECRET")),
      });
    case "clientKey": {
      const key = await userKey(o.keyFile ?? DEFAULT_USER_KEY_FILE);
      const { Challenge } = await client.post<{ Challenge: ClientKeyChallenge }>(
        "/api/v1/auth/clientKey",
        {},
      );
      return post({ ...answerChallenge(Challenge, key) });
    }
    default:
      // mtls: the client certificate travels in the TLS handshake (--cert/--key).
      return post({});
  }
}

async function ask(o: LoginOptions, question: string, envName: string): Promise<string> {
  if (!o.prompt) {
    throw new ShoalError(
      CORE_CODES.SHOAL_USAGE,
      `no terminal to ask for the ${question.replace(/: $/, "")}`,
      {
        fix: `set ${envName}, or run \`shoal auth login\` at a terminal`,
      },
    );
  }
  return o.prompt(question);
}

/** The client key at `file`, created (EC P-256, 0600) if there is none. */
export async function userKey(file: string): Promise<KeyObject> {
  return loadOrCreateKeyFile(file);
}

/** The token store entry for a login reply. */
export function storedToken(reply: TokenReply): StoredToken {
  return { token: reply.Token, expiresAt: reply.ExpiresAt, method: reply.Method, user: reply.Subject };
}

/**
 * The token provider of the CLI's API clients: the override (SHOAL_TOKEN,
 * SHOAL_TOKEN_FILE) or the stored token for the URL; when there is none, or
 * it is about to expire, it logs in again without asking — with the method
 * that obtained the last one when that needs no typing (clientKey, or
 * password/sharedSecret from the environment), else with the client key when
 * the API offers it. Without any, requests go out without a token (anonymous).
 */
export function sessionTokenProvider(
  options: ApiClientOptions,
  store = new TokenStore(),
): () => Promise<string | undefined> {
  let current: Promise<string | undefined> | undefined;
  return () => {
    current ??= (async () => {
      const client = await ApiClient.create({ ...options, token: undefined, warn: () => {} });
      try {
        const valid = await store.get(client.url);
        if (valid) return valid.token;
        const last = (await store.list())[tokenStoreKey(client.url)];
        const reply = await renew(client, last).catch((err) => {
          // An API that offers no non-interactive login is used anonymously; it says 401 if that is not enough.
          if (err instanceof ShoalError && err.code === CORE_CODES.SHOAL_USAGE) return undefined;
          throw err;
        });
        if (!reply) return undefined;
        await store.set(client.url, storedToken(reply));
        return reply.Token;
      } finally {
        client.close();
      }
    })();
    return current;
  };
}

async function renew(client: ApiClient, last: StoredToken | undefined): Promise<TokenReply | undefined> {
  if (last && last.method !== "clientKey" && last.method !== "mtls") {
    return login(client, { method: last.method, ...(last.user ? { user: last.user } : {}) });
  }
  return login(client, last ? { method: "clientKey" } : {});
}
