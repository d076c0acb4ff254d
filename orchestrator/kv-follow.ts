import { DeliverPolicy, type JetStreamClient } from "@nats-io/jetstream";
import { type Logger, within } from "../core/index.js";
import { nextStored } from "./stored-messages.js";

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

const KV_OPERATION = "KV-Operation";
/** The size of the value a headers-only consumer left out. */
const MESSAGE_SIZE = "Nats-Msg-Size";

/** Whether a KV stream message (`op`: its KV-Operation header) deletes or purges its key. */
function isDeletion(op: string | undefined, size: number): boolean {
  return op === "DEL" || op === "PURGE" || size === 0;
}

/** At most this many changes are read directly from the bucket per check. */
const DIRECT_READS_PER_CHECK = 1000;

/**
 * Follows a KV bucket's changes from now on, in revision order, through an
 * ordered consumer on its stream. The consumer lives on one server and,
 * when that server is lost (an orchestrator of the cluster going down with
 * its nats-server), it may stay silent for good or for tens of seconds; and
 * JetStream 2.9 may place a new one on the lost server too, so that its
 * creation times out (15 s in a cluster) again and again.
 *
 * So the follower also asks the bucket, every `checkMs`, for the first
 * change after the last revision it delivered: with a direct get that any
 * live replica answers (no stream or meta leader needed) and, when that finds
 * nothing newer, from the stream's leader, since the replica that answered
 * (this server's own, first) can be the one left behind. When it stayed
 * behind for two checks, the consumer is dropped, the missing changes are
 * read directly, and a new consumer is started in the background; until
 * that one runs, every check reads the new changes directly. No change is
 * missed or delivered twice. A read gets `checkMs` to answer, so a check
 * never waits out a leader election. Returns the stop function.
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
  let starting = false;
  let stopped = false;
  /** `op`: the message's KV-Operation header. */
  const deliver = (seq: number, subject: string, data: Uint8Array, op: string | undefined) => {
    if (seq <= delivered || stopped) return;
    delivered = seq;
    onChange({
      key: subject.slice(prefix.length),
      revision: seq,
      value: isDeletion(op, data.length) ? undefined : data,
    });
  };
  const consume = async () => {
    const consumer = await o.js.consumers.get(stream, {
      filter_subjects: `${prefix}>`,
      deliver_policy: DeliverPolicy.StartSequence,
      opt_start_seq: delivered + 1,
    });
    const messages = await consumer.consume();
    if (stopped) {
      await messages.stop();
      return;
    }
    stopConsumer = () => messages.stop();
    void (async () => {
      for await (const m of messages) deliver(m.seq, m.subject, m.data, m.headers?.get(KV_OPERATION));
    })().catch((err) => o.log.warn({ err, bucket: o.bucket }, "bucket consumer ended"));
  };
  await consume();
  const startConsumer = () => {
    starting = true;
    consume()
      .catch((err) => o.log.warn({ err, bucket: o.bucket }, "cannot start a bucket consumer"))
      .finally(() => {
        starting = false;
      });
  };
  let behindAt: number | undefined;
  let checking = false;
  const checkMs = o.checkMs ?? 2000;
  // Each read is given up after checkMs. A read the stream's leader answers waits the
  // whole JetStream timeout (15 s in a cluster) while a new leader is being elected after
  // a server loss, and a check stuck on it held up every check behind it: measured in the
  // takeover proof, reads waiting 15 s each and another orchestrator's copy of a job
  // lagging over 10 s. The abandoned request ends by itself; the next check asks again.
  const check = async () => {
    const next = await within(nextStored(jsm, stream, `${prefix}>`, delivered), checkMs).catch(
      () => undefined,
    );
    if (next === undefined || stopped) return;
    if (next === null || next.seq <= delivered) {
      behindAt = undefined;
      return;
    }
    const consuming = stopConsumer !== undefined;
    // A running consumer gets one more check to deliver what it has not yet.
    if (consuming && behindAt !== delivered) {
      behindAt = delivered;
      return;
    }
    behindAt = undefined;
    if (consuming) {
      o.log.warn(
        { bucket: o.bucket, delivered, next: next.seq },
        "bucket consumer stalled; reading the bucket directly",
      );
      stopConsumer?.();
      stopConsumer = undefined;
    }
    deliver(next.seq, next.subject, next.data, next.header.get(KV_OPERATION));
    for (let i = 1; i < DIRECT_READS_PER_CHECK && !stopped; i++) {
      const m = await within(nextStored(jsm, stream, `${prefix}>`, delivered), checkMs);
      if (!m) break;
      deliver(m.seq, m.subject, m.data, m.header.get(KV_OPERATION));
    }
    if (!starting && !stopped) startConsumer();
  };
  const timer = setInterval(() => {
    if (checking) return;
    checking = true;
    void check()
      .catch((err) => o.log.warn({ err, bucket: o.bucket }, "cannot read the bucket directly"))
      .finally(() => {
        checking = false;
      });
  }, checkMs);
  timer.unref();
  return () => {
    stopped = true;
    clearInterval(timer);
    stopConsumer?.();
  };
}

