import fc from "fast-check";
import t from "tap";
import { type Cursor, OrderedKeys, tieOf } from "../orchestrator/ordered-keys.js";

interface Row {
  time: number;
}

/** The reference: every row sorted from scratch, highest rank first, ties by digest. */
function sorted(rows: Map<string, Row>): string[] {
  return [...rows]
    .map(([key, row]) => ({ key, rank: row.time, tie: tieOf(key) }))
    .sort((a, b) => b.rank - a.rank || (a.tie < b.tie ? 1 : a.tie > b.tie ? -1 : 0))
    .map((e) => e.key);
}

const keysOf = (index: OrderedKeys<Row>, below?: Cursor) => [...index.descending(below)].map((e) => e.key);

// Few keys and few times, so keys are set again, deleted and ranked equal often.
const operation = fc.oneof(
  fc.record({
    op: fc.constant("set" as const),
    key: fc.integer({ min: 0, max: 30 }),
    time: fc.integer({ min: 0, max: 8 }),
  }),
  fc.record({ op: fc.constant("delete" as const), key: fc.integer({ min: 0, max: 30 }) }),
);

t.test("the index lists what a full sort lists, after any sets and deletes", async (t) => {
  fc.assert(
    fc.property(fc.array(operation, { maxLength: 200 }), (ops) => {
      const rows = new Map<string, Row>();
      const index = new OrderedKeys<Row>((r) => r.time);
      for (const o of ops) {
        const key = `j-${o.key}`;
        const previous = rows.get(key);
        if (o.op === "set") {
          const row = { time: o.time };
          rows.set(key, row);
          index.set(key, row, previous);
        } else if (previous) {
          rows.delete(key);
          index.delete(key, previous);
        }
      }
      const expected = sorted(rows);
      if (index.size !== rows.size) return false;
      if (keysOf(index).join() !== expected.join()) return false;
      // Going on from any row's cursor gives exactly the rows after it.
      const all = [...index.descending()];
      return all.every((e, i) => keysOf(index, e.cursor).join() === expected.slice(i + 1).join());
    }),
    { numRuns: 300 },
  );
  t.pass("300 random histories agree with the reference");
});

t.test("a cursor keeps its place when its row and others change", async (t) => {
  const index = new OrderedKeys<Row>((r) => r.time);
  const rows = new Map<string, Row>();
  const set = (key: string, time: number) => {
    const row = { time };
    index.set(key, row, rows.get(key));
    rows.set(key, row);
  };
  for (let i = 0; i < 10; i++) set(`j-${i}`, i);
  const [, , third] = [...index.descending()];
  t.equal(third?.key, "j-7");
  index.delete("j-7", rows.get("j-7")!);
  rows.delete("j-7");
  set("j-new", 100);
  t.same(
    keysOf(index, third!.cursor),
    ["j-6", "j-5", "j-4", "j-3", "j-2", "j-1", "j-0"],
    "deleted row: the next ones",
  );
  t.same(keysOf(index, { rank: 4.5, tie: "" }), ["j-4", "j-3", "j-2", "j-1", "j-0"], "a rank between rows");
  t.same(keysOf(index, { rank: -1, tie: "" }), [], "below every row: nothing");
  set("j-5", 5);
  t.equal(index.size, 10, "setting a row again with the same rank adds nothing");
  set("j-5", 50);
  t.same(keysOf(index).slice(0, 2), ["j-new", "j-5"], "a changed rank moves the row");
  t.equal(index.size, 10);
  index.delete("j-other", { time: 4 });
  t.equal(index.size, 10, "deleting a key it does not hold removes nothing, even at an equal rank");
  t.notMatch(JSON.stringify(third!.cursor), /j-7/, "a cursor does not name its row");
});
