import { promises as fs } from "node:fs";
import path from "node:path";
import {
  DEFAULT_MAX_MODULE_BYTES,
  formatBytes,
  type Logger,
  moduleDigest,
  prepareAtomicDir,
  writeFileAtomic,
} from "../core/index.js";
import type { MessageBody } from "../fabric/index.js";
import { ENGINE_CODES, EngineError } from "./engines/index.js";

/** Bytes of fetched modules a node keeps on disk, least recently used out first. @default 512 MiB */
export const DEFAULT_MODULE_CACHE_BYTES = 512 * 1024 * 1024;
/** Bytes of modules also held in memory, least recently used out first, so a module run again is not read from disk. @default 64 MiB */
export const DEFAULT_MODULE_MEMORY_BYTES = 64 * 1024 * 1024;
/** How often a module used from memory marks its file as used (for the disk's least-recently-used order). */
const TOUCH_INTERVAL_MS = 60_000;
/** How often a node asks again for a module of an execution its orchestrator does not know yet. @default 20 */
const UNKNOWN_RETRIES = 20;
/** Pause between those asks. @default 250 ms */
const UNKNOWN_RETRY_MS = 250;
/**
 * How often a node asks again for a chunk nobody answered (each ask waits the
 * request timeout): its orchestrator may have just gone, and the node
 * registers with another of the cluster, which answers the next ask.
 */
const NO_ANSWER_RETRIES = 2;

/** One signed `module` request to the orchestrator, resolving to its verified reply. */
export type ModuleRequest = (body: MessageBody<"module">) => Promise<MessageBody<"module-reply">>;

export interface StoredModulesOptions {
  /** Where fetched modules are kept: `DATA-DIR/modules`. */
  dir: string;
  request: ModuleRequest;
  log: Logger;
  /** @default DEFAULT_MAX_MODULE_BYTES */
  maxModuleBytes?: number;
  /** @default DEFAULT_MODULE_CACHE_BYTES */
  maxCachedBytes?: number;
  /** @default DEFAULT_MODULE_MEMORY_BYTES */
  maxMemoryBytes?: number;
  /** Pause before asking again about an execution the orchestrator does not know yet. @default 250 */
  retryMs?: number;
}

function unavailable(digest: string, reason: string, cause?: unknown): EngineError {
  return new EngineError(ENGINE_CODES.SHOAL_ENGINE_MODULE_UNAVAILABLE, `module ${digest}: ${reason}`, {
    cause,
    fix: "submit the job again; the orchestrator's log says why it refused the module",
  });
}

/**
 * The modules of `stored` sources (core/job-spec): the orchestrator keeps
 * each submitted module once, by digest, and a node fetches it in chunks
 * (signed `module` requests, each for the execution that runs it) the first
 * time one of its executions needs it. What it fetched is used only if it
 * matches the digest the signed job names; it is then kept as
 * `DATA-DIR/modules/<hex>.wasm`, checked again each time it is read, and the
 * least recently used modules go once they add up to more than
 * `maxCachedBytes`.
 */
export class StoredModules {
  readonly #o: StoredModulesOptions;
  /** Fetches under way, by digest: executions that need the same module share one. */
  readonly #fetching = new Map<string, Promise<Buffer>>();
  /** Checked modules by digest, least recently used first, with when their file was last marked used. */
  readonly #held = new Map<string, { bytes: Buffer; touched: number }>();
  #heldBytes = 0;

  constructor(options: StoredModulesOptions) {
    this.#o = options;
  }

