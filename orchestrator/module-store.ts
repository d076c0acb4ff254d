import { promises as fs } from "node:fs";
import path from "node:path";
import { prepareAtomicDir, Tally, writeFileAtomic } from "../core/index.js";
import type { SharedObjects } from "./results-store.js";
import { objectChunks, objectInfo, purgeObject } from "./stored-objects.js";

/** The object store a cluster's orchestrators keep submitted modules in (`OBJ_shoal-modules`). */
export const MODULES_BUCKET = "shoal-modules";

const DIGEST = /^sha256:([0-9a-f]{64})$/;
/** Local copies a ModuleStore remembers having, at most. */
const LOCAL_KNOWN = 10_000;

/** The hex of a `sha256:HEX` digest, or undefined for anything else (so it can name a file). */
function hexOf(digest: string): string | undefined {
  return DIGEST.exec(digest)?.[1];
}

/**
 * The WebAssembly modules of submitted jobs, stored once per digest apart
 * from the jobs (core/job-spec `separateModules`): a job record and the bid a
 * node receives stay small however large the module, and a module run by a
 * thousand jobs is stored once. Files are `DATA-DIR/modules/<hex>.wasm`; in a
 * cluster each module is also put in the replicated object store
 * {@link MODULES_BUCKET} before its job is acknowledged, and an orchestrator
 * that lacks a local copy makes one from it (checked against the digest)
 * when a node asks for the module.
 *
 * A module no stored job names any more is removed by {@link collect}.
 */
export class ModuleStore {
  readonly #dir: string;
  readonly #shared: SharedObjects | undefined;
  /** Local copies being made, by digest: concurrent puts and reads share one. */
  readonly #copying = new Map<string, Promise<void>>();
  /** Digests of submissions under way (stored, their job not yet): never collected. */
  readonly #pinned = new Tally();
  /** Digests no job named at the previous {@link collect}. */
  #unnamed = new Set<string>();
  /**
   * Hex digests whose local copy this store wrote or found, until it removes
   * it: a job submitted with a module already here does not look for its file
   * again (one file-system call per job). Forgotten whole past LOCAL_KNOWN.
   */
  readonly #local = new Set<string>();

  constructor(dataDir: string, shared?: SharedObjects) {
    this.#dir = path.join(dataDir, "modules");
    this.#shared = shared;
  }

