import "reflect-metadata";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import t from "tap";
import {
  AUTH_CODES,
  type AuthError,
  Authenticator,
  bootstrapAdmin,
  HashGate,
  hashPassword,
  isPasswordHash,
  LoginRateLimiter,
  MemoryAuthStore,
  RateLimitedError,
  UserDirectory,
  verifyPassword,
} from "../auth/index.js";

const HASH = { logN: 14 }; // fast for tests; production default is 17
const PASSWORD = "correct horse battery staple";

async function setup(limits = {}) {
  const clock = { ms: 1_000_000 };
  const store = new MemoryAuthStore();
  const directory = new UserDirectory(store, { hash: HASH });
  await directory.ensureBuiltinRoles();
  await directory.addUser({ name: "alice", password: PASSWORD, roles: ["submitter"], namespace: "team-a" });
  const limiter = new LoginRateLimiter(limits, () => clock.ms);
  const auth = new Authenticator({
    methods: ["password", "sharedSecret"],
    directory,
    limiter,
    hash: HASH,
    sharedSecrets: [{ secret: "s3cret-for-ci-runners", role: "submitter", name: "ci" }],
  });
  return { store, directory, auth, clock, limiter };
}

t.test("scrypt hashes have the PHC format, a per-user salt, and verify", async (t) => {
  const a = await hashPassword(PASSWORD, HASH);
  const b = await hashPassword(PASSWORD, HASH);
  t.match(a, /^\$scrypt\$ln=14,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$/);
  t.not(a, b, "fresh salt each time");
  t.ok(isPasswordHash(a));
  t.equal(await verifyPassword(PASSWORD, a), true);
  t.equal(await verifyPassword(`${PASSWORD}!`, a), false);
  t.match(await hashPassword(PASSWORD), /^\$scrypt\$ln=17,/, "default cost is OWASP's N=2^17");
  await t.rejects(verifyPassword(PASSWORD, "$2b$10$bcrypt-is-not-ours"), {
    code: AUTH_CODES.SHOAL_AUTH_PASSWORD_HASH,
  });
  // A stored hash asking for an absurd cost is refused rather than run.
  await t.rejects(verifyPassword(PASSWORD, a.replace("ln=14", "ln=30")), {
    code: AUTH_CODES.SHOAL_AUTH_PASSWORD_HASH,
  });
});

t.test("password login: right password, wrong password, unknown user, disabled user", async (t) => {
  const { auth, directory } = await setup();
  t.same(await auth.password({ username: "alice", password: PASSWORD }), {
    id: "alice",
    kind: "user",
    roles: ["submitter"],
    namespace: "team-a",
    method: "password",
    uid: (await directory.getUser("alice"))?.uid,
  });
  await t.rejects(auth.password({ username: "alice", password: "wrong password!" }), {
    code: AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS,
    status: 401,
  });
  await t.rejects(auth.password({ username: "mallory", password: PASSWORD }), {
    code: AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS,
  });
  await directory.setDisabled("alice", true);
  await t.rejects(auth.password({ username: "alice", password: PASSWORD }), {
    code: AUTH_CODES.SHOAL_AUTH_USER_DISABLED,
  });
});

t.test("failed logins lock out the user, then the address, with a retry-after", async (t) => {
  const { auth, clock } = await setup({ maxFailuresPerUser: 3, maxFailuresPerAddress: 5, lockoutMs: 60_000 });
  const from = { address: "192.0.2.7" };
  for (let i = 0; i < 3; i++) {
    await t.rejects(auth.password({ username: "alice", password: "guess number one" }, from), {
      code: AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS,
    });
  }
  const locked = await auth.password({ username: "alice", password: PASSWORD }, from).catch((e) => e);
  t.ok(locked instanceof RateLimitedError);
  t.match(locked, {
    code: AUTH_CODES.SHOAL_AUTH_RATE_LIMITED,
    status: 429,
    limitedBy: "user",
    retryAfterSeconds: 60,
  });
  clock.ms += 30_000;
  await t.rejects(auth.password({ username: "alice", password: PASSWORD }, { address: "198.51.100.1" }), {
    code: AUTH_CODES.SHOAL_AUTH_RATE_LIMITED,
    retryAfterMs: 30_000,
  });
  clock.ms += 30_000;
  t.equal(
    (await auth.password({ username: "alice", password: PASSWORD }, { address: "198.51.100.1" })).id,
    "alice",
  );
  // The address guessing other users' passwords is locked out too (2 more failures reach 5).
  for (const user of ["bob", "carol"]) {
    await t.rejects(auth.password({ username: user, password: "guess number two" }, from), {
      code: AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS,
    });
  }
  await t.rejects(auth.password({ username: "dave", password: "guess number three" }, from), {
    code: AUTH_CODES.SHOAL_AUTH_RATE_LIMITED,
    limitedBy: "address",
  });
});

