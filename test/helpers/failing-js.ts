import type { JetStreamClient } from "@nats-io/jetstream";

/**
 * `js`, whose publishes (the KV writes) to a subject fail after
 * `failsAfter(subject)` ms, as to a JetStream that does not answer; undefined:
 * the publish goes through.
 */
export function withFailingPublish(
  js: JetStreamClient,
  failsAfter: (subject: string) => number | undefined,
): JetStreamClient {
  return new Proxy(js, {
    get: (target, prop, receiver) =>
      prop === "publish"
        ? (subject: string, ...rest: unknown[]) => {
            const ms = failsAfter(subject);
            return ms === undefined
              ? (target.publish as (...a: unknown[]) => unknown).call(target, subject, ...rest)
              : new Promise((_, reject) => setTimeout(() => reject(new Error("timeout")), ms));
          }
        : Reflect.get(target, prop, receiver),
  });
}

/** `js`, whose publishes (the KV writes) go through `ms` later, as to a slow JetStream. */
export function withSlowPublish(js: JetStreamClient, ms: number): JetStreamClient {
  return new Proxy(js, {
    get: (target, prop, receiver) =>
      prop === "publish"
        ? async (...args: unknown[]) => {
            await new Promise((r) => setTimeout(r, ms));
            return (target.publish as (...a: unknown[]) => unknown).apply(target, args);
          }
        : Reflect.get(target, prop, receiver),
  });
}
