import type { JetStreamManager, MsgRequest, StoredMsg } from "@nats-io/jetstream";

/**
 * Reads of single stored messages that need no stream leader and no
 * consumer: a direct get, which any live replica answers (so it works for
 * seconds after a server loss, when the stream has no leader), else the
 * stream's leader, because the replica that answered may be behind.
 */

/** The first message of `stream` on `subject` (wildcards allowed) after sequence `after`; null when none is stored. */
export function nextStored(
  jsm: JetStreamManager,
  stream: string,
  subject: string,
  after: number,
): Promise<StoredMsg | null> {
  return stored(jsm, stream, { seq: after + 1, next_by_subj: subject });
}

/** The last message of `stream` on `subject`; null when none is stored. */
export function lastStored(
  jsm: JetStreamManager,
  stream: string,
  subject: string,
): Promise<StoredMsg | null> {
  return stored(jsm, stream, { last_by_subj: subject });
}

async function stored(
  jsm: JetStreamManager,
  stream: string,
  query: { seq: number; next_by_subj: string } | { last_by_subj: string },
): Promise<StoredMsg | null> {
  const direct = await jsm.direct.getMessage(stream, query).catch(() => null);
  // STREAM.MSG.GET has taken next_by_subj since nats-server 2.9; the client's type omits it.
  return direct ?? jsm.streams.getMessage(stream, query as unknown as MsgRequest);
}
