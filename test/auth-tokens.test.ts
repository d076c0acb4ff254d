import "reflect-metadata";
import {
  createHmac,
  createPublicKey,
  sign as cryptoSign,
  generateKeyPairSync,
  type KeyObject,
} from "node:crypto";
import { SignJWT } from "jose";
import t from "tap";
import {
  AUTH_CODES,
  currentPrincipal,
  MemoryAuthStore,
  type Principal,
  RevocationList,
  TokenService,
  type TokenServiceOptions,
} from "../auth/index.js";

const alice: Principal = {
  id: "alice",
  kind: "user",
  roles: ["submitter"],
  namespace: "team-a",
  method: "password",
};
const ISSUER = "spiffe://shoal.local/orchestrator/orch-1";
const AUDIENCE = "https://orch.example:1234";
const ec = (namedCurve: string) => generateKeyPairSync("ec", { namedCurve });

/** A JWT for ISSUER and AUDIENCE as a forger (or a test of odd claims) makes it, valid for a minute from `ms`. */
function craft(
  key: KeyObject,
  header: { alg: string; typ: string; kid?: string },
  claims: Record<string, unknown>,
  o: { sub: string; jti: string; ms: number },
): Promise<string> {
  return new SignJWT(claims)
    .setProtectedHeader(header)
    .setIssuer(ISSUER)
    .setAudience(AUDIENCE)
    .setSubject(o.sub)
    .setIssuedAt(o.ms / 1000)
    .setExpirationTime(o.ms / 1000 + 60)
    .setJti(o.jti)
    .sign(key);
}

/** A service with a steppable clock; `now` is shared with its revocation list. */
async function setup(overrides: Partial<TokenServiceOptions> = {}) {
  const clock = { ms: Date.UTC(2030, 0, 1) };
  const now = () => clock.ms;
  const store = new MemoryAuthStore();
  const revocations = new RevocationList(store, now);
  const { privateKey, publicKey } = ec("prime256v1");
  const service = await TokenService.create({
    signingKey: privateKey,
    issuer: ISSUER,
    audience: AUDIENCE,
    revocations,
    now,
    ...overrides,
  });
  return { service, clock, store, revocations, privateKey, publicKey };
}

const b64 = (v: unknown) => Buffer.from(JSON.stringify(v)).toString("base64url");

t.test("a fresh token verifies and carries the claims", async (t) => {
  const { service, clock } = await setup();
  const { token, claims } = await service.issue(alice);
  t.equal(claims.exp - claims.iat, 24 * 3600, "default TTL 24 h");
  t.match(claims, {
    iss: ISSUER,
    aud: AUDIENCE,
    sub: "alice",
    roles: ["submitter"],
    ns: "team-a",
    method: "password",
  });
  t.match(claims.jti, /^[A-Za-z0-9_-]{22}$/);
  const header = JSON.parse(Buffer.from(token.split(".")[0]!, "base64url").toString());
  t.match(header, { alg: "ES256", typ: "at+jwt" });
  const verified = await service.verify(token);
  t.same(verified.principal, alice);
  t.equal(verified.claims.iat, clock.ms / 1000);
});

t.test("a login may ask for a shorter lifetime, never a longer one", async (t) => {
  const { service } = await setup({ ttlSeconds: 3600 });
  t.equal(
    (await service.issue(alice, { ttlSeconds: 600 })).claims.exp - (await service.issue(alice)).claims.iat,
    600,
  );
  const long = await service.issue(alice, { ttlSeconds: 7 * 24 * 3600 });
  t.equal(long.claims.exp - long.claims.iat, 3600);
});

t.test("an expired token is refused", async (t) => {
  const { service, clock } = await setup({ ttlSeconds: 60 });
  const { token } = await service.issue(alice);
  clock.ms += 60_000 + 30_000 + 1000; // past exp and the 30 s clock tolerance
  await t.rejects(service.verify(token), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_EXPIRED, status: 401 });
});

