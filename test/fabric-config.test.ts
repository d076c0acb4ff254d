import "reflect-metadata";
import t from "tap";
import {
  computeBrokerUsers,
  FABRIC_CODES,
  parseNatsLogLine,
  parseSubject,
  permissionsFor,
  renderExternalAuthorization,
  renderNatsConfig,
  routeCertificateName,
  routeUrl,
  subjects,
  usersLosingKeys,
} from "../fabric/index.js";

const NOW = new Date("2030-01-01T00:00:00Z");
const day = 86400_000;
const id = (
  spiffeId: string,
  o: { notAfter?: number; notBefore?: number; revoked?: boolean; key?: string } = {},
) => ({
  spiffeId,
  notBefore: new Date(NOW.getTime() + (o.notBefore ?? -day)),
  notAfter: new Date(NOW.getTime() + (o.notAfter ?? day)),
  ...(o.revoked ? { revoked: true } : {}),
  ...(o.key ? { publicKeySha256: o.key } : {}),
});

t.test("permissions are exactly the DESIGN.md table", async (t) => {
  const c = permissionsFor("spiffe://td.local/compute/n1");
  t.same(c?.publish.allow, ["shoal.compute.n1.out.>"]);
  t.same(c?.subscribe.allow, ["shoal.compute.n1.in", "shoal.broadcast.>", "_INBOX_n1.>"]);
  t.equal(c?.allowResponses.max, 1);
  const o = permissionsFor("spiffe://td.local/orchestrator/o1");
  t.same(o?.publish.allow, [
    "shoal.compute.*.in",
    "shoal.broadcast.>",
    "$JS.API.>",
    "$JS.ACK.>",
    "$JS.FC.>",
    "$KV.>",
    "$O.>",
  ]);
  t.same(o?.subscribe.allow, ["shoal.compute.*.out.>", "shoal.broadcast.>", "_INBOX_o1.>"]);
  t.equal(permissionsFor("spiffe://td.local/user/alice"), undefined, "users never talk on the fabric");
  t.throws(() => permissionsFor("spiffe://td.local/compute/a.b"), { code: FABRIC_CODES.SHOAL_NATS_CONFIG });
  for (const s of [...(c?.publish.allow ?? []), ...(c?.subscribe.allow ?? [])]) {
    t.notOk(s === ">" || s.startsWith("$") || s.startsWith("_INBOX."), `${s} is not a broad grant`);
  }
});

t.test("subjects round-trip through parseSubject", async (t) => {
  t.same(parseSubject(subjects.computeIn("n1")), { type: "compute-in", nodeId: "n1" });
  t.same(parseSubject(subjects.computeOut("n1", "result")), {
    type: "compute-out",
    nodeId: "n1",
    kind: "result",
  });
  t.same(parseSubject(subjects.broadcast("revocation")), { type: "broadcast", kind: "revocation" });
  t.same(parseSubject("_INBOX_n1.abc.def"), { type: "inbox", owner: "n1" });
  t.equal(parseSubject("_INBOX.abc"), undefined);
  t.equal(parseSubject("shoal.compute.n1.out"), undefined);
  t.equal(parseSubject("other.subject"), undefined);
});

t.test(
  "broker users: expired, revoked, not-yet-valid and users are left out; next change is known",
  async (t) => {
    const u = computeBrokerUsers(
      [
        id("spiffe://td.local/compute/n1", { notAfter: 2 * day }),
        id("spiffe://td.local/compute/n2", { notAfter: -1 }),
        id("spiffe://td.local/compute/n3", { revoked: true }),
        id("spiffe://td.local/compute/n4", { notBefore: 3600_000, notAfter: 3 * day }),
        id("spiffe://td.local/user/alice"),
        id("spiffe://td.local/orchestrator/o1", { notAfter: 7 * day }),
        id("spiffe://td.local/compute/o1"),
      ],
      NOW,
    );
    t.same(
      u.users.map((x) => x.user),
      ["spiffe://td.local/compute/n1", "spiffe://td.local/orchestrator/o1"],
    );
    t.same(Object.fromEntries(u.excluded.map((e) => [e.spiffeId, e.reason])), {
      "spiffe://td.local/compute/n2": "expired",
      "spiffe://td.local/compute/n3": "revoked",
      "spiffe://td.local/compute/n4": "not-yet-valid",
      "spiffe://td.local/user/alice": "no-broker-access",
      "spiffe://td.local/compute/o1": "inbox-conflict",
    });
    t.same(u.nextChangeAt, new Date(NOW.getTime() + 3600_000), "n4 becoming valid is the next change");
    t.equal(u.pinnedKeys, undefined, "no pinning when keys are unknown");
    t.equal(computeBrokerUsers([], NOW).nextChangeAt, undefined);
  },
);

