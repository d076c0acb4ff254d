import "reflect-metadata";
import { promises as fs } from "node:fs";
import http from "node:http";
import https from "node:https";
import type { AddressInfo } from "node:net";
import path from "node:path";
import t from "tap";
import {
  ApiClient,
  type ApiClientError,
  ApiResponseError,
  apiClientOptions,
  DEFAULT_API_URL,
  resolveApiUrl,
} from "../cli/api-client.js";
import { DEFAULT_API_TLS_OPTIONS } from "../orchestrator/api-tls.js";
import { freePort } from "./helpers/cluster.js";
import { freshPki } from "./helpers/pki.js";

const routes: Record<string, (req: http.IncomingMessage, res: http.ServerResponse) => void> = {
  "/api/v1/agent/alive": (req, res) => {
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify({ ok: true, authorization: req.headers.authorization ?? null }));
  },
  "/api/v1/echo": (req, res) => {
    let body = "";
    req.on("data", (d) => {
      body += d;
    });
    req.on("end", () => {
      res.setHeader("content-type", "application/json");
      res.end(JSON.stringify({ method: req.method, url: req.url, body: JSON.parse(body || "null") }));
    });
  },
  "/api/v1/orchestrator/jobs/nope": (_req, res) => {
    res.writeHead(404, { "content-type": "application/json" });
    res.end(
      JSON.stringify({
        error: {
          code: "SHOAL_ORCH_JOB_NOT_FOUND",
          message: "no job nope",
          fix: "list jobs with shoal job list",
        },
      }),
    );
  },
  "/api/v1/proxy": (_req, res) => {
    res.writeHead(502, { "content-type": "text/html" });
    res.end("<html>Bad Gateway</html>");
  },
  "/api/v1/not-json": (_req, res) => {
    res.end("hello");
  },
  "/api/v1/ndjson": (_req, res) => {
    res.writeHead(200, { "content-type": "application/x-ndjson" });
    // Values split across writes: the client must reassemble lines.
    res.write('{"n":1}\n{"n"');
    setTimeout(() => {
      res.write(':2}\n\n{"n":3}');
      setTimeout(() => res.end("\n"), 10);
    }, 10);
  },
  "/api/v1/sse": (_req, res) => {
    res.writeHead(200, { "content-type": "text/event-stream" });
    res.write(': comment\nevent: log\ndata: {"line":"a"}\n\n');
    res.end('data: {"line":\ndata: "b"}\n\n');
  },
};

function handler(req: http.IncomingMessage, res: http.ServerResponse) {
  const route = routes[(req.url ?? "").split("?")[0] ?? ""];
  if (route) route(req, res);
  else {
    res.writeHead(404);
    res.end();
  }
}

async function listen(server: http.Server, host: string): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  t.teardown(
    () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  );
  return (server.address() as AddressInfo).port;
}

const { pki, root } = await freshPki(t);
const caFile = path.join(root, "pki", "ca.crt");
const issued = await pki.issue({ role: "server", id: "api", days: 1 });
const tlsOptions = { ...DEFAULT_API_TLS_OPTIONS, cert: issued.certPem, key: issued.keyPem! };
const port = await listen(https.createServer(tlsOptions, handler), "127.0.0.1");
const url = `https://127.0.0.1:${port}`;
const other = await freshPki(t);
const otherCaFile = path.join(other.root, "pki", "ca.crt");

async function failure(p: Promise<unknown>): Promise<ApiClientError> {
  try {
    await p;
  } catch (err) {
    return err as ApiClientError;
  }
  throw new Error("expected a failure");
}

t.test("JSON requests with a bearer token, trusting only the PKI's ca.crt", async (t) => {
  const client = await ApiClient.create({ url, caFile, token: () => "tok-123" });
  t.teardown(() => client.close());
  t.same(await client.get("/api/v1/agent/alive"), { ok: true, authorization: "Bearer tok-123" });
  t.same(await client.put("/api/v1/echo", { Job: { Name: "x" } }, { query: { a: 1, b: undefined } }), {
    method: "PUT",
    url: "/api/v1/echo?a=1",
    body: { Job: { Name: "x" } },
  });
  const anonymous = await ApiClient.create({ url, caFile });
  t.teardown(() => anonymous.close());
  t.same(
    await anonymous.get("/api/v1/agent/alive"),
    { ok: true, authorization: null },
    "no token, no header",
  );
});

t.test("unknown CA: system roots, or another CA file", async (t) => {
  const system = await ApiClient.create({ url });
  t.teardown(() => system.close());
  const e1 = await failure(system.get("/api/v1/agent/alive"));
  t.equal(e1.code, "SHOAL_API_TLS_UNKNOWN_CA");
  t.match(e1.message, /issued by .*Shoal/, "names who issued the certificate");
  t.match(e1.fix, /--ca-cert DATA_DIR\/pki\/ca\.crt/);

  const wrong = await ApiClient.create({ url, caFile: otherCaFile });
  t.teardown(() => wrong.close());
  const e2 = await failure(wrong.get("/api/v1/agent/alive"));
  t.equal(e2.code, "SHOAL_API_TLS_UNKNOWN_CA");
  t.match(e2.fix, otherCaFile, "says the given CA file is another CA");
});