t.test("a revoked token is refused on the next verification, here and on another orchestrator", async (t) => {
  const { service, store, privateKey, clock } = await setup();
  const { token, claims } = await service.issue(alice);
  await service.verify(token);
  // A second orchestrator sharing the store (KV) and the key, started before the revocation.
  const otherRevocations = new RevocationList(store, () => clock.ms);
  const other = await TokenService.create({
    signingKey: privateKey,
    issuer: ISSUER,
    audience: AUDIENCE,
    revocations: otherRevocations,
    now: () => clock.ms,
  });
  await other.verify(token);

  await service.revokeToken(token);
  await t.rejects(service.verify(token), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_REVOKED });
  // The watcher pushes the store's change to the other orchestrator.
  const record = await store.revokedTokens.get(claims.jti);
  t.equal(record?.expiresAt, claims.exp);
  otherRevocations.apply({ type: "revoked", record: record! });
  await t.rejects(other.verify(token), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_REVOKED });
  // A third starting later loads it from the store.
  const late = new RevocationList(store, () => clock.ms);
  await late.refresh();
  t.ok(late.isRevoked(claims.jti));
  // Other tokens are unaffected.
  await service.verify((await service.issue(alice)).token);
});

t.test(
  "revoking by jti works and old revocations are pruned from the store once the token expired",
  async (t) => {
    const { service, store, revocations, clock } = await setup({ ttlSeconds: 60 });
    const { token, claims } = await service.issue(alice);
    await service.revokeJti(claims.jti);
    await t.rejects(service.verify(token), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_REVOKED });
    clock.ms += 10 * 60_000;
    await revocations.refresh();
    t.equal(revocations.size, 0);
    t.same(await store.revokedTokens.list(), []);
  },
);

t.test("a tampered token is refused", async (t) => {
  const { service } = await setup();
  const { token } = await service.issue(alice);
  const [h, p, s] = token.split(".") as [string, string, string];
  const payload = JSON.parse(Buffer.from(p, "base64url").toString());
  const elevated = `${h}.${b64({ ...payload, roles: ["admin"] })}.${s}`;
  await t.rejects(service.verify(elevated), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_INVALID });
  // One bit of the signature itself: rewriting its last characters could change only the
  // base64url padding bits, which decode to the same signature (about 1 run in 250).
  const signature = Buffer.from(s, "base64url");
  signature[0]! ^= 1;
  const flipped = `${h}.${p}.${signature.toString("base64url")}`;
  await t.rejects(service.verify(flipped), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_INVALID });
  await t.rejects(service.verify("not.a.jwt"), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_INVALID });
});

t.test("alg none is refused", async (t) => {
  const { service } = await setup();
  const { token } = await service.issue(alice);
  const [h, p] = token.split(".") as [string, string, string];
  const header = JSON.parse(Buffer.from(h, "base64url").toString());
  const unsigned = `${b64({ ...header, alg: "none" })}.${p}.`;
  await t.rejects(service.verify(unsigned), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_ALGORITHM });
});

t.test("HS256 signed with the public key (algorithm confusion) is refused", async (t) => {
  const { service, publicKey } = await setup();
  const { token } = await service.issue(alice);
  const [h, p] = token.split(".") as [string, string, string];
  const header = JSON.parse(Buffer.from(h, "base64url").toString());
  for (const secret of [
    publicKey.export({ type: "spki", format: "pem" }),
    publicKey.export({ type: "spki", format: "der" }),
  ]) {
    const signingInput = `${b64({ ...header, alg: "HS256" })}.${p}`;
    const mac = createHmac("sha256", secret).update(signingInput).digest("base64url");
    await t.rejects(service.verify(`${signingInput}.${mac}`), {
      code: AUTH_CODES.SHOAL_AUTH_TOKEN_ALGORITHM,
    });
  }
});

