import type { Msg, Subscription } from "@nats-io/transport-node";
import { type Logger, silentLogger } from "../core/index.js";
import type { FabricConnection } from "./connection.js";
import type { EnvelopeSigner, EnvelopeVerifier, VerifiedEnvelope } from "./envelope.js";
import { FabricError } from "./errors.js";
import { Pacer, type Rate } from "./message-rate.js";
import type { MessageBody, MessageKind } from "./protocol.js";

/** Answers a verified request with a signed reply addressed to its sender. */
export interface SignedReplier {
  respond<K extends MessageKind>(kind: K, body: MessageBody<K>): void;
}

export type VerifiedHandler = (
  envelope: VerifiedEnvelope,
  reply: SignedReplier | undefined,
  msg: Msg,
) => void | Promise<void>;

/**
 * Signed messaging over a fabric connection: every publish is an envelope signed
 * by this daemon, every delivery is verified before the handler sees it (refused
 * messages are logged with their code and dropped), and replies are signed too.
 * Given a `rate`, publishes and requests keep to it: each waits its turn, in
 * order, and is signed when it goes (replies are not held).
 */
export class FabricMessenger {
  readonly #log: Logger;
  #signer: EnvelopeSigner;
  readonly #pacer: Pacer | undefined;

  constructor(
    readonly connection: FabricConnection,
    signer: EnvelopeSigner,
    readonly verifier: EnvelopeVerifier,
    logger: Logger = silentLogger,
    rate?: Rate,
  ) {
    this.#signer = signer;
    this.#log = logger.child({ component: "fabric-messenger" });
    this.#pacer = rate ? new Pacer(rate) : undefined;
  }

  /** The current signer; replaced when the daemon's certificate is renewed. */
  get signer(): EnvelopeSigner {
    return this.#signer;
  }

  /** Signs everything from now on with `signer` (a renewed certificate and its new key). */
  useSigner(signer: EnvelopeSigner): void {
    this.#signer = signer;
  }

  #handlerFailed(err: unknown, envelope: VerifiedEnvelope): void {
    this.#log.error({ err, kind: envelope.kind }, "handler failed");
  }

  /** Signs and publishes, now or at its turn; a publish that fails (the connection closed) is logged. */
  publishSigned<K extends MessageKind>(subject: string, kind: K, aud: string, body: MessageBody<K>): void {
    const send = () => this.#publish(subject, kind, aud, body);
    if (this.#pacer) this.#pacer.send(send);
    else send();
  }

  /**
   * Waits for its turn, then signs and publishes: for a sender that can wait
   * and would otherwise queue much (the chunks of a large result). Unlike
   * {@link publishSigned}, a publish that fails rejects, so the sender can tell
   * a message that will never go (`SHOAL_NATS_MAX_PAYLOAD`) from one that went.
   */
  async publishSignedInTurn<K extends MessageKind>(
    subject: string,
    kind: K,
    aud: string,
    body: MessageBody<K>,
  ): Promise<void> {
    await this.#pacer?.turn();
    this.connection.publish(subject, this.signer.sign(kind, aud, body));
  }

  #publish<K extends MessageKind>(subject: string, kind: K, aud: string, body: MessageBody<K>): void {
    try {
      this.connection.publish(subject, this.signer.sign(kind, aud, body));
    } catch (err) {
      // Sends that waited their turn past a close (or into its drain) are expected to fail: not worth a warning each.
      this.#log[this.connection.isClosing() ? "debug" : "warn"]({ kind, err }, "cannot publish");
    }
  }

  /** Sends a signed request and returns the verified reply, which must come from `aud`. */
  async requestSigned<K extends MessageKind>(
    subject: string,
    kind: K,
    aud: string,
    body: MessageBody<K>,
    timeoutMs = 10_000,
  ): Promise<VerifiedEnvelope> {
    await this.#pacer?.turn();
    const msg = await this.connection.request(subject, this.signer.sign(kind, aud, body), timeoutMs);
    return this.verifier.verify(msg.data, { subject: msg.subject, expectedIss: aud });
  }

  /**
   * Subscribes (confirmed by the broker) and hands each verified envelope to
   * `handler`; `onRejected` sees refused ones (default: a warning in the log).
   */
  subscribeVerified(
    subject: string,
    handler: VerifiedHandler,
    onRejected: (error: FabricError, msg: Msg) => void = (error, msg) =>
      this.#log.warn({ code: error.code, subject: msg.subject, details: error.details }, error.message),
  ): Promise<Subscription> {
    return this.connection.subscribe(subject, {
      callback: (err, msg) => {
        if (err) return;
        let envelope: VerifiedEnvelope;
        try {
          envelope = this.verifier.verify(msg.data, { subject: msg.subject });
        } catch (e) {
          if (e instanceof FabricError) onRejected(e, msg);
          else this.#log.error({ err: e }, "envelope verification crashed");
          return;
        }
        const reply: SignedReplier | undefined = msg.reply
          ? { respond: (kind, body) => msg.respond(this.signer.sign(kind, envelope.iss, body)) }
          : undefined;
        // Called directly: a microtask and two promises per message are measurable
        // at thousands of messages a second; only an async handler's promise is chained.
        try {
          handler(envelope, reply, msg)?.catch((e: unknown) => this.#handlerFailed(e, envelope));
        } catch (e) {
          this.#handlerFailed(e, envelope);
        }
      },
    });
  }
}
