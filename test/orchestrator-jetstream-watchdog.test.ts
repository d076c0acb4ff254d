import t, { type Test } from "tap";
import { silentLogger } from "../core/index.js";
import { JetStreamWatchdog } from "../orchestrator/jetstream-watchdog.js";

/**
 * The watchdog's counting, with a probe the test answers or not. The restart
 * of a real nats-server whose JetStream hangs on a full disk is in
 * e2e-disk-full.test.ts, and of one server of a cluster in
 * e2e-cluster-disk-full.test.ts.
 */
function watch(
  t: Test,
  answers: () => boolean,
  o: { cause?: () => Promise<string | undefined>; causeMemoryMs?: number } = {},
) {
  /** Each restart's reason, and how many probes came before it. */
  const restarts: [string, number][] = [];
  let probes = 0;
  let inFlight = 0;
  let overlapped = false;
  const watchdog = new JetStreamWatchdog({
    probe: async () => {
      probes++;
      overlapped ||= inFlight > 0;
      inFlight++;
      // Longer than the interval: the next tick comes while this probe is pending.
      await new Promise((r) => setTimeout(r, 15));
      inFlight--;
      if (!answers()) throw new Error("timeout");
    },
    restart: async (reason) => {
      restarts.push([reason, probes]);
    },
    log: silentLogger,
    intervalMs: 5,
    ...(o.cause ? { cause: o.cause } : {}),
    ...(o.causeMemoryMs === undefined ? {} : { causeMemoryMs: o.causeMemoryMs }),
  });
  watchdog.start();
  t.teardown(() => watchdog.stop());
  return { restarts, probes: () => probes, overlapped: () => overlapped };
}

const until = async (what: string, ok: () => boolean) => {
  for (let i = 0; i < 400 && !ok(); i++) await new Promise((r) => setTimeout(r, 5));
  if (!ok()) throw new Error(`never: ${what}`);
};

t.test("a JetStream that answers is never restarted", async (t) => {
  const w = watch(t, () => true);
  await until("ten probes", () => w.probes() >= 10);
  t.same(w.restarts, []);
  t.notOk(w.overlapped(), "one probe at a time");
});

t.test("three unanswered probes in a row restart it, once, and the count starts over", async (t) => {
  const w = watch(t, () => false);
  await until("two restarts", () => w.restarts.length === 2);
  t.same(w.restarts, [
    ["JetStream did not answer 3 times in a row", 3],
    ["JetStream did not answer 3 times in a row", 6],
  ]);
});

t.test("an answer in between resets the count", async (t) => {
  let n = 0;
  // Fails twice, answers once, and so on: never three in a row.
  const w = watch(t, () => ++n % 3 === 0);
  await until("twelve probes", () => w.probes() >= 12);
  t.same(w.restarts, []);
});

t.test(
  "in a cluster, a streak without a cause on this server restarts nothing (a lost quorum)",
  async (t) => {
    let asked = 0;
    const cause = async () => {
      asked++;
      return undefined;
    };
    const w = watch(t, () => false, { cause });
    await until("twelve probes", () => w.probes() >= 12);
    t.same(w.restarts, []);
    t.ok(asked >= 11, "the cause is asked at each probe");
  },
);

t.test(
  "in a cluster, a cause seen at a probe of the streak restarts the server at its end, naming it",
  async (t) => {
    let n = 0;
    // Short of room at the second probe only: the operator frees space, the server still hangs.
    const cause = async () => (++n === 2 ? "/data has 0.1 MiB free" : undefined);
    const w = watch(t, () => false, { cause });
    await until("a restart", () => w.restarts.length === 1);
    t.same(w.restarts[0], ["JetStream did not answer 3 times in a row (/data has 0.1 MiB free)", 3]);
  },
);

/** Short of room at the first probe only, which is answered; no answer after it. */
function shortThenHung() {
  let probes = 0;
  let causes = 0;
  return { answers: () => ++probes === 1, cause: async () => (++causes === 1 ? "short" : undefined) };
}

t.test(
  "in a cluster, a cause is remembered: a server that hangs once room is made is started again",
  async (t) => {
    const { answers, cause } = shortThenHung();
    const w = watch(t, answers, { cause });
    await until("a restart", () => w.restarts.length === 1);
    t.same(w.restarts[0], ["JetStream did not answer 3 times in a row (short)", 4]);
  },
);

t.test("in a cluster, a cause older than causeMemoryMs counts no more", async (t) => {
  const { answers, cause } = shortThenHung();
  const w = watch(t, answers, { cause, causeMemoryMs: 1 });
  await until("twelve probes", () => w.probes() >= 12);
  t.same(w.restarts, []);
});