t.test("IPv6 addresses of one /64 share the address lockout", async (t) => {
  const { auth } = await setup({ maxFailuresPerAddress: 2 });
  for (const [username, address] of [
    ["u1", "2001:db8:1:2::1"],
    ["u2", "2001:db8:1:2::2"],
  ] as const) {
    await t.rejects(auth.password({ username, password: "a wrong guess here" }, { address }), {
      code: AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS,
    });
  }
  await t.rejects(
    auth.password({ username: "u3", password: "a wrong guess here" }, { address: "2001:db8:1:2::3" }),
    {
      code: AUTH_CODES.SHOAL_AUTH_RATE_LIMITED,
      limitedBy: "address",
    },
  );
  await t.rejects(
    auth.password({ username: "u4", password: "a wrong guess here" }, { address: "2001:db8:1:3::1" }),
    { code: AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS },
    "another /64 is another client",
  );
});

t.test(
  "concurrent guesses count against the lockout; the server checks a few passwords at a time",
  async (t) => {
    const { auth, directory } = await setup({ maxFailuresPerAddress: 3 });
    const from = { address: "192.0.2.9" };
    const codes = await Promise.all(
      ["u1", "u2", "u3", "u4", "u5", "u6"].map((username) =>
        auth.password({ username, password: "a wrong guess here" }, from).catch((e: AuthError) => e.code),
      ),
    );
    t.equal(
      codes.filter((c) => c === AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS).length,
      3,
      "as many run as the lockout allows",
    );
    t.equal(
      codes.filter((c) => c === AUTH_CODES.SHOAL_AUTH_RATE_LIMITED).length,
      3,
      "the rest are refused at once, before any hash",
    );

    // Server-wide: one check at a time and one waiting; a third at once is refused, whoever sends it.
    const gated = new Authenticator({
      methods: ["password"],
      directory,
      hash: HASH,
      hashGate: new HashGate(1, 1),
    });
    const outcomes = await Promise.all(
      ["a", "b", "c"].map((username, i) =>
        gated.password({ username, password: "a wrong guess here" }, { address: `198.51.100.${i}` }).then(
          () => undefined,
          (e: AuthError) => e,
        ),
      ),
    );
    t.equal(outcomes.filter((e) => e?.code === AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS).length, 2);
    t.match(
      outcomes.find((e) => e?.code === AUTH_CODES.SHOAL_AUTH_RATE_LIMITED),
      { limitedBy: "server", message: /logins under way/ },
    );
    t.equal(
      (await gated.password({ username: "alice", password: PASSWORD })).id,
      "alice",
      "the gate frees its places",
    );
  },
);

t.test("the limiter doubles repeated lockouts and forgives after a quiet window", async (t) => {
  const clock = { ms: 0 };
  const limiter = new LoginRateLimiter(
    { maxFailuresPerUser: 2, lockoutMs: 1000, windowMs: 10_000 },
    () => clock.ms,
  );
  const u = { user: "x" };
  const lockedFor = () => {
    try {
      limiter.check(u);
      return 0;
    } catch (err) {
      return (err as RateLimitedError).retryAfterMs;
    }
  };
  limiter.recordFailure(u);
  t.equal(lockedFor(), 0, "one failure is allowed");
  limiter.recordFailure(u);
  t.equal(lockedFor(), 1000);
  clock.ms += 1000;
  limiter.recordFailure(u);
  limiter.recordFailure(u);
  t.equal(lockedFor(), 2000, "second lockout doubles");
  clock.ms += 2000 + 10_001;
  limiter.recordFailure(u);
  limiter.recordFailure(u);
  t.equal(lockedFor(), 1000, "after a quiet window the lockout is back to its base");
  limiter.recordSuccess(u);
  t.equal(lockedFor(), 0, "a success clears the user");
});

t.test("shared secret: constant-time match gives the configured role; a wrong one is refused", async (t) => {
  const { auth } = await setup();
  t.same(await auth.sharedSecret({ secret: "s3cret-for-ci-runners" }), {
    id: "ci",
    kind: "user",
    roles: ["submitter"],
    namespace: "default",
    method: "sharedSecret",
  });
  await t.rejects(auth.sharedSecret({ secret: "s3cret-for-ci-runnerz" }), {
    code: AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS,
  });
});

t.test(
  "methods that are off are refused; no credentials without anonymous mode is unauthenticated",
  async (t) => {
    const { auth } = await setup();
    t.throws(() => auth.anonymous(), { code: AUTH_CODES.SHOAL_AUTH_UNAUTHENTICATED, status: 401 });
    await t.rejects(auth.challenge(), { code: AUTH_CODES.SHOAL_AUTH_METHOD_DISABLED });
    t.same(
      auth.describeMethods().map((m) => m.name),
      ["password", "sharedSecret"],
    );
  },
);

