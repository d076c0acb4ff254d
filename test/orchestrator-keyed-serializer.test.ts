import t from "tap";
import { KeyedSerializer } from "../orchestrator/keyed-serializer.js";

const tick = (ms: number) => new Promise((r) => setTimeout(r, ms));

t.test(
  "tasks of one key run one at a time in submission order, even when an early one is slower",
  async (t) => {
    const order = new KeyedSerializer();
    const log: string[] = [];
    const task = (name: string, ms: number) => async () => {
      log.push(`start ${name}`);
      await tick(ms);
      log.push(`end ${name}`);
      return name;
    };
    const results = await Promise.all([
      order.run("e1", task("chunk", 30)),
      order.run("e1", task("manifest", 0)),
    ]);
    t.same(results, ["chunk", "manifest"]);
    t.same(log, ["start chunk", "end chunk", "start manifest", "end manifest"]);
  },
);

t.test("different keys run concurrently", async (t) => {
  const order = new KeyedSerializer();
  const log: string[] = [];
  await Promise.all([
    order.run("e1", async () => {
      log.push("e1 start");
      await tick(30);
      log.push("e1 end");
    }),
    order.run("e2", async () => {
      log.push("e2 start");
      await tick(0);
      log.push("e2 end");
    }),
  ]);
  t.same(log, ["e1 start", "e2 start", "e2 end", "e1 end"]);
});

t.test("a failed task rejects its own caller only; the next one still runs", async (t) => {
  const order = new KeyedSerializer();
  const failed = order.run("e1", async () => {
    throw new Error("disk full");
  });
  const next = order.run("e1", async () => "stored");
  await t.rejects(failed, /disk full/);
  t.equal(await next, "stored");
});