t.test("pinned keys: losing one of two keys is detected", async (t) => {
  const a = id("spiffe://td.local/compute/n1", { key: "aa" });
  const b = id("spiffe://td.local/compute/n1", { key: "bb" });
  const before = computeBrokerUsers([a, b], NOW);
  t.same(before.pinnedKeys, ["aa", "bb"]);
  const after = computeBrokerUsers([{ ...a, revoked: true }, b], NOW);
  t.same(after.pinnedKeys, ["bb"]);
  t.same(usersLosingKeys(before, after), ["spiffe://td.local/compute/n1"]);
  t.same(usersLosingKeys(after, after), []);
});

t.test("the rendered config maps identities with verify_and_map, never an accounts block", async (t) => {
  const users = computeBrokerUsers([id("spiffe://td.local/compute/n1", { key: "ab" })], NOW);
  const conf = renderNatsConfig({
    host: "127.0.0.1",
    port: 4222,
    serverName: "shoal",
    tls: { certFile: "/d/server.crt", keyFile: "/d/server.key", caFile: "/d/ca.crt" },
    users,
    jetStream: { storeDir: "/d/js" },
  });
  t.match(conf, /verify_and_map: true/);
  t.match(conf, /user: "spiffe:\/\/td.local\/compute\/n1"/);
  t.match(conf, /publish: \{ allow: \["shoal.compute.n1.out.>"\] \}/);
  t.match(conf, /allow_responses: \{ max: 1, expires: "120000ms" \}/);
  t.match(conf, /pinned_certs: \["ab"\]/);
  t.match(conf, /store_dir: "\/d\/js"/);
  t.notMatch(conf, /accounts|min_version|handshake_first|no_auth_user/);
  const empty = renderNatsConfig({
    ...{ host: "h", port: -1, serverName: "s" },
    tls: { certFile: "c", keyFile: "k", caFile: "a" },
    users: computeBrokerUsers([], NOW),
  });
  t.match(empty, /deny: \[">"\]/, "no identities still means authorization on, everything denied");
  t.throws(
    () =>
      renderNatsConfig({
        host: "h",
        port: 70000,
        serverName: "s",
        tls: { certFile: "c", keyFile: "k", caFile: "a" },
        users,
      }),
    { code: FABRIC_CODES.SHOAL_NATS_CONFIG },
  );
  t.throws(
    () =>
      renderNatsConfig({
        host: "h",
        port: 1,
        serverName: "s",
        tls: { certFile: "c\n}", keyFile: "k", caFile: "a" },
        users,
      }),
    { code: FABRIC_CODES.SHOAL_NATS_CONFIG },
  );
  const external = renderExternalAuthorization(users);
  t.match(external, /authorization \{/);
  t.match(external, /CVE-2023-47090/);
});

t.test("nats-server log lines are decoded into fabric codes", async (t) => {
  const p = (s: string) => parseNatsLogLine(`[42] 2026/11/22 07:52:36.862308 ${s}`);
  t.equal(p("[INF] Server is ready").level, "info");
  t.equal(
    p("[ERR] 127.0.0.1:1 - cid:6 - TLS handshake error: tls: client didn't provide a certificate").rejection
      ?.code,
    FABRIC_CODES.SHOAL_TLS_NO_CLIENT_CERT,
  );
  t.equal(
    p(
      "[ERR] 127.0.0.1:1 - cid:7 - TLS handshake error: tls: failed to verify client certificate: x509: certificate signed by unknown authority",
    ).rejection?.code,
    FABRIC_CODES.SHOAL_TLS_CLIENT_UNKNOWN_CA,
  );
  t.equal(
    p(
      "[ERR] 127.0.0.1:1 - cid:8 - TLS handshake error: tls: failed to verify client certificate: x509: certificate specifies an incompatible key usage",
    ).rejection?.code,
    FABRIC_CODES.SHOAL_TLS_CLIENT_EKU,
  );
  t.equal(
    p('[ERR] 127.0.0.1:1 - cid:10 - "v3.4.0:nats.js" - authentication error - User ""').rejection?.code,
    FABRIC_CODES.SHOAL_NATS_AUTHORIZATION,
  );
  const v = p(
    '[ERR] 127.0.0.1:3 - cid:4 - "v3.4.0:nats.js:n1" - Publish Violation - User "spiffe://td/compute/n1", Subject "shoal.compute.n1.in"',
  ).rejection;
  t.same(
    [v?.code, v?.operation, v?.user, v?.subject],
    [FABRIC_CODES.SHOAL_NATS_PERMISSION, "publish", "spiffe://td/compute/n1", "shoal.compute.n1.in"],
  );
  t.equal(
    p("[ERR] 127.0.0.1:47210 - rid:11 - TLS route handshake error: remote error: tls: bad certificate")
      .rejection?.code,
    FABRIC_CODES.SHOAL_NATS_ROUTE_REJECTED,
  );
  t.equal(
    p("[ERR] 127.0.0.1:47220 - rid:13 - authentication error").rejection?.code,
    FABRIC_CODES.SHOAL_NATS_ROUTE_REJECTED,
  );
  t.equal(p("[ERR] 127.0.0.1:7002 - rid:9 - Error trying to connect to route").rejection, undefined);
  t.equal(p("[WRN] something").rejection, undefined);
  t.equal(p("[WRN] something").level, "warn");
  t.equal(
    p('[WRN] User "spiffe://td/compute/n1" found in connect proto, but user required from cert').level,
    "debug",
    "nats-server's warning at each reload for every certificate-mapped client is nothing wrong",
  );
  t.equal(parseNatsLogLine("not a log line").message, "not a log line");
});

t.test("a cluster block: name, listener, routes to the peers, mutual TLS with the route name", async (t) => {
  const base = {
    host: "127.0.0.1",
    port: 4222,
    serverName: "orch-a",
    tls: { certFile: "/d/server.crt", keyFile: "/d/server.key", caFile: "/d/ca.crt" },
    users: computeBrokerUsers([], NOW),
    jetStream: { storeDir: "/d/js" },
  };
  const cluster = {
    name: "shoal",
    host: "0.0.0.0",
    port: 6222,
    advertise: "orch-a.example.com:6222",
    routes: ["orch-b:6222", "tls://10.0.0.3:6222", "nats-route://[fd00::4]:7000"],
    routeName: routeCertificateName("Td.Local"),
    tls: { certFile: "/d/server.crt", keyFile: "/d/server.key", caFile: "/d/ca.crt" },
  };
  const conf = renderNatsConfig({ ...base, cluster });
  t.match(conf, /server_name: "orch-a"/, "JetStream in a cluster needs a server name");
  const block = conf.slice(conf.indexOf("cluster {"));
  t.match(block, /name: "shoal"/);
  t.match(block, /host: "0.0.0.0"\n {2}port: 6222/);
  t.match(block, /advertise: "orch-a.example.com:6222"/);
  t.match(
    block,
    'routes: ["nats-route://orch-b:6222", "nats-route://10.0.0.3:6222", "nats-route://[fd00::4]:7000"]',
  );
  t.match(block, /tls \{[^}]*ca_file: "\/d\/ca.crt"[^}]*verify_and_map: true/);
  t.match(block, /authorization \{ user: "nats-route.td.local" \}/);
  t.notMatch(block, /min_version|password/);
  t.notMatch(renderNatsConfig(base), /cluster/, "no cluster block without a cluster");
  t.throws(() => routeUrl("orch-b"), { code: FABRIC_CODES.SHOAL_NATS_CONFIG }, "a peer needs its port");
  t.throws(() => routeUrl("http://orch-b:99999"), { code: FABRIC_CODES.SHOAL_NATS_CONFIG });
  t.throws(() => renderNatsConfig({ ...base, cluster: { ...cluster, name: "" } }), {
    code: FABRIC_CODES.SHOAL_NATS_CONFIG,
  });
  t.throws(() => renderNatsConfig({ ...base, cluster: { ...cluster, port: 65536 } }), {
    code: FABRIC_CODES.SHOAL_NATS_CONFIG,
  });
});
