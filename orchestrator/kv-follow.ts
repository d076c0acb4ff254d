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
  /** How often the follower checks that it keeps up with the bucket. @default 2000 */
  checkMs?: number;
  log: Logger;
}

/**
 * Follows a KV bucket's changes from now on, in revision order, through an
 * ordered consumer on its stream. A KV watch or ordered consumer lives on
 * one server and, when that server is lost (an orchestrator of the cluster
 * going down with its nats-server), may stay silent for good or for tens of
 * seconds; so the follower also compares, every `checkMs`, the stream's last
 * sequence with the last revision it delivered, and when it stayed behind
 * for two checks it starts a new consumer right after that revision. No
 * change is missed or delivered twice. Returns the stop function.
 */
export async function followBucket(
  o: KvFollowOptions,
  onChange: (change: KvChange) => void,
): Promise<() => void> {
  const stream = `KV_${o.bucket}`;
  const prefix = `$KV.${o.bucket}.`;
  const jsm = await o.js.jetstreamManager();
  let delivered = (await jsm.streams.info(stream)).state.last_seq;
  let stopConsumer: (() => void) | undefined;
  let stopped = false;
  const consume = async () => {
    const consumer = await o.js.consumers.get(stream, {
      filter_subjects: `${prefix}>`,
      deliver_policy: DeliverPolicy.StartSequence,
      opt_start_seq: delivered + 1,
    });
    const messages = await consumer.consume();
    stopConsumer = () => messages.stop();
    void (async () => {
      for await (const m of messages) {
        if (m.seq <= delivered) continue;
        delivered = m.seq;
        const op = m.headers?.get("KV-Operation");
        const deleted = op === "DEL" || op === "PURGE" || m.data.length === 0;
        onChange({
          key: m.subject.slice(prefix.length),
          revision: m.seq,
          value: deleted ? undefined : m.data,
        });
      }
    })().catch((err) => o.log.warn({ err, bucket: o.bucket }, "bucket consumer ended"));
  };
  await consume();
  let behindAt: number | undefined;
  let checking = false;
  const check = async () => {
    const last = await jsm.streams.info(stream).then(
      (info) => info.state.last_seq,
      () => undefined,
    );
    if (last === undefined || stopped) return;
    if (last <= delivered) {
      behindAt = undefined;
    } else if (behindAt !== delivered) {
      behindAt = delivered;
    } else {
      o.log.warn({ bucket: o.bucket, delivered, last }, "bucket consumer stalled; starting a new one");
      stopConsumer?.();
      behindAt = undefined;
      await consume().catch((err) => o.log.warn({ err, bucket: o.bucket }, "cannot start a bucket consumer"));
    }
  };
  const timer = setInterval(() => {
    if (checking) return;
    checking = true;
    void check().finally(() => {
      checking = false;
    });
  }, o.checkMs ?? 2000);
  timer.unref();
  return () => {
    stopped = true;
    clearInterval(timer);
    stopConsumer?.();
  };
}
