import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import { type ConsumerMessages, type JetStreamClient, type JsMsg, jetstream } from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import { connect } from "@nats-io/transport-node";
import t, { type Test } from "tap";
import { silentLogger } from "../core/index.js";
import { followBucket, type KvChange, readBucket } from "../orchestrator/kv-follow.js";
import { startJetStream, tempDir, waitUntil } from "./helpers/cluster.js";

/**
 * The follower against a real nats-server. What JetStream 2.9 does after a
 * server of the cluster is lost (a consumer placed on it delivers nothing,
 * and creating a new one may time out again and again) is reproduced by
 * handing the follower a client whose consumers misbehave so; every other
 * request, the direct reads among them, goes to the server.
 */
async function bucket(t: Test) {
  const url = await startJetStream(t, await tempDir(t, "shoal-follow-"));
  const nc = await connect({ servers: url });
  t.teardown(() => nc.close());
  const js = jetstream(nc);
  const kv = await new Kvm(js).create("follow", { history: 1 });
  return { js, kv };
}

/** A consumer as one placed on a lost server behaves: created, then silent. */
const silentConsumer = {
  consume: async () => ({
    stop: async () => {},
    [Symbol.asyncIterator]: () => ({ next: () => new Promise<never>(() => {}) }),
  }),
};

/** `js` whose n-th consumer creation (from 1) is answered by `consumer(n)`. */
function withConsumers(js: JetStreamClient, consumer: (n: number) => Promise<unknown> | undefined) {
  let n = 0;
  const consumers = new Proxy(js.consumers, {
    get: (target, prop) =>
      prop === "get"
        ? (...args: Parameters<JetStreamClient["consumers"]["get"]>) => consumer(++n) ?? target.get(...args)
        : Reflect.get(target, prop),
  });
  return new Proxy(js, {
    get: (target, prop) => (prop === "consumers" ? consumers : Reflect.get(target, prop)),
  });
}

/** `js` whose direct gets are answered by a replica left behind: it has nothing newer, ever. */
function behindReplica(js: JetStreamClient): JetStreamClient {
  return new Proxy(js, {
    get: (target, prop) =>
      prop === "jetstreamManager"
        ? async () =>
            new Proxy(await target.jetstreamManager(), {
              get: (jsm, name) =>
                name === "direct" ? { getMessage: async () => null } : Reflect.get(jsm, name),
            })
        : Reflect.get(target, prop),
  });
}

/**
 * Writes `count` changes a few ms apart, each to a key of its own (every fifth a delete), so
 * that none is removed from the stream by a later one, and returns their revisions.
 */
async function write(js: JetStreamClient, kv: KV, count: number): Promise<number[]> {
  const jsm = await js.jetstreamManager();
  const revisions: number[] = [];
  for (let i = 0; i < count; i++) {
    const key = `k${i}`;
    if (i % 5 === 4) {
      await kv.delete(key);
      revisions.push((await jsm.streams.info("KV_follow")).state.last_seq);
    } else {
      revisions.push(await kv.put(key, `v${i}`));
    }
    await new Promise((r) => setTimeout(r, 3));
  }
  return revisions;
}

async function follow(t: Test, js: JetStreamClient) {
  const changes: KvChange[] = [];
  const stop = await followBucket({ js, bucket: "follow", checkMs: 100, log: silentLogger }, (c) =>
    changes.push(c),
  );
  t.teardown(stop);
  return changes;
}

t.test("follows every change after it starts, in order, once each", async (t) => {
  const { js, kv } = await bucket(t);
  await kv.put("before", "old");
  const changes = await follow(t, js);
  const revisions = await write(js, kv, 20);
  await waitUntil("every change arrived", async () => (changes.length >= 20 ? true : undefined), 10_000);
  t.same(
    changes.map((c) => c.revision),
    revisions,
  );
  t.same(changes[0], { key: "k0", revision: revisions[0], value: new TextEncoder().encode("v0") });
  t.equal(changes[4]?.key, "k4");
  t.equal(changes[4]?.value, undefined, "a delete carries no value");
  t.notOk(
    changes.some((c) => c.key === "before"),
    "changes before it started are not replayed",
  );
});