t.test("hostname mismatch names the host dialled and the certificate's SANs", async (t) => {
  const port2 = await listen(https.createServer(tlsOptions, handler), "127.0.0.2");
  const client = await ApiClient.create({ url: `https://127.0.0.2:${port2}`, caFile });
  t.teardown(() => client.close());
  const e = await failure(client.get("/api/v1/agent/alive"));
  t.equal(e.code, "SHOAL_API_TLS_HOST_MISMATCH");
  t.equal(e.details.host, "127.0.0.2");
  t.same(e.details.sans, ["DNS:localhost", "IP Address:127.0.0.1"]);
  t.match(e.message, /valid for DNS:localhost, IP Address:127\.0\.0\.1 — not 127\.0\.0\.2/);
  t.match(e.fix, /--ip 127\.0\.0\.2/);
});

t.test("connection refused, plain HTTP, expired certificate", async (t) => {
  const closed = `https://127.0.0.1:${await freePort()}`;
  const c1 = await ApiClient.create({ url: closed, caFile });
  t.teardown(() => c1.close());
  const e1 = await failure(c1.get("/api/v1/agent/alive"));
  t.equal(e1.code, "SHOAL_API_UNREACHABLE");
  t.match(e1.fix, `is the orchestrator running at ${closed}?`);

  const plainPort = await listen(http.createServer(handler), "127.0.0.1");
  const c2 = await ApiClient.create({ url: `https://127.0.0.1:${plainPort}`, caFile });
  t.teardown(() => c2.close());
  const e2 = await failure(c2.get("/api/v1/agent/alive"));
  t.equal(e2.code, "SHOAL_API_TLS_HANDSHAKE");
  t.match(e2.fix, /does not speak TLS/);

  const expired = await pki.issue({
    role: "server",
    id: "old",
    notBefore: new Date(Date.now() - 3 * 86_400_000),
    notAfter: new Date(Date.now() - 86_400_000),
  });
  const oldPort = await listen(
    https.createServer({ ...DEFAULT_API_TLS_OPTIONS, cert: expired.certPem, key: expired.keyPem! }, handler),
    "127.0.0.1",
  );
  const c3 = await ApiClient.create({ url: `https://127.0.0.1:${oldPort}`, caFile });
  t.teardown(() => c3.close());
  t.equal((await failure(c3.get("/api/v1/agent/alive"))).code, "SHOAL_API_TLS_CERT_EXPIRED");
});

t.test("--insecure works and warns loudly on every client", async (t) => {
  const warnings: string[] = [];
  for (let i = 0; i < 2; i++) {
    const client = await ApiClient.create({ url, insecure: true, warn: (l) => warnings.push(l) });
    t.same(await client.get("/api/v1/agent/alive"), { ok: true, authorization: null });
    client.close();
  }
  t.equal(warnings.length, 2, "one warning per client");
  t.match(warnings[0], /^WARNING: --insecure: the certificate of .* is NOT verified/);
});

t.test("HTTP errors: API error bodies keep their code; other failures get ours", async (t) => {
  const client = await ApiClient.create({ url, caFile });
  t.teardown(() => client.close());
  const e = await failure(client.get("/api/v1/orchestrator/jobs/nope"));
  t.ok(e instanceof ApiResponseError);
  t.equal(e.code, "SHOAL_ORCH_JOB_NOT_FOUND");
  t.equal((e as unknown as ApiResponseError).status, 404);
  t.equal(e.fix, "list jobs with shoal job list");
  const proxy = await failure(client.get("/api/v1/proxy"));
  t.equal(proxy.code, "SHOAL_API_HTTP_ERROR");
  t.match(proxy.message, /HTTP 502/);
  t.equal((await failure(client.get("/api/v1/not-json"))).code, "SHOAL_API_BAD_RESPONSE");
});

t.test("streams: NDJSON and SSE", async (t) => {
  const client = await ApiClient.create({ url, caFile });
  t.teardown(() => client.close());
  const nd: unknown[] = [];
  for await (const v of client.stream("/api/v1/ndjson")) nd.push(v);
  t.same(nd, [{ n: 1 }, { n: 2 }, { n: 3 }]);
  const sse: unknown[] = [];
  for await (const v of client.stream("/api/v1/sse")) sse.push(v);
  t.same(sse, [{ line: "a" }, { line: "b" }]);
  const e = await failure(
    (async () => {
      for await (const _ of client.stream("/api/v1/orchestrator/jobs/nope")) break;
    })(),
  );
  t.equal(e.code, "SHOAL_ORCH_JOB_NOT_FOUND", "a refused stream is a typed error too");
});

t.test("URL and trust come from flags, env, then config", async (t) => {
  t.equal(resolveApiUrl(undefined, {}), DEFAULT_API_URL);
  t.equal(resolveApiUrl(undefined, { SHOAL_API: "https://orch:8443/" }), "https://orch:8443");
  t.equal(
    resolveApiUrl("https://a:1", { SHOAL_API: "https://b:2" }),
    "https://a:1",
    "--api wins over SHOAL_API",
  );
  t.throws(() => resolveApiUrl("http://orch:1234", {}), { code: "SHOAL_API_BAD_URL" });
  t.throws(() => resolveApiUrl("not a url", {}), { code: "SHOAL_API_BAD_URL" });
  const config = { API: { TLS: { CAFile: "/etc/shoal/ca.crt", Insecure: false } } };
  t.same(apiClientOptions({}, config), { caFile: "/etc/shoal/ca.crt", insecure: false });
  t.same(apiClientOptions({ "ca-cert": "x.crt", api: "https://h:1", insecure: true }, config), {
    url: "https://h:1",
    caFile: "x.crt",
    insecure: true,
  });
  await t.rejects(ApiClient.create({ url, caFile: path.join(root, "missing.crt") }), {
    code: "SHOAL_FILE_READ",
  });
  t.ok(await fs.stat(caFile));
});
