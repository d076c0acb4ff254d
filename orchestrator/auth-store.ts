import { JetStreamApiCodes, JetStreamApiError, type JetStreamClient } from "@nats-io/jetstream";
import { type KV, type KvEntry, Kvm, KvWatchInclude } from "@nats-io/kv";
import type {
  AuthCollection,
  AuthStore,
  NonceRecord,
  RevocationEvent,
  RevokedToken,
  RoleRecord,
  TokenKeyRecord,
  UserRecord,
} from "../auth/index.js";
import type { Logger } from "../core/index.js";

/** The KV buckets of the auth data, shared by every orchestrator on the same JetStream. */
export const AUTH_BUCKETS = {
  users: "shoal-auth-users",
  roles: "shoal-auth-roles",
  revokedTokens: "shoal-auth-revoked",
  nonces: "shoal-auth-nonces",
  tokenKeys: "shoal-auth-token-keys",
} as const;

/** Nonces live 60 s; the bucket drops what was never used a little later. */
const NONCE_BUCKET_TTL_MS = 5 * 60_000;

/**
 * One auth collection straight over a KV bucket: no memory mirror, because
 * other orchestrators write the same keys (a login, a revocation, a new user
 * on one is at once visible on all). The hot path (token verification,
 * authorization) reads memory kept current by {@link KvAuthStore.watch}.
 */
class KvCollection<T> implements AuthCollection<T> {
  constructor(readonly kv: KV) {}

  async get(key: string): Promise<T | undefined> {
    const e = await this.kv.get(key);
    return e && e.operation === "PUT" && e.length > 0 ? e.json<T>() : undefined;
  }

  async put(key: string, value: T): Promise<void> {
    await this.kv.put(key, JSON.stringify(value));
  }

  async create(key: string, value: T): Promise<boolean> {
    try {
      await this.kv.create(key, JSON.stringify(value));
      return true;
    } catch (err) {
      // KV refuses create when a live value exists. The stream's leader says so ("wrong last
      // sequence") even when a replica behind it, which may answer the get, does not have
      // the value yet: two orchestrators of a cluster creating the first admin at once.
      if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamWrongLastSequence)
        return false;
      // Anything else is a real failure, unless the value is there after all.
      if ((await this.get(key)) !== undefined) return false;
      throw err;
    }
  }

  async delete(key: string): Promise<void> {
    await this.kv.delete(key);
  }

  async take(key: string): Promise<T | undefined> {
    const e = await this.kv.get(key);
    if (e?.operation !== "PUT" || e.length === 0) return undefined;
    try {
      // Only the caller whose delete lands on exactly this revision gets the value.
      await this.kv.delete(key, { previousSeq: e.revision });
    } catch {
      return undefined;
    }
    return e.json<T>();
  }

  async list(): Promise<Array<[string, T]>> {
    const keys: string[] = [];
    for await (const k of await this.kv.keys()) keys.push(k);
    const values = await Promise.all(keys.map(async (k) => [k, await this.get(k)] as const));
    return values
      .filter((v): v is readonly [string, Awaited<T>] => v[1] !== undefined)
      .map(([k, v]) => [k, v]);
  }
}

/** What {@link KvAuthStore.watch} tells the token service and the authorizer about changes made anywhere. */
export interface AuthStoreListeners {
  revocation: (event: RevocationEvent) => void;
  /** Called with every role record after any role changes. */
  roles: (roles: RoleRecord[]) => void;
  /** A user was added or changed (`user`), or deleted (undefined). */
  user: (name: string, user: UserRecord | undefined) => void;
}

/** An {@link AuthStore} that tells of changes made by any orchestrator. */
export interface WatchableAuthStore extends AuthStore {
  watch(listeners: AuthStoreListeners): Promise<void>;
}

/**
 * The {@link AuthStore} over JetStream KV: users, roles, revoked token ids,
 * client-key nonces and the orchestrators' token verification keys, each its
 * own bucket, so every orchestrator sharing the JetStream sees the same
 * users, refuses the same revoked tokens and accepts each other's tokens.
 */
export class KvAuthStore implements WatchableAuthStore {
  readonly #stops: (() => void)[] = [];

  private constructor(
    readonly users: KvCollection<UserRecord>,
    readonly roles: KvCollection<RoleRecord>,
    readonly revokedTokens: KvCollection<RevokedToken>,
    readonly nonces: KvCollection<NonceRecord>,
    readonly tokenKeys: KvCollection<TokenKeyRecord>,
    readonly log: Logger,
  ) {}

  /**
   * Opens (creating if needed) the buckets; new buckets get `replicas`
   * copies (a bucket that exists keeps its own setting).
   */
  static async open(
    js: JetStreamClient,
    log: Logger,
    options: { replicas?: number } = {},
  ): Promise<KvAuthStore> {
    const kvm = new Kvm(js);
    const base = { history: 1, replicas: options.replicas ?? 1 };
    const [users, roles, revoked, nonces, tokenKeys] = await Promise.all([
      kvm.create(AUTH_BUCKETS.users, base),
      kvm.create(AUTH_BUCKETS.roles, base),
      kvm.create(AUTH_BUCKETS.revokedTokens, base),
      kvm.create(AUTH_BUCKETS.nonces, { ...base, ttl: NONCE_BUCKET_TTL_MS }),
      kvm.create(AUTH_BUCKETS.tokenKeys, base),
    ]);
    return new KvAuthStore(
      new KvCollection(users),
      new KvCollection(roles),
      new KvCollection(revoked),
      new KvCollection(nonces),
      new KvCollection(tokenKeys),
      log,
    );
  }

  /**
   * Pushes revocations, role and user changes written by any orchestrator
   * (this one included) to `listeners`, until {@link close}. Resolves once the
   * watchers are subscribed, so a change made after it is never missed.
   */
  async watch(listeners: AuthStoreListeners): Promise<void> {
    await this.#watch(this.revokedTokens, "revocation", (e) => {
      if (e.operation === "PUT" && e.length > 0) {
        listeners.revocation({ type: "revoked", record: e.json<RevokedToken>() });
      } else if (e.operation !== "PUT") {
        listeners.revocation({ type: "removed", jti: e.key });
      }
    });
    await this.#watch(this.roles, "role", async () => {
      listeners.roles((await this.roles.list()).map(([, r]) => r));
    });
    await this.#watch(this.users, "user", (e) => {
      listeners.user(e.key, e.operation === "PUT" && e.length > 0 ? e.json<UserRecord>() : undefined);
    });
  }

  /** Calls `each`, in order, with every change to `collection` made after it resolves, until {@link close}. */
  async #watch<T>(
    collection: KvCollection<T>,
    what: string,
    each: (entry: KvEntry) => void | Promise<void>,
  ): Promise<void> {
    const watcher = await collection.kv.watch({ include: KvWatchInclude.UpdatesOnly });
    this.#stops.push(() => watcher.stop());
    void (async () => {
      for await (const e of watcher) await each(e);
    })().catch((err) => this.log.error({ err }, `${what} watcher stopped`));
  }

  close(): void {
    for (const stop of this.#stops.splice(0)) stop();
  }
}