t.test("a silent consumer whose replacement never gets created: the changes are read directly", async (t) => {
  const { js, kv } = await bucket(t);
  const changes = await follow(
    t,
    withConsumers(js, (n) => (n === 1 ? Promise.resolve(silentConsumer) : new Promise(() => {}))),
  );
  const revisions = await write(js, kv, 30);
  await waitUntil("every change arrived", async () => (changes.length >= 30 ? true : undefined), 10_000);
  t.same(
    changes.map((c) => c.revision),
    revisions,
  );
  const more = await write(js, kv, 3);
  await waitUntil("later changes arrived too", async () => (changes.length >= 33 ? true : undefined), 10_000);
  t.same(
    changes.slice(30).map((c) => c.revision),
    more,
  );
  t.same(changes[4]?.value, undefined, "a delete read directly carries no value");
});

t.test(
  "a silent consumer, then a working one: no change is missed or delivered twice across the switch",
  async (t) => {
    const { js, kv } = await bucket(t);
    let created = 0;
    const changes = await follow(
      t,
      withConsumers(js, (n) => {
        created = n;
        return n <= 2 ? Promise.resolve(silentConsumer) : undefined;
      }),
    );
    // Written while the follower finds the first consumer silent, reads directly, starts a second
    // silent one, reads directly again and starts a working one.
    const revisions = await write(js, kv, 200);
    await waitUntil("every change arrived", async () => (changes.length >= 200 ? true : undefined), 10_000);
    t.same(
      changes.map((c) => c.revision),
      revisions,
    );
    t.equal(created, 3, "a working consumer was started after two silent ones");
  },
);

t.test(
  "a silent consumer and a replica left behind: the changes are read from the stream's leader",
  async (t) => {
    const { js, kv } = await bucket(t);
    const changes = await follow(t, behindReplica(withConsumers(js, () => Promise.resolve(silentConsumer))));
    const revisions = await write(js, kv, 20);
    await waitUntil("every change arrived", async () => (changes.length >= 20 ? true : undefined), 10_000);
    t.same(
      changes.map((c) => c.revision),
      revisions,
    );
  },
);

t.test("a bucket is read whole in one stream: each key's last value, no deleted key", async (t) => {
  const { js, kv } = await bucket(t);
  t.same(await readBucket(js, "follow"), [], "an empty bucket, at once");
  await kv.put("a", "1");
  await kv.put("b", "1");
  const a2 = await kv.put("a", "2");
  await kv.put("c", "1");
  await kv.delete("c");
  await kv.put("d", "1");
  await kv.purge("d");
  const text = (changes: KvChange[]) =>
    Object.fromEntries(changes.map((c) => [c.key, `${Buffer.from(c.value!).toString()}@${c.revision}`]));
  t.same(
    text(await readBucket(js, "follow")),
    { a: `2@${a2}`, b: "1@2" },
    "last values with their revisions",
  );
  await kv.delete("a");
  await kv.delete("b");
  t.same(await readBucket(js, "follow"), [], "only deleted keys: nothing, at once");

  // Many keys: more than the consumer delivers before it asks for flow control.
  const many = 20_000;
  for (let i = 0; i < many; i += 1000) {
    await Promise.all(Array.from({ length: 1000 }, (_, k) => kv.put(`k${i + k}`, `${i + k}`)));
  }
  const read = await readBucket(js, "follow");
  t.equal(read.length, many, `all ${many} keys`);
  t.ok(
    read.every((c) => c.key === `k${Buffer.from(c.value).toString()}`),
    "each with its own value",
  );
  // Asked every millisecond whether anything is still to come, the read still waits for all of it.
  t.equal(
    (await readBucket(js, "follow", { idleCheckMs: 1 })).length,
    many,
    "idle checks do not cut it short",
  );
});