  /** Creates the directory and drops copies a crash left half written. */
  init(): Promise<void> {
    return prepareAtomicDir(this.#dir);
  }

  /**
   * Keeps `digests` from {@link collect} until the returned function is
   * called: a submission pins its modules from before it stores them until
   * its job, which names them, is stored.
   */
  pin(digests: Iterable<string>): () => void {
    const list = [...digests];
    for (const d of list) this.#pinned.add(d);
    return () => {
      for (const d of list) this.#pinned.remove(d);
    };
  }

  /**
   * Stores a module under its digest (the caller computed it from `bytes`),
   * on this disk and, in a cluster, in the object store; nothing is written
   * where it is stored already.
   */
  async put(digest: string, bytes: Buffer): Promise<void> {
    const hex = hexOf(digest);
    if (!hex) throw new Error(`not a module digest: ${digest}`);
    await this.#writeLocal(hex, async () => bytes);
    const shared = this.#shared;
    if (!shared) return;
    const info = await objectInfo(shared.jsm, MODULES_BUCKET, hex);
    if (!info || info.deleted || info.size !== bytes.length) {
      await shared.objects.putBlob({ name: hex }, bytes);
    }
  }

  /** True when the module is stored here or in the cluster's object store. */
  async has(digest: string): Promise<boolean> {
    const hex = hexOf(digest);
    if (!hex) return false;
    if (await this.#hasLocal(hex)) return true;
    if (!this.#shared) return false;
    const info = await objectInfo(this.#shared.jsm, MODULES_BUCKET, hex);
    return info !== undefined && !info.deleted;
  }

  /**
   * Up to `length` bytes of the module from `offset`, and its size; undefined
   * when it is stored neither here nor in the cluster.
   */
  async read(
    digest: string,
    offset: number,
    length: number,
  ): Promise<{ size: number; data: Buffer } | undefined> {
    const hex = hexOf(digest);
    if (!hex || !(await this.#ensureLocal(hex))) return undefined;
    let file: fs.FileHandle;
    try {
      file = await fs.open(this.#file(hex), "r");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
      // A copy this store knew of was deleted by hand: forgotten, it is looked for again (or copied
      // again from the cluster's object store), and the next submission of the module writes it.
      this.#local.delete(hex);
      if (!(await this.#ensureLocal(hex))) return undefined;
      file = await fs.open(this.#file(hex), "r");
    }
    try {
      const { size } = await file.stat();
      const data = Buffer.alloc(Math.max(0, Math.min(length, size - offset)));
      const { bytesRead } = await file.read(data, 0, data.length, offset);
      return { size, data: data.subarray(0, bytesRead) };
    } finally {
      await file.close();
    }
  }

  /**
   * Removes the modules that no stored job names (`named`) now and did not at
   * the previous call either, unless a submission pinned them: a job stored
   * at another orchestrator of the cluster reaches this one's store within
   * moments, far less than the time between two calls. Resolves to how many
   * went.
   */
  async collect(named: ReadonlySet<string>): Promise<number> {
    const stored = new Set<string>();
    const local = await fs.readdir(this.#dir).catch(() => [] as string[]);
    for (const name of local) if (name.endsWith(".wasm")) stored.add(`sha256:${name.slice(0, -5)}`);
    if (this.#shared) for (const info of await this.#shared.objects.list()) stored.add(`sha256:${info.name}`);
    const unnamed = new Set([...stored].filter((d) => !named.has(d) && !this.#pinned.has(d)));
    const removable = [...unnamed].filter((d) => this.#unnamed.has(d));
    this.#unnamed = unnamed;
    for (const digest of removable) await this.remove(digest);
    return removable.length;
  }

  /** Removes the module from this disk and the cluster's object store (purged, no delete marker). */
  async remove(digest: string): Promise<void> {
    const hex = hexOf(digest);
    if (!hex) return;
    this.#local.delete(hex);
    await fs.rm(this.#file(hex), { force: true });
    if (this.#shared) await purgeObject(this.#shared.jsm, MODULES_BUCKET, hex);
  }

  #file(hex: string): string {
    return path.join(this.#dir, `${hex}.wasm`);
  }

  /** Writes the local copy of the bytes `content` gives (atomically) unless it exists. */
  async #writeLocal(hex: string, content: () => Promise<Uint8Array>): Promise<void> {
    const under = this.#copying.get(hex);
    if (under) return under;
    if (await this.#hasLocal(hex)) return;
    const target = this.#file(hex);
    const copy = (async () => {
      await writeFileAtomic(target, await content(), 0o600);
      this.#known(hex);
    })().finally(() => this.#copying.delete(hex));
    this.#copying.set(hex, copy);
    return copy;
  }

  /** Whether this disk has the module: known to, or its file found (and then known). */
  async #hasLocal(hex: string): Promise<boolean> {
    if (this.#local.has(hex)) return true;
    if (!(await isFile(this.#file(hex)))) return false;
    this.#known(hex);
    return true;
  }

  #known(hex: string): void {
    if (this.#local.size >= LOCAL_KNOWN) this.#local.clear();
    this.#local.add(hex);
  }

  /** Makes sure this disk has the module, copying it from the cluster's object store; false when nowhere. */
  async #ensureLocal(hex: string): Promise<boolean> {
    if (await this.#hasLocal(hex)) return true;
    const shared = this.#shared;
    if (!shared) return false;
    const info = await objectInfo(shared.jsm, MODULES_BUCKET, hex);
    if (!info || info.deleted) return false;
    await this.#writeLocal(hex, async () => {
      const chunks: Uint8Array[] = [];
      for await (const chunk of objectChunks(shared.jsm, info, { size: info.size, sha256: hex }))
        chunks.push(chunk);
      return Buffer.concat(chunks);
    });
    return true;
  }
}

async function isFile(p: string): Promise<boolean> {
  return fs.stat(p).then(
    (s) => s.isFile(),
    () => false,
  );
}
