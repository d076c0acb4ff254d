import "reflect-metadata";
import { readFile } from "node:fs/promises";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { connectFabric, EnvelopeSigner, type MessageBody } from "../fabric/index.js";

// The sending side of bench/fabric.ts, in its own process so that the receiver's
// core does only what a receiving daemon does (deliver + verify). Driven over IPC.

export interface PublisherSetup {
  readonly plainPort: number;
  readonly fabricUrl: string;
  readonly caFile: string;
  readonly certFile: string;
  readonly keyFile: string;
  readonly identity: string;
  readonly aud: string;
}

export interface PublisherRun {
  readonly n: number;
  readonly subject: string;
  /** raw: the same bytes each time; presigned: N envelopes signed before the clock starts; live: signed while sending. */
  readonly mode: "raw" | "presigned" | "live";
  readonly transport: "plain" | "mtls";
  /** Stop sending while this many messages are unconfirmed by the receiver (it reports every 1,000). */
  readonly window: number;
}

export type ToPublisher =
  | { type: "setup"; setup: PublisherSetup }
  | { type: "prepare"; run: PublisherRun }
  | { type: "go" }
  | { type: "received"; count: number }
  | { type: "exit" };

export type FromPublisher =
  | { type: "up" }
  | { type: "ready" }
  | { type: "prepared"; bytes: number }
  | { type: "sent" };

export const HEARTBEAT: MessageBody<"heartbeat"> = {
  nodeId: "n1",
  seq: 1,
  allocated: { cpu: 1.5, memory: 2 ** 30 },
  running: ["e-0001", "e-0002", "e-0003"],
};

const send = (m: FromPublisher) => process.send?.(m);

if (process.send) {
  let plain: NatsConnection | undefined;
  let mtls: NatsConnection | undefined;
  let signer: EnvelopeSigner | undefined;
  let aud = "";
  let run: PublisherRun | undefined;
  let messages: Uint8Array[] = [];
  let confirmed = 0;
  let wake: (() => void) | undefined;
  const enc = new TextEncoder();

  const go = async (r: PublisherRun) => {
    const nc = (r.transport === "plain" ? plain : mtls) as NatsConnection;
    const s = signer as EnvelopeSigner;
    for (let i = 0; i < r.n; i++) {
      while (i - confirmed >= r.window) await new Promise<void>((w) => (wake = w));
      const data =
        r.mode === "live"
          ? s.sign("heartbeat", aud, HEARTBEAT)
          : (messages[r.mode === "raw" ? 0 : i] as Uint8Array);
      nc.publish(r.subject, data);
      if (i % 1000 === 999) await nc.flush();
    }
    await nc.flush();
    send({ type: "sent" });
  };

  process.on("message", (m: ToPublisher) => {
    switch (m.type) {
      case "setup":
        void (async () => {
          const o = m.setup;
          signer = new EnvelopeSigner({
            keyPem: await readFile(o.keyFile, "utf8"),
            certPem: await readFile(o.certFile, "utf8"),
          });
          aud = o.aud;
          plain = await connect({ port: o.plainPort });
          mtls = (
            await connectFabric({
              servers: o.fabricUrl,
              caFile: o.caFile,
              certFile: o.certFile,
              keyFile: o.keyFile,
              identity: o.identity,
            })
          ).nc;
          send({ type: "ready" });
        })();
        return;
      case "prepare": {
        run = m.run;
        confirmed = 0;
        const s = signer as EnvelopeSigner;
        messages =
          run.mode === "presigned"
            ? Array.from({ length: run.n }, () => enc.encode(s.sign("heartbeat", aud, HEARTBEAT)))
            : [enc.encode(s.sign("heartbeat", aud, HEARTBEAT))];
        send({ type: "prepared", bytes: (messages[0] as Uint8Array).length });
        return;
      }
      case "go":
        void go(run as PublisherRun);
        return;
      case "received":
        confirmed = m.count;
        wake?.();
        return;
      case "exit":
        void Promise.all([plain?.close(), mtls?.close()]).then(() => process.exit(0));
    }
  });
  // The bench died or was stopped: do not linger.
  process.on("disconnect", () => process.exit(0));
  send({ type: "up" });
}
