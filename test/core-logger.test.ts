import "reflect-metadata";
import { Writable } from "node:stream";
import t from "tap";
import { createLogger, type LoggerSettings } from "../core/index.js";

/** A logger writing into an array of parsed JSON lines. */
function capture(settings: LoggerSettings = {}) {
  const lines: Record<string, unknown>[] = [];
  const destination = new Writable({
    write(chunk, _encoding, done) {
      for (const line of String(chunk).split("\n")) if (line) lines.push(JSON.parse(line));
      done();
    },
  });
  return { logger: createLogger({ ...settings, destination }), lines };
}

const SECRET = "s3cr3t-value-that-must-not-appear";

t.test("secrets are redacted at the top level", async (t) => {
  const { logger, lines } = capture();
  logger.info(
    {
      password: SECRET,
      token: SECRET,
      key: SECRET,
      passphrase: SECRET,
      secret: SECRET,
      privateKey: SECRET,
      joinToken: SECRET,
      authorization: SECRET,
      Authorization: SECRET,
      user: "alice",
      keyPath: "API.Port",
    },
    "login",
  );
  const line = lines[0]!;
  for (const field of ["password", "token", "key", "passphrase", "secret", "privateKey", "joinToken"]) {
    t.equal(line[field], "[redacted]", field);
  }
  t.equal(line.authorization, "[redacted]");
  t.equal(line.Authorization, "[redacted]");
  t.equal(line.user, "alice", "other fields are kept");
  t.equal(line.keyPath, "API.Port", "only the exact names are secret");
  t.equal(line.msg, "login");
  t.notMatch(JSON.stringify(lines), SECRET);
});

t.test("secrets are redacted one and two levels down, and in authorization headers", async (t) => {
  const { logger, lines } = capture();
  logger.info({
    user: { name: "alice", password: SECRET },
    tls: { key: SECRET, cert: "public" },
    enrollment: { request: { token: SECRET, passphrase: SECRET, nodeId: "n1" } },
    store: { admin: { secret: SECRET } },
    headers: { authorization: `Bearer ${SECRET}`, accept: "application/json" },
    req: { method: "GET", headers: { authorization: `Bearer ${SECRET}`, cookie: SECRET, host: "h" } },
  });
  const line = lines[0] as Record<string, Record<string, Record<string, unknown>>>;
  t.equal(line.user!.password, "[redacted]");
  t.equal(line.user!.name, "alice");
  t.equal(line.tls!.key, "[redacted]");
  t.equal(line.tls!.cert, "public");
  t.equal(line.enrollment!.request!.token, "[redacted]");
  t.equal(line.enrollment!.request!.passphrase, "[redacted]");
  t.equal(line.enrollment!.request!.nodeId, "n1");
  t.equal(line.store!.admin!.secret, "[redacted]");
  t.equal(line.headers!.authorization, "[redacted]");
  t.equal(line.headers!.accept, "application/json");
  t.equal(line.req!.headers!.authorization, "[redacted]");
  t.equal(line.req!.headers!.cookie, "[redacted]");
  t.equal(line.req!.headers!.host, "h");
  t.notMatch(JSON.stringify(lines), SECRET);
});

t.test("child loggers keep redaction and carry their component", async (t) => {
  const { logger, lines } = capture({ level: "debug" });
  const child = logger.child({ component: "auth" });
  child.debug({ password: SECRET, attempt: 2 }, "password login");
  t.equal(lines[0]!.component, "auth");
  t.equal(lines[0]!.password, "[redacted]");
  t.equal(lines[0]!.attempt, 2);
  t.notMatch(JSON.stringify(lines), SECRET);
});

t.test("level and format settings", async (t) => {
  const quiet = capture({ level: "warn" });
  quiet.logger.info("hidden");
  quiet.logger.warn("shown");
  t.same(
    quiet.lines.map((l) => l.msg),
    ["shown"],
  );
  t.equal(quiet.lines[0]!.level, 40, "json format keeps pino's numeric levels");

  const text = capture({ format: "text" });
  text.logger.error({ token: SECRET }, "failed");
  t.equal(text.lines[0]!.level, "error", "text format names the level");
  t.equal(text.lines[0]!.token, "[redacted]");
});
