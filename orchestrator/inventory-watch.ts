import { type FSWatcher, watch } from "node:fs";
import type { Logger } from "../core/index.js";
import type { BrokerIdentity } from "../fabric/index.js";
import { INVENTORY_FILE, type Pki, revokedIdentities } from "../pki/index.js";

/** Far enough in the future for identities whose certificates Shoal does not see. */
const NO_EXPIRY = new Date("9999-12-31T00:00:00Z");

/**
 * The broker's identities: every orchestrator and compute certificate in the
 * PKI inventory (the broker drops expired and revoked ones itself, and
 * schedules the reload for the next expiry) plus the operator's
 * `Orchestrator.NodeManager.Identities`, whose certificates live elsewhere
 * (left out once revoked by `shoal node delete`). `revokedElsewhere` holds
 * serials another orchestrator of the cluster revoked.
 */
export async function brokerIdentities(
  pki: Pki,
  extra: readonly string[],
  revokedElsewhere: ReadonlySet<string> = new Set(),
): Promise<BrokerIdentity[]> {
  const out: BrokerIdentity[] = [];
  for (const e of await pki.list()) {
    if (!e.spiffeId || (e.role !== "compute" && e.role !== "orchestrator")) continue;
    out.push({
      spiffeId: e.spiffeId,
      notBefore: new Date(e.notBefore),
      notAfter: new Date(e.notAfter),
      revoked: e.status === "revoked" || revokedElsewhere.has(e.serial),
    });
  }
  const barred = new Set((await revokedIdentities(pki.dir)).map((r) => r.spiffeId));
  for (const spiffeId of extra) out.push({ spiffeId, notAfter: NO_EXPIRY, revoked: barred.has(spiffeId) });
  return out;
}

/**
 * Calls `onChange` shortly after the PKI inventory file changes — including
 * when `shoal pki issue`/`revoke` runs in another process against the same
 * directory. The file is replaced by rename, so the directory is watched.
 * Changes within `debounceMs` are folded into one call.
 */
export class InventoryWatcher {
  readonly #dir: string;
  readonly #onChange: () => Promise<void>;
  readonly #log: Logger;
  readonly #debounceMs: number;
  #watcher: FSWatcher | undefined;
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> = Promise.resolve();

  constructor(dir: string, onChange: () => Promise<void>, log: Logger, debounceMs = 100) {
    this.#dir = dir;
    this.#onChange = onChange;
    this.#log = log;
    this.#debounceMs = debounceMs;
  }

  start(): void {
    this.#watcher = watch(this.#dir, (_event, file) => {
      if (file && !String(file).includes(INVENTORY_FILE)) return;
      if (this.#timer) clearTimeout(this.#timer);
      this.#timer = setTimeout(() => {
        this.#timer = undefined;
        this.#running = this.#running
          .then(() => this.#onChange())
          .catch((err) => this.#log.error({ err }, "cannot apply the PKI inventory change"));
      }, this.#debounceMs);
    });
    this.#watcher.on("error", (err) => this.#log.error({ err }, "PKI inventory watch failed"));
  }

  async close(): Promise<void> {
    this.#watcher?.close();
    if (this.#timer) clearTimeout(this.#timer);
    await this.#running;
  }
}
