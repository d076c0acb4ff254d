import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t, { type Test } from "tap";
import { ENGINE_CODES } from "../compute/engines/index.js";
import { StoredModules, type StoredModulesOptions } from "../compute/stored-modules.js";
import { isShoalError, moduleDigest, silentLogger } from "../core/index.js";
import { type MessageBody, MODULE_CHUNK_BYTES } from "../fabric/index.js";
import { tempDir } from "./helpers/cluster.js";

/**
 * How a node gets a job's `stored` module (compute/stored-modules): it asks
 * the orchestrator for it in MODULE_CHUNK_BYTES chunks, in order, uses it
 * only when the bytes match the digest the job names, keeps it on disk as
 * `<hex>.wasm` (0600) for later executions, shares one fetch between
 * executions that need the same module at once, waits (a bounded number of
 * times) for an orchestrator that does not know the execution yet, refuses
 * oversized, inconsistent, refused or unanswered fetches with
 * SHOAL_ENGINE_MODULE_UNAVAILABLE, never uses a cached file altered on disk,
 * evicts the least recently used modules past its cap (never the one just
 * fetched), holds recently used modules in memory too, and clears temporary
 * leftovers at start.
 */

type Ask = MessageBody<"module">;
type Reply = MessageBody<"module-reply">;
/** Answers in place of the honest orchestrator; `honest()` is what it would have said. */
type Misbehave = (ask: Ask, honest: () => Reply, n: number) => Reply | Promise<Reply>;

const UNAVAILABLE = ENGINE_CODES.SHOAL_ENGINE_MODULE_UNAVAILABLE;
/** compute/stored-modules UNKNOWN_RETRIES (not exported): asks again this many times, then gives up. */
const UNKNOWN_RETRIES = 20;
const WASM_HEADER = Buffer.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]);

/** `size` bytes starting with the wasm header, the rest a pattern that differs by `seed`. */
function wasmLike(size: number, seed = 0): Buffer {
  const bytes = Buffer.alloc(size);
  for (let i = 0; i < size; i++) bytes[i] = (i * 31 + seed * 17 + (i >> 8)) & 0xff;
  WASM_HEADER.copy(bytes, 0);
  return bytes;
}

/**
 * A stand-in for the orchestrator's `module` handler: serves the modules it
 * was given in chunks from the asked offset, records every request, and
 * answers through `misbehave` when told to.
 */
class FakeOrchestrator {
  readonly asked: Ask[] = [];
  readonly modules = new Map<string, Buffer>();
  misbehave: Misbehave | undefined;

  /** Serves `bytes` under `digest` (their own by default); returns the digest. */
  serve(bytes: Buffer, digest = moduleDigest(bytes)): string {
    this.modules.set(digest, bytes);
    return digest;
  }

  readonly request = async (ask: Ask): Promise<Reply> => {
    this.asked.push({ ...ask });
    const n = this.asked.length;
    // Answer on a later turn, as a request over the fabric would.
    await new Promise((resolve) => setImmediate(resolve));
    const honest = (): Reply => this.#answer(ask);
    return this.misbehave ? this.misbehave(ask, honest, n) : honest();
  };

  #answer(ask: Ask): Reply {
    const bytes = this.modules.get(ask.digest);
    if (!bytes) return { reason: `module ${ask.digest} is not stored` };
    const data = bytes.subarray(ask.offset, ask.offset + MODULE_CHUNK_BYTES);
    return { size: bytes.length, data: data.toString("base64") };
  }
}

async function setup(
  t: Test,
  options: Partial<Omit<StoredModulesOptions, "request" | "log">> = {},
): Promise<{ dir: string; orchestrator: FakeOrchestrator; modules: StoredModules }> {
  const dir = path.join(await tempDir(t, "shoal-modules-"), "modules");
  const orchestrator = new FakeOrchestrator();
  const modules = new StoredModules({
    dir,
    request: orchestrator.request,
    log: silentLogger,
    retryMs: 1,
    // What is kept on disk is under test here; holding in memory has its own test.
    maxMemoryBytes: 0,
    ...options,
  });
  await modules.init();
  return { dir, orchestrator, modules };
}

/** The file a module is kept in. */
function fileOf(dir: string, digest: string): string {
  return path.join(dir, `${digest.replace(/^sha256:/, "")}.wasm`);
}