  init(): Promise<void> {
    return prepareAtomicDir(this.#o.dir);
  }

  /**
   * The module's bytes, from this disk or fetched for `executionId`.
   * @throws EngineError SHOAL_ENGINE_MODULE_UNAVAILABLE
   */
  async get(executionId: string, digest: string): Promise<Buffer> {
    const file = path.join(this.#o.dir, `${digest.replace(/^sha256:/, "")}.wasm`);
    const held = this.#held.get(digest);
    if (held) {
      this.#held.delete(digest); // most recently used goes last
      this.#held.set(digest, held);
      if (Date.now() - held.touched >= TOUCH_INTERVAL_MS) {
        held.touched = Date.now();
        await touch(file);
      }
      return held.bytes;
    }
    const cached = await fs.readFile(file).catch(() => undefined);
    if (cached && moduleDigest(cached) === digest) {
      await touch(file);
      return this.#hold(digest, cached);
    }
    const shared = this.#fetching.get(digest);
    if (shared) {
      // Refused for the execution it asked for (cancelled meanwhile, say): this one asks for itself.
      return shared.catch(() => this.#fetch(executionId, digest, file));
    }
    const bytes = this.#fetch(executionId, digest, file)
      .then((fetched) => this.#hold(digest, fetched))
      .finally(() => this.#fetching.delete(digest));
    this.#fetching.set(digest, bytes);
    return bytes;
  }

  /** Holds a checked module in memory, letting the least recently used go past the cap. */
  #hold(digest: string, bytes: Buffer): Buffer {
    const cap = this.#o.maxMemoryBytes ?? DEFAULT_MODULE_MEMORY_BYTES;
    if (bytes.length > cap || this.#held.has(digest)) return bytes;
    this.#held.set(digest, { bytes, touched: Date.now() });
    this.#heldBytes += bytes.length;
    for (const [d, held] of this.#held) {
      if (this.#heldBytes <= cap) break;
      this.#held.delete(d);
      this.#heldBytes -= held.bytes.length;
    }
    return bytes;
  }

  async #fetch(executionId: string, digest: string, file: string): Promise<Buffer> {
    const maxBytes = this.#o.maxModuleBytes ?? DEFAULT_MAX_MODULE_BYTES;
    const parts: Buffer[] = [];
    let received = 0;
    let size: number | undefined;
    let unknown = 0;
    let unanswered = 0;
    const pause = (times: number) =>
      new Promise((resolve) => setTimeout(resolve, times * (this.#o.retryMs ?? UNKNOWN_RETRY_MS)));
    while (size === undefined || received < size) {
      let reply: MessageBody<"module-reply">;
      try {
        reply = await this.#o.request({ executionId, digest, offset: received });
      } catch (err) {
        if (unanswered++ < NO_ANSWER_RETRIES) {
          await pause(4);
          continue;
        }
        throw unavailable(digest, `the orchestrator did not answer: ${(err as Error).message}`, err);
      }
      // Not known yet (its record is on its way) or not known here (a new orchestrator after a failover).
      if (reply.unknown && unknown++ < UNKNOWN_RETRIES) {
        await pause(1);
        continue;
      }
      if (reply.size === undefined || reply.data === undefined) {
        throw unavailable(digest, `the orchestrator refused it: ${reply.reason ?? "no reason given"}`);
      }
      const data = Buffer.from(reply.data, "base64");
      if (reply.size > maxBytes) {
        throw unavailable(digest, `it is ${formatBytes(reply.size)}, over ${formatBytes(maxBytes)}`);
      }
      if (
        (size !== undefined && reply.size !== size) ||
        data.length === 0 ||
        received + data.length > reply.size
      ) {
        throw unavailable(digest, "the orchestrator's answers do not add up to one module");
      }
      size = reply.size;
      parts.push(data);
      received += data.length;
    }
    const bytes = Buffer.concat(parts);
    if (moduleDigest(bytes) !== digest) {
      throw unavailable(digest, "the bytes fetched do not match the digest the job names");
    }
    this.#o.log.info({ module: digest, bytes: bytes.length, executionId }, "module fetched");
    await this.#keep(file, bytes).catch((err) =>
      this.#o.log.warn({ err, module: digest }, "cannot keep the fetched module; it will be fetched again"),
    );
    return bytes;
  }

  /** Writes the module (atomically) and evicts the least recently used past the cap. */
  async #keep(file: string, bytes: Buffer): Promise<void> {
    await writeFileAtomic(file, bytes, 0o600);
    const names = (await fs.readdir(this.#o.dir)).filter((n) => n.endsWith(".wasm"));
    const entries = await Promise.all(
      names.map(async (name) => {
        const p = path.join(this.#o.dir, name);
        const st = await fs.stat(p).catch(() => undefined);
        return { p, size: st?.size ?? 0, used: st?.mtimeMs ?? 0 };
      }),
    );
    let total = entries.reduce((sum, e) => sum + e.size, 0);
    const cap = this.#o.maxCachedBytes ?? DEFAULT_MODULE_CACHE_BYTES;
    for (const e of entries.sort((a, b) => a.used - b.used)) {
      if (total <= cap) break;
      if (e.p === file) continue;
      await fs.rm(e.p, { force: true });
      total -= e.size;
    }
  }
}

/** Marks a kept module's file as just used (its modification time orders the disk's eviction). */
async function touch(file: string): Promise<void> {
  const now = new Date();
  await fs.utimes(file, now, now).catch(() => {});
}
