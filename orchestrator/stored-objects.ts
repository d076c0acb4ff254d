import { createHash } from "node:crypto";
import type { JetStreamManager } from "@nats-io/jetstream";
import type { ObjectInfo } from "@nats-io/obj";
import { lastStored, nextStored } from "./stored-messages.js";

/**
 * Reads and purges of a JetStream object store's objects (result files,
 * modules) that work in a cluster that just lost a server: the client
 * library's `info` asks only the stream's leader, which a cluster is without
 * for seconds after a server loss, and its reader creates a consumer, which
 * nats-server 2.9 may place on the lost server (its creation then times out).
 */

/** The subject of an object's description: its name in padded base64url (ADR-20). */
function metaSubject(bucket: string, name: string): string {
  const token = Buffer.from(name).toString("base64").replace(/\+/g, "-").replace(/\//g, "_");
  return `$O.${bucket}.M.${token}`;
}

/** An object's description, read as {@link lastStored} reads (a direct get, else the leader). */
export async function objectInfo(
  jsm: JetStreamManager,
  bucket: string,
  name: string,
): Promise<ObjectInfo | undefined> {
  const m = await lastStored(jsm, `OBJ_${bucket}`, metaSubject(bucket, name));
  return m ? m.json<ObjectInfo>() : undefined;
}

/**
 * An object's chunks, read one by one as {@link nextStored} reads (a direct
 * get that any live replica answers, else the leader when that replica is
 * behind). Errors out unless the chunks add up to `expected` (size and hex
 * SHA-256), which the caller knows from a source it trusts.
 */
export async function* objectChunks(
  jsm: JetStreamManager,
  info: ObjectInfo,
  expected: { size: number; sha256: string },
): AsyncGenerator<Uint8Array> {
  const stream = `OBJ_${info.bucket}`;
  const subject = `$O.${info.bucket}.C.${info.nuid}`;
  const hash = createHash("sha256");
  let seq = 0;
  let size = 0;
  for (let i = 0; i < info.chunks; i++) {
    const m = await nextStored(jsm, stream, subject, seq);
    if (!m) break;
    seq = m.seq;
    size += m.data.length;
    hash.update(m.data);
    yield m.data;
  }
  if (size !== expected.size || hash.digest("hex") !== expected.sha256) {
    throw new Error(`stored object ${info.name} is incomplete or does not match its digest`);
  }
}

/** Purges an object's chunks and description, so no delete marker stays behind. */
export async function purgeObject(jsm: JetStreamManager, bucket: string, name: string): Promise<void> {
  const stream = `OBJ_${bucket}`;
  const info = await objectInfo(jsm, bucket, name);
  if (info) await jsm.streams.purge(stream, { filter: `$O.${bucket}.C.${info.nuid}` });
  await jsm.streams.purge(stream, { filter: metaSubject(bucket, name) });
}
