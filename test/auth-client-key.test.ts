import "reflect-metadata";
import { generateKeyPairSync } from "node:crypto";
import t from "tap";
import {
  AUTH_CODES,
  Authenticator,
  answerChallenge,
  ClientKeyVerifier,
  clientIdOf,
  MemoryAuthStore,
  UserDirectory,
} from "../auth/index.js";

const AUDIENCE = "https://orch.example:1234";

async function setup(methods: Array<"anonymous" | "clientKey"> = ["anonymous", "clientKey"]) {
  const clock = { ms: 5_000_000 };
  const store = new MemoryAuthStore();
  const directory = new UserDirectory(store, { hash: { logN: 14 } });
  await directory.ensureBuiltinRoles();
  const verifier = new ClientKeyVerifier({
    store,
    audience: AUDIENCE,
    nonceTtlMs: 30_000,
    now: () => clock.ms,
  });
  const auth = new Authenticator({ methods, directory, clientKeys: verifier, hash: { logN: 14 } });
  return { store, directory, verifier, auth, clock };
}

const ecKey = () => generateKeyPairSync("ec", { namedCurve: "prime256v1" }).privateKey;

t.test(
  "a signed nonce logs in a self-generated key as client:<sha256 of SPKI> (RSA, EC, Ed25519)",
  async (t) => {
    const { auth } = await setup();
    for (const key of [
      generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey,
      ecKey(),
      generateKeyPairSync("ed25519").privateKey,
    ]) {
      const principal = await auth.clientKey(answerChallenge(await auth.challenge(), key));
      t.same(principal, {
        id: `client:${clientIdOf(key)}`,
        kind: "client",
        roles: [],
        namespace: "default",
        method: "clientKey",
      });
      t.match(clientIdOf(key), /^[0-9a-f]{64}$/);
    }
  },
);

t.test("a captured signature cannot be replayed", async (t) => {
  const { auth } = await setup();
  const answer = answerChallenge(await auth.challenge(), ecKey());
  await auth.clientKey(answer);
  await t.rejects(auth.clientKey(answer), { code: AUTH_CODES.SHOAL_AUTH_CHALLENGE_INVALID, status: 401 });
});

t.test("a failed answer burns the nonce too", async (t) => {
  const { auth } = await setup();
  const key = ecKey();
  const answer = answerChallenge(await auth.challenge(), key);
  await t.rejects(
    auth.clientKey({ ...answer, signature: answer.signature.replace(/^./, (c) => (c === "A" ? "B" : "A")) }),
    {
      code: AUTH_CODES.SHOAL_AUTH_SIGNATURE_INVALID,
    },
  );
  await t.rejects(auth.clientKey(answer), { code: AUTH_CODES.SHOAL_AUTH_CHALLENGE_INVALID });
});

t.test("expired, foreign-audience and unknown nonces are refused", async (t) => {
  const { auth, clock, store } = await setup();
  const key = ecKey();
  const late = answerChallenge(await auth.challenge(), key);
  clock.ms += 30_000;
  await t.rejects(auth.clientKey(late), { code: AUTH_CODES.SHOAL_AUTH_CHALLENGE_EXPIRED });
  // A nonce issued by an API with another audience (same store) does not log in here.
  const elsewhere = new ClientKeyVerifier({ store, audience: "https://other:1234", now: () => clock.ms });
  await t.rejects(auth.clientKey(answerChallenge(await elsewhere.challenge(), key)), {
    code: AUTH_CODES.SHOAL_AUTH_CHALLENGE_INVALID,
  });
  const invented = answerChallenge({ nonce: "made-up", audience: AUDIENCE, expiresAt: clock.ms + 1000 }, key);
  await t.rejects(auth.clientKey(invented), { code: AUTH_CODES.SHOAL_AUTH_CHALLENGE_INVALID });
});

t.test("a signature is bound to its key and audience", async (t) => {
  const { auth } = await setup();
  const key = ecKey();
  const other = ecKey();
  const challenge = await auth.challenge();
  const answer = answerChallenge(challenge, key);
  // Presenting another public key with the captured signature.
  const swapped = {
    ...answer,
    publicKey: answerChallenge(challenge, other).publicKey,
  };
  await t.rejects(auth.clientKey(swapped), { code: AUTH_CODES.SHOAL_AUTH_SIGNATURE_INVALID });
  // Signed for another API's audience with a nonce from this one.
  const c2 = await auth.challenge();
  const wrongAud = answerChallenge({ ...c2, audience: "https://other:1234" }, key);
  await t.rejects(auth.clientKey(wrongAud), { code: AUTH_CODES.SHOAL_AUTH_SIGNATURE_INVALID });
});

t.test("a nonce asked for one key is good for that key only", async (t) => {
  const { auth } = await setup();
  const key = ecKey();
  const c = await auth.challenge({ clientId: clientIdOf(key) });
  await t.rejects(auth.clientKey(answerChallenge(c, ecKey())), {
    code: AUTH_CODES.SHOAL_AUTH_CHALLENGE_INVALID,
  });
  const c2 = await auth.challenge({ clientId: clientIdOf(key) });
  t.equal((await auth.clientKey(answerChallenge(c2, key))).kind, "client");
});

t.test("weak key types are refused", async (t) => {
  const { auth } = await setup();
  const small = generateKeyPairSync("rsa", { modulusLength: 1024 }).privateKey;
  await t.rejects(auth.clientKey(answerChallenge(await auth.challenge(), small)), {
    code: AUTH_CODES.SHOAL_AUTH_KEY_UNSUPPORTED,
  });
  await t.rejects(
    auth.clientKey({ nonce: (await auth.challenge()).nonce, publicKey: "garbage", signature: "x" }),
    {
      code: AUTH_CODES.SHOAL_AUTH_KEY_UNSUPPORTED,
    },
  );
});

t.test("a registered key logs in as its user; unregistered keys need anonymous mode", async (t) => {
  const { auth, directory, verifier } = await setup(["clientKey"]);
  const key = ecKey();
  const stranger = ecKey();
  await directory.addUser({ name: "bob", roles: ["operator"], clientKeys: [clientIdOf(key)] });
  t.same(await auth.clientKey(answerChallenge(await auth.challenge(), key)), {
    id: "bob",
    kind: "user",
    roles: ["operator"],
    namespace: "default",
    method: "clientKey",
    uid: (await directory.getUser("bob"))?.uid,
  });
  await t.rejects(auth.clientKey(answerChallenge(await auth.challenge(), stranger)), {
    code: AUTH_CODES.SHOAL_AUTH_BAD_CREDENTIALS,
  });
  t.throws(() => auth.anonymous(), { code: AUTH_CODES.SHOAL_AUTH_UNAUTHENTICATED });
  await verifier.challenge();
  t.equal(await verifier.prune(), 0, "fresh nonces stay");
});
