import { FABRIC_CODES, type FabricCode } from "./errors.js";

export type NatsLogLevel = "trace" | "debug" | "info" | "warn" | "error" | "fatal";

/** A client (or another server's route) the broker refused, as its log line tells it (the server-side reason). */
export interface ClientRejection {
  readonly code: FabricCode;
  /** `ip:port` of the client. */
  readonly remote: string | undefined;
  /** The client's `name`/lang/version as nats-server prints it. */
  readonly client: string | undefined;
  /** The mapped identity, for permission violations. */
  readonly user: string | undefined;
  readonly operation: "publish" | "subscribe" | undefined;
  readonly subject: string | undefined;
  readonly reason: string;
}

export interface NatsLogLine {
  readonly level: NatsLogLevel;
  readonly message: string;
  readonly rejection: ClientRejection | undefined;
}

const LEVELS: Record<string, NatsLogLevel> = {
  TRC: "trace",
  DBG: "debug",
  INF: "info",
  WRN: "warn",
  ERR: "error",
  FTL: "fatal",
};

// [pid] yyyy/mm/dd hh:mm:ss.micro [LVL] message
const LINE = /^\[\d+\] \d{4}\/\d\d\/\d\d \d\d:\d\d:\d\d\.\d+ \[([A-Z]{3})\] (.*)$/;
// ip:port - cid:N - "client" - rest   (the client part is absent before CONNECT)
const CLIENT = /^(\S+) - cid:\d+ - (?:"([^"]*)" - )?(.*)$/;
// ip:port - rid:N - rest   (a route: another server of the cluster)
const ROUTE = /^(\S+) - rid:\d+ - (.*)$/;
const VIOLATION = /^(Publish|Subscription) Violation - User "([^"]*)", Subject "([^"]*)"/;

/**
 * Warnings nats-server 2.9 prints when nothing is wrong, logged at debug: at
 * every reload it checks each client mapped from its certificate
 * (`verify_and_map`) again, and warns that the user name it set itself at the
 * first check came "in connect proto" — one line per connected node at each
 * enrollment or renewal otherwise.
 */
const BENIGN_WARNINGS = [/^User "[^"]*" found in connect proto, but user required from cert$/];

const TLS_REASONS: [RegExp, FabricCode][] = [
  [/didn't provide a certificate/, FABRIC_CODES.SHOAL_TLS_NO_CLIENT_CERT],
  [/signed by unknown authority/, FABRIC_CODES.SHOAL_TLS_CLIENT_UNKNOWN_CA],
  [/incompatible key usage/, FABRIC_CODES.SHOAL_TLS_CLIENT_EKU],
  [
    /expired or is not yet valid: current time \S+ is before/,
    FABRIC_CODES.SHOAL_TLS_CLIENT_CERT_NOT_YET_VALID,
  ],
  [/expired or is not yet valid/, FABRIC_CODES.SHOAL_TLS_CLIENT_CERT_EXPIRED],
  [/certificate not pinned/, FABRIC_CODES.SHOAL_NATS_AUTHORIZATION],
];

/**
 * Parses one nats-server log line: its level, its text, and when it reports a
 * refused client, the reason as a fabric code. This is the server-side half of
 * "failures that explain themselves": the client often sees only a closed
 * socket, the operator's log names the cause.
 */
export function parseNatsLogLine(line: string): NatsLogLine {
  const m = LINE.exec(line);
  if (!m) return { level: "info", message: line, rejection: undefined };
  const message = m[2] as string;
  let level = LEVELS[m[1] as string] ?? "info";
  if (level === "warn" && BENIGN_WARNINGS.some((re) => re.test(message))) level = "debug";
  return { level, message, rejection: level === "error" ? parseRejection(message) : undefined };
}

function parseRejection(message: string): ClientRejection | undefined {
  const r = ROUTE.exec(message);
  if (r) {
    const [, remote, rest] = r as unknown as [string, string, string];
    // A route that fails the fabric CA, the route name, or our own certificate at the peer.
    if (!/^TLS route handshake error|^authentication error/i.test(rest)) return undefined;
    return {
      code: FABRIC_CODES.SHOAL_NATS_ROUTE_REJECTED,
      remote,
      client: undefined,
      user: undefined,
      operation: undefined,
      subject: undefined,
      reason: rest,
    };
  }
  const c = CLIENT.exec(message);
  if (!c) return undefined;
  const [, remote, client, rest] = c as unknown as [string, string, string | undefined, string];
  const base = { remote, client, user: undefined, operation: undefined, subject: undefined, reason: rest };
  if (rest.startsWith("TLS handshake error")) {
    const code = TLS_REASONS.find(([re]) => re.test(rest))?.[1] ?? FABRIC_CODES.SHOAL_TLS_HANDSHAKE;
    return { ...base, code };
  }
  if (/^authentication error/i.test(rest)) return { ...base, code: FABRIC_CODES.SHOAL_NATS_AUTHORIZATION };
  const v = VIOLATION.exec(rest);
  if (v) {
    return {
      ...base,
      code: FABRIC_CODES.SHOAL_NATS_PERMISSION,
      operation: v[1] === "Publish" ? "publish" : "subscribe",
      user: v[2],
      subject: v[3],
    };
  }
  return undefined;
}