t.test("tokens signed with another key, curve or algorithm are refused", async (t) => {
  const { service, clock } = await setup();
  const sign = (key: KeyObject, alg: string, kid?: string) =>
    craft(
      key,
      { alg, typ: "at+jwt", ...(kid ? { kid } : {}) },
      { roles: ["admin"], ns: "default", method: "password" },
      { sub: "mallory", jti: "j", ms: clock.ms },
    );
  // Another P-256 key: unknown kid, or the real kid with a wrong signature.
  const { token } = await service.issue(alice);
  const realKid = JSON.parse(Buffer.from(token.split(".")[0]!, "base64url").toString()).kid as string;
  const stranger = ec("prime256v1").privateKey;
  await t.rejects(service.verify(await sign(stranger, "ES256", "other")), {
    code: AUTH_CODES.SHOAL_AUTH_TOKEN_UNKNOWN_KEY,
  });
  await t.rejects(service.verify(await sign(stranger, "ES256", realKid)), {
    code: AUTH_CODES.SHOAL_AUTH_TOKEN_INVALID,
  });
  // P-384 (ES384) and secp256k1 (ES256K) keys.
  await t.rejects(service.verify(await sign(ec("secp384r1").privateKey, "ES384", realKid)), {
    code: AUTH_CODES.SHOAL_AUTH_TOKEN_ALGORITHM,
  });
  // jose will not make ES256K; sign it by hand.
  const input = `${b64({ alg: "ES256K", typ: "at+jwt", kid: realKid })}.${token.split(".")[1]}`;
  const k1 = cryptoSign("sha256", Buffer.from(input), {
    key: ec("secp256k1").privateKey,
    dsaEncoding: "ieee-p1363",
  });
  await t.rejects(service.verify(`${input}.${k1.toString("base64url")}`), {
    code: AUTH_CODES.SHOAL_AUTH_TOKEN_ALGORITHM,
  });
});

t.test("wrong audience, wrong issuer and wrong typ are refused", async (t) => {
  const { service, privateKey, revocations, clock } = await setup();
  const now = () => clock.ms;
  const { token } = await service.issue(alice);
  const otherApi = await TokenService.create({
    signingKey: privateKey,
    issuer: ISSUER,
    audience: "https://elsewhere:1234",
    revocations,
    now,
  });
  await t.rejects(otherApi.verify(token), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_AUDIENCE });
  const otherIssuer = await TokenService.create({
    signingKey: privateKey,
    issuer: "spiffe://shoal.local/orchestrator/orch-2",
    audience: AUDIENCE,
    revocations,
    now,
  });
  await t.rejects(otherIssuer.verify(token), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_AUDIENCE });
  // A JWS of another kind (e.g. a fabric envelope) signed by the same key is not a token.
  const envelope = await craft(
    privateKey,
    { alg: "ES256", typ: "shoal-envelope" },
    { roles: [], ns: "default", method: "password" },
    { sub: "alice", jti: "x", ms: clock.ms },
  );
  await t.rejects(service.verify(envelope), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_INVALID });
});

t.test("a token of ours whose user id is not a string is refused as malformed", async (t) => {
  const { service, privateKey, clock } = await setup();
  const { token } = await service.issue(alice);
  const kid = JSON.parse(Buffer.from(token.split(".")[0]!, "base64url").toString()).kid as string;
  const odd = await craft(
    privateKey,
    { alg: "ES256", typ: "at+jwt", kid },
    { roles: ["submitter"], ns: "team-a", method: "password", uid: 7 },
    { sub: "alice", jti: "j-uid", ms: clock.ms },
  );
  await t.rejects(service.verify(odd), { code: AUTH_CODES.SHOAL_AUTH_TOKEN_INVALID });
});

t.test("a verification key list lets tokens of a previous key verify during rotation", async (t) => {
  const { service, privateKey, revocations, clock } = await setup();
  const { token } = await service.issue(alice);
  const next = ec("prime256v1").privateKey;
  const rotated = await TokenService.create({
    signingKey: next,
    verificationKeys: [createPublicKey(privateKey)],
    issuer: ISSUER,
    audience: AUDIENCE,
    revocations,
    now: () => clock.ms,
  });
  t.equal((await rotated.verify(token)).principal.id, "alice");
  await t.rejects(service.verify((await rotated.issue(alice)).token), {
    code: AUTH_CODES.SHOAL_AUTH_TOKEN_UNKNOWN_KEY,
  });
});