/** Asserts `promise` rejects with SHOAL_ENGINE_MODULE_UNAVAILABLE and a message matching `reason`. */
async function unavailable(
  t: Test,
  promise: Promise<unknown>,
  reason: RegExp,
  what: string,
): Promise<unknown> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(isShoalError(err, UNAVAILABLE), `${what}: ${UNAVAILABLE}`);
  t.equal((err as { code?: string } | undefined)?.code, UNAVAILABLE, `${what}: the code`);
  t.match((err as Error | undefined)?.message ?? "", reason, `${what}: why`);
  return err;
}

t.test(
  "a module of several chunks is fetched in order, kept as <hex>.wasm, and read from disk next time",
  async (t) => {
    const { dir, orchestrator, modules } = await setup(t);
    const bytes = wasmLike(Math.floor(2.5 * MODULE_CHUNK_BYTES));
    const digest = orchestrator.serve(bytes);

    const got = await modules.get("e-1", digest);
    t.ok(got.equals(bytes), "byte-exact");
    t.same(
      orchestrator.asked,
      [0, MODULE_CHUNK_BYTES, 2 * MODULE_CHUNK_BYTES].map((offset) => ({
        executionId: "e-1",
        digest,
        offset,
      })),
      "three chunks, in order, for the execution that needs it",
    );
    const file = fileOf(dir, digest);
    t.same(await fs.readdir(dir), [path.basename(file)], "kept as <hex>.wasm, nothing else");
    t.ok((await fs.readFile(file)).equals(bytes), "the kept file holds the module");
    t.equal((await fs.stat(file)).mode & 0o777, 0o600, "readable by the node only");

    const again = await modules.get("e-2", digest);
    t.ok(again.equals(bytes), "another execution gets the same bytes");
    t.equal(orchestrator.asked.length, 3, "without asking the orchestrator");
  },
);

t.test("executions that need the same module at once share one fetch", async (t) => {
  const { orchestrator, modules } = await setup(t);
  const bytes = wasmLike(Math.floor(2.5 * MODULE_CHUNK_BYTES), 1);
  const digest = orchestrator.serve(bytes);

  const all = await Promise.all(["e-1", "e-2", "e-3", "e-4"].map((e) => modules.get(e, digest)));
  for (const got of all) t.ok(got.equals(bytes), "each gets the module");
  t.same(
    orchestrator.asked.map((a) => a.offset),
    [0, MODULE_CHUNK_BYTES, 2 * MODULE_CHUNK_BYTES],
    "each chunk asked once",
  );
});

