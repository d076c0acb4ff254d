import fc from "fast-check";
import t from "tap";
import { ReplayGuard } from "../fabric/index.js";

/** One message offered to the guard: who sent it, its id, how long it lives, and how far the clock moved first. */
const offer = fc.record({
  issuer: fc.integer({ min: 0, max: 5 }),
  jti: fc.integer({ min: 0, max: 30 }),
  lifetimeMs: fc.integer({ min: 1, max: 5000 }),
  advanceMs: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 2000 })),
});

t.test("the replay guard never accepts a replay and keeps its bounds, whatever senders do", async (t) => {
  fc.assert(
    fc.property(
      fc.array(offer, { maxLength: 300 }),
      fc.integer({ min: 4, max: 40 }),
      fc.integer({ min: 1, max: 40 }),
      fc.integer({ min: 1, max: 40 }),
      (offers, maxEntries, perIssuer, crowdedPercent) => {
        let now = 1_000_000;
        const maxPerIssuer = Math.min(perIssuer, maxEntries);
        const crowdedEntries = Math.max(1, Math.floor((maxEntries * crowdedPercent) / 40));
        const guard = new ReplayGuard({ maxEntries, maxPerIssuer, crowdedEntries, now: () => now });
        /** What was accepted: `issuer/jti` → when it may be forgotten. */
        const accepted = new Map<string, number>();
        const heard = new Set<number>();
        for (const o of offers) {
          now += o.advanceMs;
          const key = `${o.issuer}/${o.jti}`;
          const live = (accepted.get(key) ?? Number.NEGATIVE_INFINITY) > now;
          const sizeBefore = guard.size;
          const verdict = guard.check(`n${o.issuer}`, `j${o.jti}`, now + o.lifetimeMs);
          if (live && verdict !== "replay") throw new Error(`${key} accepted twice (${verdict})`);
          if (!live && verdict === "replay") throw new Error(`${key} called a replay after it expired`);
          if (!heard.has(o.issuer) && sizeBefore < maxEntries && verdict !== "fresh") {
            throw new Error(`a sender never heard before was refused (${verdict}) with room left`);
          }
          if (verdict === "fresh") {
            accepted.set(key, now + o.lifetimeMs);
            heard.add(o.issuer);
          }
          if (guard.size > maxEntries) throw new Error(`${guard.size} entries held, at most ${maxEntries}`);
          const ownLive = [...accepted].filter(([k, at]) => k.startsWith(`${o.issuer}/`) && at > now).length;
          if (ownLive > maxPerIssuer)
            throw new Error(`n${o.issuer} holds ${ownLive} live ids, at most ${maxPerIssuer}`);
        }
      },
    ),
    { numRuns: 300 },
  );
  t.pass("300 random runs");
});
