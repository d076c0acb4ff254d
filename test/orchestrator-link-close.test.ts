import "reflect-metadata";
import t from "tap";
import { subjects } from "../fabric/index.js";
import type { Dispatcher } from "../orchestrator/dispatcher.js";
import { CLOSE_GRACE_MS } from "../orchestrator/fabric-link.js";
import { startTestLink } from "./helpers/fabric-link.js";
import { registeredNode } from "./helpers/nats.js";
import { eventually, resultMessages } from "./helpers/records.js";

t.test("a stop lets a result being stored finish, and its node gets the answer", async (t) => {
  const { fabric, orchId, n1, link } = await startTestLink(t);
  let storing = false;
  let stored: () => void = () => {};
  const gate = new Promise<void>((resolve) => {
    stored = resolve;
  });
  link.attach({
    handleResult: async () => {
      storing = true;
      await gate;
      return { stored: true };
    },
  } as unknown as Dispatcher);
  const node = await registeredNode(t, fabric, n1, orchId);
  const answer = node.messenger.requestSigned(
    subjects.computeOut("n1", "result"),
    "result",
    orchId.spiffeId,
    resultMessages("e-1", []).manifest,
    CLOSE_GRACE_MS,
  );
  await eventually("the result is being stored", () => storing);

  let closed = false;
  const closing = link.close().then(() => {
    closed = true;
  });
  await new Promise((r) => setTimeout(r, 200));
  t.notOk(closed, "the stop waits for it");
  stored();
  await closing;
  t.same((await answer).body, { stored: true }, "and the node is answered");
});