t.test("a read slower than the server sends is not cut short: it asks for a little at a time", async (t) => {
  // nats-server drops messages for a client once it holds max_pending bytes for it (64 MiB by
  // default; 256 KiB here), as it did for an orchestrator loading 100,000 jobs in four buckets at once.
  const dir = await tempDir(t, "shoal-follow-pending-");
  const conf = path.join(dir, "pending.conf");
  await fs.writeFile(conf, "max_pending: 262144\nmax_payload: 65536\n");
  const nc = await connect({ servers: await startJetStream(t, path.join(dir, "js"), ["-c", conf]) });
  t.teardown(() => nc.close());
  const js = jetstream(nc);
  const kv = await new Kvm(js).create("pending", { history: 1 });
  const keys = 2000;
  const value = "x".repeat(4096); // 8 MiB in all, more than the socket's buffers take
  for (let i = 0; i < keys; i += 250) {
    await Promise.all(Array.from({ length: 250 }, (_, k) => kv.put(`k${i + k}`, value)));
  }
  // The read gets 20 ms of the event loop in every 120: the socket is drained slowly.
  const busy = setInterval(() => {
    const until = performance.now() + 100;
    while (performance.now() < until);
  }, 20);
  t.teardown(() => clearInterval(busy));
  const read = await readBucket(js, "pending");
  clearInterval(busy);
  t.equal(read.length, keys, "every key");
});

/** `js` whose consumers' `consume(options)` is `consume(real)`. */
function withConsume(
  js: JetStreamClient,
  consume: (real: () => Promise<ConsumerMessages>) => Promise<ConsumerMessages>,
): JetStreamClient {
  const consumers = new Proxy(js.consumers, {
    get: (target, prop) =>
      prop === "get"
        ? async (...args: Parameters<JetStreamClient["consumers"]["get"]>) => {
            const consumer = await target.get(...args);
            return new Proxy(consumer, {
              get: (c, name) => {
                if (name === "consume")
                  return (options: Parameters<typeof c.consume>[0]) => consume(() => c.consume(options));
                const value = Reflect.get(c, name) as unknown;
                return typeof value === "function" ? value.bind(c) : value;
              },
            });
          }
        : Reflect.get(target, prop),
  });
  return new Proxy(js, {
    get: (target, prop) => (prop === "consumers" ? consumers : Reflect.get(target, prop)),
  });
}

t.test(
  "a read whose pending messages are purged before delivery ends without the 30 s heartbeat",
  async (t) => {
    const { js, kv } = await bucket(t);
    await kv.put("a", "1");
    await kv.put("b", "1");
    const jsm = await js.jetstreamManager();
    // Between the consumer's creation (2 pending) and its delivery, everything is purged.
    const purged = withConsume(js, async (consume) => {
      await jsm.streams.purge("KV_follow");
      return consume();
    });
    const started = performance.now();
    t.same(await readBucket(purged, "follow", { idleCheckMs: 200 }), [], "nothing is left");
    t.ok(performance.now() - started < 5_000, "ended by the idle check, not the 30 s heartbeat");
  },
);

t.test("a read whose messages are delivered but not read yet is not ended by the idle check", async (t) => {
  const { js, kv } = await bucket(t);
  await Promise.all(Array.from({ length: 20 }, (_, i) => kv.put(`k${i}`, `${i}`)));
  // All 20 are delivered at once (nothing pending) and handed out 20 ms apart; a stop drops
  // what was not handed out yet, as nats.js drops messages that arrive after a stop.
  const slow = withConsume(js, async (consume) => {
    const messages = await consume();
    const delivered: JsMsg[] = [];
    for await (const m of messages) if (delivered.push(m) === 20) break;
    let stopped = false;
    return new Proxy(messages, {
      get: (m, name) => {
        if (name === "stop") {
          return () => {
            stopped = true;
          };
        }
        if (name === Symbol.asyncIterator) {
          return () => ({
            next: async () => {
              await new Promise((r) => setTimeout(r, 20));
              const value = stopped ? undefined : delivered.shift();
              return value ? { value, done: false } : { value: undefined, done: true };
            },
          });
        }
        const value = Reflect.get(m, name) as unknown;
        return typeof value === "function" ? value.bind(m) : value;
      },
    });
  });
  t.equal(
    (await readBucket(slow, "follow", { idleCheckMs: 5 })).length,
    20,
    "every key, though checks came in between",
  );
});
