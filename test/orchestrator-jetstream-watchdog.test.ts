import t, { type Test } from "tap";
import { silentLogger } from "../core/index.js";
import { JetStreamWatchdog } from "../orchestrator/jetstream-watchdog.js";

/**
 * The watchdog's counting, with a probe the test answers or not. The restart
 * of a real nats-server whose JetStream hangs on a full disk is in
 * e2e-disk-full.test.ts.
 */
function watch(t: Test, answers: () => boolean, failures = 3) {
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
    failures,
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
