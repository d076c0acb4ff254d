import { pino } from "pino";
import t from "tap";
import { LogThrottle } from "../core/index.js";
import { NODE_CONTROL_LIMITS, nodeControlLimits, Pacer, RateLimit, TokenBucket } from "../fabric/index.js";

/**
 * The rate a node's messages are held to: a token bucket, the sender's pacer
 * (in order, nothing dropped) and the receiver's per-sender limit (the excess
 * dropped); and the throttle on the receiver's warnings about it.
 */

t.test("a token bucket gives its burst at once, then its rate", async (t) => {
  const bucket = new TokenBucket({ perSecond: 10, burst: 3 }, 0);
  t.same(
    [1, 2, 3, 4].map(() => bucket.take(0)),
    [true, true, true, false],
  );
  t.equal(bucket.delay(0), 100, "one token every 100 ms");
  t.notOk(bucket.take(99));
  t.ok(bucket.take(100));
  t.same(
    [0, 1, 2, 3].map(() => bucket.take(10_000)),
    [true, true, true, false],
    "a quiet spell refills it to the burst, no further",
  );
  t.ok(
    new TokenBucket({ perSecond: 10, burst: 3 }, 50).take(0),
    "a clock that steps back takes nothing away",
  );
});

t.test("a reservation runs the bucket into debt for a bounded wait", async (t) => {
  const bucket = new TokenBucket({ perSecond: 1000, burst: 1000 }, 0);
  t.equal(bucket.reserve(0, 1000, 0), 0, "the burst at once");
  t.equal(bucket.reserve(0, 500, 600), 500, "half a second ahead, within the longest wait");
  t.equal(bucket.reserve(0, 200, 600), undefined, "0.7 s ahead is past it: nothing taken");
  t.equal(bucket.reserve(0, 100, 600), 600, "so 0.6 s ahead still is");
  t.notOk(bucket.take(599), "the debt is paid before anything else is taken");
  t.ok(bucket.take(601));
});

t.test("a per-sender limit drops each sender's excess alone and forgets the least recent", async (t) => {
  let now = 0;
  const limit = new RateLimit({ perSecond: 100, burst: 2 }, () => now, 2);
  t.same([limit.admit("n1"), limit.admit("n1"), limit.admit("n1")], [true, true, false]);
  t.ok(limit.admit("n2"), "another sender has its own bucket");
  now = 10;
  t.ok(limit.admit("n1"), "refilled at the rate");
  t.notOk(limit.admit("n1"));
  t.ok(limit.admit("n3"), "a third sender: the least recently seen (n2) is forgotten");
  t.notOk(limit.admit("n1"), "n1 was seen since, and is still counted");
  t.ok(limit.admit("n2") && limit.admit("n2"), "n2 starts again with a full bucket");
});

t.test("a pacer sends at once within the burst, then in order at the rate", async (t) => {
  const pacer = new Pacer({ perSecond: 200, burst: 5 });
  const sent: number[] = [];
  const start = performance.now();
  const all = new Promise<void>((resolve) => {
    for (let i = 0; i < 25; i++) {
      pacer.send(() => {
        sent.push(i);
        if (i === 24) resolve();
      });
    }
  });
  t.same(sent, [0, 1, 2, 3, 4], "the burst goes synchronously");
  t.equal(pacer.waiting, 20);
  const turn = pacer.turn().then(() => sent.push(-1));
  await all;
  await turn;
  t.same(sent, [...Array.from({ length: 25 }, (_, i) => i), -1], "nothing dropped, nothing reordered");
  t.ok(performance.now() - start >= 95, "21 past the burst at 200/s take at least 100 ms");
  t.equal(pacer.waiting, 0);
});

t.test("a log throttle passes one line per key per interval and counts the rest", async (t) => {
  let now = 0;
  const throttle = new LogThrottle(1000, () => now, 2);
  t.equal(throttle.pass("a"), 0);
  t.equal(throttle.pass("a"), undefined);
  t.equal(throttle.pass("a"), undefined);
  t.equal(throttle.pass("b"), 0, "each key has its own interval");
  now = 1000;
  t.equal(throttle.pass("a"), 2, "the next line says how many were held back");
  t.equal(throttle.pass("a"), undefined);
  t.equal(throttle.pass("c"), 0, "a third key: the least recently logged (b) is forgotten");
  t.equal(throttle.pass("b"), 0, "and passes again at once");
});

t.test(
  "a throttled warning is one line per key and message per interval, the next saying what was held",
  async (t) => {
    let now = 0;
    const throttle = new LogThrottle(1000, () => now);
    const lines: { msg: string; node: string; heldBack?: number }[] = [];
    const log = pino({ level: "warn" }, { write: (line: string) => lines.push(JSON.parse(line)) });
    for (let i = 0; i < 3; i++) throttle.warn(log, "n1", { node: "n1" }, "refused");
    throttle.warn(log, "n1", { node: "n1" }, "another complaint");
    throttle.warn(log, "n2", { node: "n2" }, "refused");
    now = 1000;
    throttle.warn(log, "n1", { node: "n1" }, "refused");
    t.same(
      lines.map((l) => [l.msg, l.node, l.heldBack]),
      [
        ["refused", "n1", undefined],
        ["another complaint", "n1", undefined],
        ["refused", "n2", undefined],
        ["refused", "n1", 2],
      ],
    );
  },
);

t.test("a node's register and renew limits keep twice the pace an honest node keeps", async (t) => {
  const defaults = nodeControlLimits({ heartbeatMs: 5000, certTtlMs: 24 * 3_600_000 });
  t.same(defaults, NODE_CONTROL_LIMITS, "default heartbeats and lifetimes: the floors");
  const short = nodeControlLimits({ heartbeatMs: 100, certTtlMs: 20_000 });
  t.equal(
    short.register.perSecond,
    20,
    "a PENDING node registers once per 100 ms heartbeat: 10 a second, twice that",
  );
  t.equal(short.renew.perSecond, 0.15, "a 20 s certificate is renewed every 13.3 s at most: twice that");
  t.equal(short.renew.burst, NODE_CONTROL_LIMITS.renew.burst);
});