t.test("only EC P-256 signing keys are accepted", async (t) => {
  const store = new MemoryAuthStore();
  const base = { issuer: ISSUER, audience: AUDIENCE, revocations: new RevocationList(store) };
  await t.rejects(TokenService.create({ ...base, signingKey: ec("secp384r1").privateKey }), {
    code: AUTH_CODES.SHOAL_AUTH_KEY_UNSUPPORTED,
  });
  const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey;
  await t.rejects(TokenService.create({ ...base, signingKey: rsa }), {
    code: AUTH_CODES.SHOAL_AUTH_KEY_UNSUPPORTED,
  });
  const pem = ec("prime256v1").privateKey.export({ type: "pkcs8", format: "pem" }).toString();
  t.ok(await TokenService.create({ ...base, signingKey: pem }), "PKCS#8 PEM works");
});

t.test("a registered user's token stands for the user as it is now", async (t) => {
  const { service, clock } = await setup();
  const createdAt = new Date(clock.ms - 60_000).toISOString();
  const user = { name: "alice", roles: ["submitter"], namespace: "team-a", createdAt, disabled: false };
  const { claims, principal } = await service.verify((await service.issue(alice)).token);
  /** The principal the token stands for when its user is `now`. */
  const asNow = (now: typeof user | undefined) => currentPrincipal(claims, principal, () => now);
  t.same(await asNow(user), alice, "as the token says while the user is unchanged");
  t.same(
    await asNow({ ...user, roles: ["reader"], namespace: "team-b" }),
    { ...alice, roles: ["reader"], namespace: "team-b" },
    "with the user's roles and namespace of now",
  );
  await t.rejects(asNow(undefined), { code: "SHOAL_AUTH_TOKEN_REVOKED" }, "deleted");
  await t.rejects(
    asNow({ ...user, createdAt: new Date(clock.ms + 1000).toISOString() }),
    { code: "SHOAL_AUTH_TOKEN_REVOKED" },
    "deleted and added again after the token was issued",
  );
  await t.rejects(asNow({ ...user, disabled: true }), { code: "SHOAL_AUTH_USER_DISABLED" }, "disabled");

  // A user with a random id: its tokens name it, so another user of the name is told apart
  // even within the second the token was issued.
  const v = await service.verify((await service.issue({ ...alice, uid: "u-1" })).token);
  t.equal(v.claims.uid, "u-1", "the token carries the user's id");
  const sameSecond = new Date(clock.ms).toISOString();
  const withId = (uid: string | undefined) =>
    currentPrincipal(v.claims, v.principal, () => ({ ...user, createdAt: sameSecond, uid }));
  t.same(await withId("u-1"), { ...alice, uid: "u-1" }, "the same user");
  await t.rejects(withId("u-2"), { code: "SHOAL_AUTH_TOKEN_REVOKED" }, "added again in the same second");
  t.same(
    await withId(undefined),
    { ...alice, uid: "u-1" },
    "a user stored without an id (before ids): judged by time",
  );
  t.same(
    await currentPrincipal(claims, principal, () => ({ ...user, uid: "u-3" })),
    alice,
    "a token issued without an id (before ids): judged by time",
  );
  for (const other of [
    { ...alice, id: "shared-secret", roles: ["operator"], method: "sharedSecret" as const },
    { ...alice, id: "client:ab", kind: "client" as const, roles: [], method: "clientKey" as const },
  ]) {
    const v = await service.verify((await service.issue(other)).token);
    const looked: string[] = [];
    const lookup = (name: string) => {
      looked.push(name);
      return undefined;
    };
    t.same(
      await currentPrincipal(v.claims, v.principal, lookup),
      other,
      `${other.method}: no registered user`,
    );
    t.same(looked, [], "so none is looked up");
  }
});