t.test("users and roles: names, duplicates, unknown roles, weak passwords, built-in roles", async (t) => {
  const { directory } = await setup();
  await t.rejects(directory.addUser({ name: "Alice Smith", roles: [] }), {
    code: AUTH_CODES.SHOAL_AUTH_BAD_NAME,
  });
  await t.rejects(directory.addUser({ name: "alice", roles: [] }), {
    code: AUTH_CODES.SHOAL_AUTH_USER_EXISTS,
  });
  await t.rejects(directory.addUser({ name: "bob", roles: ["wizard"] }), {
    code: AUTH_CODES.SHOAL_AUTH_ROLE_NOT_FOUND,
  });
  await t.rejects(directory.addUser({ name: "bob", roles: [], password: "short" }), {
    code: AUTH_CODES.SHOAL_AUTH_WEAK_PASSWORD,
  });
  await t.rejects(directory.deleteUser("nobody"), { code: AUTH_CODES.SHOAL_AUTH_USER_NOT_FOUND });
  await t.rejects(directory.addRole({ name: "admin", description: "", actions: [] }), {
    code: AUTH_CODES.SHOAL_AUTH_ROLE_BUILTIN,
  });
  await t.rejects(directory.deleteRole("reader"), { code: AUTH_CODES.SHOAL_AUTH_ROLE_BUILTIN });
  await t.rejects(directory.addRole({ name: "pilot", description: "", actions: ["job:fly"] }), {
    code: AUTH_CODES.SHOAL_AUTH_UNKNOWN_ACTION,
  });
  await directory.addRole({ name: "pilot", description: "flies", actions: ["job:read"], scope: "namespace" });
  t.same(
    (await directory.listRoles()).map((r) => r.name),
    ["admin", "operator", "pilot", "reader", "submitter"],
  );
  const alice = await directory.getUser("alice");
  t.notOk(JSON.stringify(alice).includes(PASSWORD), "the record holds a hash, not the password");
});

t.test("first admin: from SHOAL_ADMIN_PASSWORD, or generated and written 0600 once", async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "shoal-auth-admin-"));
  t.teardown(() => rm(dir, { recursive: true, force: true }));

  const fromEnv = new UserDirectory(new MemoryAuthStore(), { hash: HASH });
  const r1 = await bootstrapAdmin({
    directory: fromEnv,
    dataDir: dir,
    env: { SHOAL_ADMIN_PASSWORD: PASSWORD },
  });
  t.same(r1, { created: true, name: "admin" });
  t.ok(await verifyPassword(PASSWORD, (await fromEnv.getUser("admin"))!.passwordHash!));
  await t.rejects(
    bootstrapAdmin({
      directory: new UserDirectory(new MemoryAuthStore(), { hash: HASH }),
      dataDir: dir,
      env: { SHOAL_ADMIN_PASSWORD: "admin" },
    }),
    { code: AUTH_CODES.SHOAL_AUTH_WEAK_PASSWORD },
    "no trivial admin password",
  );

  const generated = new UserDirectory(new MemoryAuthStore(), { hash: HASH });
  const r2 = await bootstrapAdmin({ directory: generated, dataDir: dir, env: {} });
  t.equal(r2.created, true);
  t.match(r2.generatedPassword, /^[A-Za-z0-9_-]{32}$/);
  t.equal(r2.passwordFile, path.join(dir, "admin-password"));
  t.equal((await readFile(r2.passwordFile!, "utf8")).trim(), r2.generatedPassword);
  t.equal((await stat(r2.passwordFile!)).mode & 0o777, 0o600);
  t.ok(await verifyPassword(r2.generatedPassword!, (await generated.getUser("admin"))!.passwordHash!));
  t.same(await bootstrapAdmin({ directory: generated, dataDir: dir, env: {} }), {
    created: false,
    name: "admin",
  });
});

t.test("shoal auth hash-password prints a hash of SHOAL_PASSWORD and refuses a weak one", async (t) => {
  const { main } = await import("../cli/main.js");
  const run = async (password: string) => {
    const out: string[] = [];
    const err: string[] = [];
    const saved = { out: process.stdout.write, err: process.stderr.write, env: process.env.SHOAL_PASSWORD };
    process.stdout.write = ((s: string) => out.push(s) > 0) as typeof process.stdout.write;
    process.stderr.write = ((s: string) => err.push(s) > 0) as typeof process.stderr.write;
    process.env.SHOAL_PASSWORD = password;
    try {
      return { code: await main(["auth", "hash-password"]), out: out.join(""), err: err.join("") };
    } finally {
      process.stdout.write = saved.out;
      process.stderr.write = saved.err;
      if (saved.env === undefined) delete process.env.SHOAL_PASSWORD;
      else process.env.SHOAL_PASSWORD = saved.env;
      process.exitCode = undefined;
    }
  };
  const ok = await run(PASSWORD);
  t.equal(ok.code, 0);
  t.ok(await verifyPassword(PASSWORD, ok.out.trim()));
  const weak = await run("short");
  t.equal(weak.code, 1);
  t.match(weak.err, /SHOAL_AUTH_WEAK_PASSWORD/);
});