t.test(
  "a shared fetch refused for its execution does not fail the others: each asks for itself",
  async (t) => {
    const { orchestrator, modules } = await setup(t);
    const bytes = wasmLike(100, 4);
    const digest = orchestrator.serve(bytes);
    let release!: () => void;
    const refusal = new Promise<void>((resolve) => {
      release = resolve;
    });
    orchestrator.misbehave = async (ask, honest) => {
      if (ask.executionId !== "e-cancelled") return honest();
      await refusal;
      return { reason: "execution e-cancelled is Cancelled" };
    };
    // e-cancelled's fetch is under way once the orchestrator is asked. Both calls first look on
    // disk, whose answers may come back in either order: e-2 starts only now, so it cannot
    // become the fetcher, and it joins the fetch under way while its refusal is held back.
    const first = modules.get("e-cancelled", digest);
    for (let i = 0; i < 1000 && orchestrator.asked.length === 0; i++) {
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    const second = modules.get("e-2", digest);
    await new Promise((resolve) => setTimeout(resolve, 200));
    release();
    const [cancelled, other] = await Promise.allSettled([first, second]);
    t.equal(cancelled.status, "rejected", "the execution refused fails");
    t.ok(other.status === "fulfilled" && other.value.equals(bytes), "the other gets the module");
    t.same(
      orchestrator.asked.map((a) => a.executionId),
      ["e-cancelled", "e-2"],
    );
  },
);

t.test("bytes that do not match the digest are not used nor kept", async (t) => {
  const { dir, orchestrator, modules } = await setup(t);
  const good = wasmLike(MODULE_CHUNK_BYTES + 100, 2);
  const digest = moduleDigest(good);
  const bad = Buffer.from(good);
  bad[bad.length - 1] = (bad[bad.length - 1]! + 1) & 0xff;
  orchestrator.serve(bad, digest);

  await unavailable(t, modules.get("e-1", digest), /do not match the digest/, "altered bytes");
  t.same(await fs.readdir(dir), [], "nothing kept (no module, no temporary file)");
  t.equal(orchestrator.asked.length, 2);

  orchestrator.serve(good, digest);
  const got = await modules.get("e-1", digest);
  t.ok(got.equals(good), "the next get fetches again and gets the good bytes");
  t.equal(orchestrator.asked.length, 4, "asked again from the start");
  t.equal(orchestrator.asked[2]?.offset, 0);
});

t.test("a refusal fails the get with the orchestrator's reason", async (t) => {
  const { dir, orchestrator, modules } = await setup(t);
  const digest = orchestrator.serve(wasmLike(1000, 3));
  orchestrator.misbehave = () => ({ reason: "execution e-9 is not placed on n2" });

  const err = await unavailable(
    t,
    modules.get("e-9", digest),
    /refused it: execution e-9 is not placed on n2/,
    "refused",
  );
  t.match((err as Error).message, digest, "the message names the module");
  t.equal(orchestrator.asked.length, 1, "not asked again");
  t.same(await fs.readdir(dir), []);

  orchestrator.misbehave = () => ({});
  await unavailable(t, modules.get("e-9", digest), /no reason given/, "a reply with nothing in it");
});

t.test(
  "an orchestrator that does not know the execution yet is asked again, a bounded number of times",
  async (t) => {
    t.test("known after a few asks: the module is fetched", async (t) => {
      const { orchestrator, modules } = await setup(t);
      const bytes = wasmLike(MODULE_CHUNK_BYTES + 1, 4);
      const digest = orchestrator.serve(bytes);
      orchestrator.misbehave = (_ask, honest, n) =>
        n <= 3 ? { unknown: true, reason: "execution e-1 is not known" } : honest();

      const got = await modules.get("e-1", digest);
      t.ok(got.equals(bytes));
      t.same(
        orchestrator.asked.map((a) => a.offset),
        [0, 0, 0, 0, MODULE_CHUNK_BYTES],
        "the first chunk asked until known",
      );
    });

    t.test("never known: the get fails after the retries", async (t) => {
      const { dir, orchestrator, modules } = await setup(t);
      const digest = orchestrator.serve(wasmLike(1000, 5));
      orchestrator.misbehave = () => ({ unknown: true, reason: "execution e-1 is not known" });

      const started = Date.now();
      await unavailable(t, modules.get("e-1", digest), /execution e-1 is not known/, "never known");
      t.equal(orchestrator.asked.length, UNKNOWN_RETRIES + 1, "the first ask and UNKNOWN_RETRIES more");
      t.ok(Date.now() - started < 10_000, "quick with retryMs 1");
      t.same(await fs.readdir(dir), []);
    });

    t.test(
      "unknown past the first chunk (another orchestrator after a failover) is waited for too",
      async (t) => {
        const { orchestrator, modules } = await setup(t);
        const bytes = wasmLike(MODULE_CHUNK_BYTES + 1, 6);
        const digest = orchestrator.serve(bytes);
        orchestrator.misbehave = (_ask, honest, n) => (n === 2 || n === 3 ? { unknown: true } : honest());

        t.ok((await modules.get("e-1", digest)).equals(bytes));
        t.same(
          orchestrator.asked.map((a) => a.offset),
          [0, MODULE_CHUNK_BYTES, MODULE_CHUNK_BYTES, MODULE_CHUNK_BYTES],
        );
      },
    );
  },
);

t.test("a module over maxModuleBytes is refused before the rest is fetched", async (t) => {
  const { dir, orchestrator, modules } = await setup(t, { maxModuleBytes: MODULE_CHUNK_BYTES });
  const digest = orchestrator.serve(wasmLike(Math.floor(2.5 * MODULE_CHUNK_BYTES), 7));

  await unavailable(t, modules.get("e-1", digest), /over/, "too large");
  t.equal(orchestrator.asked.length, 1, "only the first chunk was asked");
  t.same(await fs.readdir(dir), []);

  const small = wasmLike(MODULE_CHUNK_BYTES, 8);
  const got = await modules.get("e-1", orchestrator.serve(small));
  t.ok(got.equals(small), "a module at the cap is fine");
});

t.test("answers that do not add up to one module are refused", async (t) => {
  const bytes = wasmLike(Math.floor(2.5 * MODULE_CHUNK_BYTES), 9);
  const cases: [string, Misbehave][] = [
    [
      "the size changes between chunks",
      (_a, honest, n) => (n === 2 ? { ...honest(), size: bytes.length + 1 } : honest()),
    ],
    ["an empty chunk", (_a, honest, n) => (n === 2 ? { ...honest(), data: "" } : honest())],
    [
      "more bytes than the size",
      (a, honest) =>
        a.offset === 0 ? { size: 10, data: bytes.subarray(0, 20).toString("base64") } : honest(),
    ],
    [
      "a chunk past the end",
      (_a, honest, n) =>
        n === 3
          ? { size: bytes.length, data: Buffer.alloc(MODULE_CHUNK_BYTES, 1).toString("base64") }
          : honest(),
    ],
  ];
  for (const [what, misbehave] of cases) {
    const { dir, orchestrator, modules } = await setup(t);
    const digest = orchestrator.serve(bytes);
    orchestrator.misbehave = misbehave;
    await unavailable(t, modules.get("e-1", digest), /do not add up/, what);
    t.same(await fs.readdir(dir), [], `${what}: nothing kept`);
  }
});

t.test("a chunk nobody answers is asked for again, twice", async (t) => {
  const { orchestrator, modules } = await setup(t);
  const bytes = wasmLike(Math.floor(1.5 * MODULE_CHUNK_BYTES), 11);
  const digest = orchestrator.serve(bytes);
  orchestrator.misbehave = (_a, honest, n) => {
    if (n === 2 || n === 3) throw new Error("TIMEOUT");
    return honest();
  };
  t.ok((await modules.get("e-1", digest)).equals(bytes), "its orchestrator gone, another answers");
  t.same(
    orchestrator.asked.map((a) => a.offset),
    [0, MODULE_CHUNK_BYTES, MODULE_CHUNK_BYTES, MODULE_CHUNK_BYTES],
  );
});

t.test("an orchestrator that does not answer fails the get", async (t) => {
  const { dir, orchestrator, modules } = await setup(t);
  const digest = orchestrator.serve(wasmLike(Math.floor(1.5 * MODULE_CHUNK_BYTES), 10));
  const timeout = new Error("TIMEOUT");
  orchestrator.misbehave = (_a, honest, n) => {
    if (n >= 2) throw timeout;
    return honest();
  };

  const err = await unavailable(t, modules.get("e-1", digest), /did not answer: TIMEOUT/, "no answer");
  t.equal((err as Error).cause, timeout, "the request's error is the cause");
  t.same(await fs.readdir(dir), []);

  orchestrator.misbehave = undefined;
  t.ok((await modules.get("e-1", digest)).length > 0, "a failed fetch is not remembered: the next one works");
});

t.test("a kept module altered on disk is not used: it is fetched again", async (t) => {
  const { dir, orchestrator, modules } = await setup(t);
  const bytes = wasmLike(1000, 11);
  const digest = orchestrator.serve(bytes);
  await modules.get("e-1", digest);
  t.equal(orchestrator.asked.length, 1);

  const file = fileOf(dir, digest);
  const altered = Buffer.from(bytes);
  altered[500] = altered[500]! ^ 0xff;
  await fs.writeFile(file, altered);

  const got = await modules.get("e-2", digest);
  t.ok(got.equals(bytes), "the good bytes");
  t.equal(orchestrator.asked.length, 2, "fetched again");
  t.ok((await fs.readFile(file)).equals(bytes), "and the kept file mended");

  await fs.writeFile(file, bytes.subarray(0, 10));
  t.ok((await modules.get("e-3", digest)).equals(bytes), "a truncated file too");
  t.equal(orchestrator.asked.length, 3);
});

t.test("past maxCachedBytes the least recently used modules go, never the one just fetched", async (t) => {
  const size = 4096;
  const past = (minutes: number) => new Date(Date.now() - minutes * 60_000);
  const kept = async (dir: string) => (await fs.readdir(dir)).sort();
  const hexOf = (digest: string) => `${digest.replace(/^sha256:/, "")}.wasm`;
  /** Room for two modules of `size`; a and b fetched and kept, c served. */
  const threeModules = async (t: Test, seed: number) => {
    const s = await setup(t, { maxCachedBytes: 2 * size + 1 });
    const [a, b, c] = [0, 1, 2].map((i) => s.orchestrator.serve(wasmLike(size, seed + i))) as [
      string,
      string,
      string,
    ];
    await s.modules.get("e-a", a);
    await s.modules.get("e-b", b);
    return { ...s, a, b, c };
  };

  t.test("the oldest goes", async (t) => {
    const { dir, modules, a, b, c } = await threeModules(t, 20);
    await fs.utimes(fileOf(dir, a), past(20), past(20));
    await fs.utimes(fileOf(dir, b), past(10), past(10));

    await modules.get("e-c", c);
    t.same(await kept(dir), [hexOf(b), hexOf(c)].sort(), "a, the least recently used, went");
  });

  t.test("reading a kept module makes it recently used", async (t) => {
    const { dir, orchestrator, modules, a, b, c } = await threeModules(t, 30);
    await fs.utimes(fileOf(dir, a), past(20), past(20));
    await fs.utimes(fileOf(dir, b), past(10), past(10));
    const asked = orchestrator.asked.length;
    await modules.get("e-a2", a);
    t.equal(orchestrator.asked.length, asked, "a read from disk");

    await modules.get("e-c", c);
    t.same(await kept(dir), [hexOf(a), hexOf(c)].sort(), "b went instead of a");
  });

  t.test("the module just fetched stays even when its time looks older", async (t) => {
    const { dir, modules, a, b, c } = await threeModules(t, 40);
    // Clocks that went back: the kept modules look newer than the one about to be written.
    const future = (minutes: number) => new Date(Date.now() + minutes * 60_000);
    await fs.utimes(fileOf(dir, a), future(10), future(10));
    await fs.utimes(fileOf(dir, b), future(20), future(20));

    await modules.get("e-c", c);
    t.same(await kept(dir), [hexOf(b), hexOf(c)].sort(), "c stays, a (the oldest of the others) went");
  });

  t.test("a module larger than the cap is still kept, alone", async (t) => {
    const { dir, orchestrator, modules } = await setup(t, { maxCachedBytes: size - 1 });
    const [a, b] = [0, 1].map((i) => orchestrator.serve(wasmLike(size, 50 + i))) as [string, string];
    await modules.get("e-a", a);
    t.same(await kept(dir), [hexOf(a)]);
    await modules.get("e-b", b);
    t.same(await kept(dir), [hexOf(b)], "a went, b stays");
    t.ok((await modules.get("e-b2", b)).equals(wasmLike(size, 51)));
    t.equal(orchestrator.asked.length, 2, "b is read from disk");
  });
});

t.test("recently used modules are held in memory, up to the cap", async (t) => {
  const size = 4096;
  const { dir, orchestrator, modules } = await setup(t, { maxMemoryBytes: 2 * size });
  const [a, b, c] = [0, 1, 2].map((i) => orchestrator.serve(wasmLike(size, 50 + i))) as [
    string,
    string,
    string,
  ];
  await modules.get("e-a", a);
  await fs.rm(fileOf(dir, a));
  t.ok((await modules.get("e-a2", a)).equals(orchestrator.modules.get(a)!), "held: no disk read");
  t.equal(orchestrator.asked.length, 1, "and no fetch");
  await modules.get("e-b", b);
  await modules.get("e-c", c);
  const asked = orchestrator.asked.length;
  t.ok((await modules.get("e-a3", a)).equals(orchestrator.modules.get(a)!));
  t.equal(orchestrator.asked.length, asked + 1, "past the cap the least recently used went: fetched again");
});

t.test("init removes temporary leftovers and keeps the modules", async (t) => {
  const { dir, orchestrator, modules } = await setup(t);
  const digest = orchestrator.serve(wasmLike(1000, 60));
  await modules.get("e-1", digest);
  const module = path.basename(fileOf(dir, digest));
  await fs.writeFile(path.join(dir, `${module}.0123456789ab.tmp`), "half a module");
  await fs.writeFile(path.join(dir, "other.tmp"), "");

  const restarted = new StoredModules({ dir, request: orchestrator.request, log: silentLogger, retryMs: 1 });
  await restarted.init();
  t.same(await fs.readdir(dir), [module], "only the module is left");
  t.ok((await restarted.get("e-2", digest)).equals(wasmLike(1000, 60)));
  t.equal(orchestrator.asked.length, 1, "read from disk after the restart");
});
