import { type Logger, type LoggerOptions, pino } from "pino";

export type { Logger } from "pino";

/**
 * Paths whose values never reach a log line: keys, tokens, passwords, secrets
 * and Authorization headers, at the top level and one or two levels down.
 */
export const REDACT_PATHS: readonly string[] = (() => {
  const names = [
    "password",
    "passphrase",
    "secret",
    "token",
    "accessToken",
    "refreshToken",
    "joinToken",
    "key",
    "privateKey",
    "keyPem",
    "authorization",
    "Authorization",
    "cookie",
  ];
  const paths: string[] = [];
  for (const n of names) paths.push(n, `*.${n}`, `*.*.${n}`);
  paths.push('headers["authorization"]', 'req.headers["authorization"]', "req.headers.cookie");
  return paths;
})();

export type LogFormat = "json" | "text";

export interface LoggerSettings {
  /** @default "info" */
  level?: string;
  /** `json` for machines, `text` for a terminal (still one line per event). @default "json" */
  format?: LogFormat;
  /** Where lines go. @default process.stderr */
  destination?: NodeJS.WritableStream;
}

/** The root logger of a process. Components take `logger.child({ component })`. */
export function createLogger(settings: LoggerSettings = {}): Logger {
  const options: LoggerOptions = {
    level: settings.level ?? "info",
    redact: { paths: [...REDACT_PATHS], censor: "[redacted]" },
    base: { pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
  };
  if (settings.format === "text") {
    options.formatters = { level: (label) => ({ level: label }) };
  }
  return pino(options, (settings.destination ?? process.stderr) as pino.DestinationStream);
}

/** A logger that drops everything; for library callers and tests that do not care. */
export const silentLogger: Logger = pino({ level: "silent" });