/** How long a bucket's read waits for a message before it asks whether any is still to come. */
export const READ_IDLE_CHECK_MS = 1000;

/**
 * Most messages of a bucket a read asks the server for at a time: 32 MiB at
 * the very most (a value is one NATS message, 1 MiB), half of what nats-server
 * holds for a client that does not keep up (`max_pending`, 64 MiB by default);
 * a few hundred KiB for job records. (Asking by bytes instead, nats.js 3.4
 * topped up with requests smaller than a record, which the server refused.)
 */
export const READ_BATCH_MESSAGES = 32;

/**
 * The current value of every key of a bucket (deleted and purged keys left
 * out; with `keysOnly`, the keys and revisions with empty values), read by one ordered consumer that delivers the last message of each
 * key's subject. A direct get per key read 60,000 keys in 15 s here, and all
 * sent at once, the last of them waited out their timeout.
 *
 * The consumer pulls `batchMessages` at a time. A push consumer (as `kv.keys()`
 * uses) was sent everything at once: with the four buckets of 100,000 jobs
 * read together at an orchestrator's start, the server held over 64 MiB for
 * the connection, dropped messages ("Slow Consumer Detected"), and the read,
 * ended by the consumer's next heartbeat 30 s later, had loaded a third of the
 * jobs.
 *
 * The read ends at the message after which nothing is pending. When what was
 * pending is purged before it is delivered (a job collection elsewhere in the
 * cluster), no such message comes: every `idleCheckMs` without a message the
 * consumer is asked, and the read ends once nothing is pending and everything
 * it delivered has been read.
 */
export async function readBucket(
  js: JetStreamClient,
  bucket: string,
  {
    idleCheckMs = READ_IDLE_CHECK_MS,
    batchMessages = READ_BATCH_MESSAGES,
    keysOnly = false,
  }: { idleCheckMs?: number; batchMessages?: number; keysOnly?: boolean } = {},
): Promise<(KvChange & { value: Uint8Array })[]> {
  const prefix = `$KV.${bucket}.`;
  const consumer = await js.consumers.get(`KV_${bucket}`, {
    filter_subjects: `${prefix}>`,
    deliver_policy: DeliverPolicy.LastPerSubject,
    headers_only: keysOnly,
  });
  if ((await consumer.info()).num_pending === 0) return [];
  const messages = await consumer.consume({ max_messages: batchMessages });
  /** The last message read: its consumer (an ordered consumer is replaced after a gap) and its delivery number. */
  let last = { consumer: "", delivery: 0 };
  let checked = last;
  /** One question at a time: at short intervals they would crowd out the pulls. */
  let asking = false;
  const idle = setInterval(() => {
    if (last !== checked) {
      checked = last;
      return;
    }
    if (asking) return;
    asking = true;
    void consumer
      .info()
      .then(
        ({ name, num_pending, delivered }) => {
          // Nothing to deliver, and nothing delivered that was not read (a purge moves `stream_seq` on).
          const allRead =
            delivered.consumer_seq === 0 ||
            (name === last.consumer && delivered.consumer_seq <= last.delivery);
          if (num_pending === 0 && allRead) messages.stop();
        },
        () => {}, // asked again at the next check
      )
      .finally(() => {
        asking = false;
      });
  }, idleCheckMs);
  const current = new Map<string, KvChange & { value: Uint8Array }>();
  try {
    for await (const m of messages) {
      last = { consumer: m.info.consumer, delivery: m.info.deliverySequence };
      const key = m.subject.slice(prefix.length);
      // Without its value, a message says how big it was (0: a deleted key).
      const size = keysOnly ? Number(m.headers?.get(MESSAGE_SIZE) ?? 0) : m.data.length;
      if (isDeletion(m.headers?.get(KV_OPERATION), size)) current.delete(key);
      else current.set(key, { key, revision: m.seq, value: m.data });
      if (m.info.pending === 0) break;
    }
  } finally {
    clearInterval(idle);
    messages.stop();
  }
  return [...current.values()];
}
