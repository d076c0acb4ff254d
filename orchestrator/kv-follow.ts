import { DeliverPolicy, type JetStreamClient } from "@nats-io/jetstream";
import type { Logger } from "../core/index.js";

/** One change of a KV bucket as its stream carries it; `value` undefined: deleted or purged. */
export interface KvChange {
  key: string;
  revision: number;
  value: Uint8Array | undefined;
}

export interface KvFollowOptions {
  js: JetStreamClient;
  bucket: string;
  /** `"new"`: changes from now on; `"all"`: every key's current value first. */
  from: "new" | "all";
  /** Pull expiry; a consumer lost with its server is noticed after about this long. @default 5000 */
  expiresMs?: number;
  log: Logger;
}

/**
 * Follows a KV bucket's changes through an ordered consumer on its stream.
 * Unlike a KV watch (a push consumer, gone for good when the server holding
 * it goes away, e.g. a lost orchestrator of the cluster), the ordered
 * consumer notices missed heartbeats and recreates itself from the last
 * revision it delivered, so no change is missed. Returns the stop function.
 */
export async function followBucket(
  o: KvFollowOptions,
  onChange: (change: KvChange) => void,
): Promise<() => void> {
  const consumer = await o.js.consumers.get(`KV_${o.bucket}`, {
    filter_subjects: `$KV.${o.bucket}.>`,
    deliver_policy: o.from === "new" ? DeliverPolicy.New : DeliverPolicy.All,
  });
  const messages = await consumer.consume({ expires: Math.max(1000, o.expiresMs ?? 5000) });
  const prefix = `$KV.${o.bucket}.`;
  void (async () => {
    for await (const m of messages) {
      const op = m.headers?.get("KV-Operation");
      const deleted = op === "DEL" || op === "PURGE" || m.data.length === 0;
      onChange({ key: m.subject.slice(prefix.length), revision: m.seq, value: deleted ? undefined : m.data });
    }
  })().catch((err) => o.log.error({ err, bucket: o.bucket }, "following the bucket ended"));
  return () => messages.stop();
}
