import t from "tap";
import { Tally } from "../core/index.js";

t.test("a tally counts each key and forgets it at zero", async (t) => {
  const tally = new Tally();
  tally.add("a");
  tally.add("a");
  tally.add("b");
  t.equal(tally.get("a"), 2);
  t.same([...tally.keys()], ["a", "b"]);
  tally.remove("a");
  t.equal(tally.get("a"), 1);
  tally.remove("a");
  t.notOk(tally.has("a"), "gone at zero");
  t.equal(tally.get("a"), 0);
  tally.remove("c");
  t.notOk(tally.has("c"), "removing what is not held leaves nothing behind");
});
