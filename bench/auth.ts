import "reflect-metadata";
import { generateKeyPairSync } from "node:crypto";
import { promises as fs } from "node:fs";
import { Agent, request as httpsRequest } from "node:https";
import os from "node:os";
import path from "node:path";
import { pino } from "pino";
import {
  type AuthorizationRequest,
  Authorizer,
  BUILTIN_ROLES,
  loadPolicies,
  MemoryAuthStore,
  type Principal,
  RevocationList,
  TokenService,
} from "../auth/index.js";
import { createLogger } from "../core/index.js";
import { ApiAuth, buildApi, type JobService, type NodeService } from "../orchestrator/index.js";
import { initPki, openPki } from "../pki/index.js";

/**
 * Authorization decisions and token verifications per second. The baseline is
 * Cedar evaluating every request (cache off); the cached rows use the same
 * prepared policy set with the relation-keyed decision cache, on requests
 * whose users, jobs and namespaces all differ (so the exact request is never
 * repeated). Every decision is written to the audit log, as in the daemon.
 */

const DURATION_MS = Number(process.env.BENCH_MS ?? 2000);

/** Operations per second of wall time and of this process's CPU time (less sensitive to a busy machine). */
interface Rate {
  wall: number;
  cpu: number;
}

async function measure(fn: (i: number) => unknown): Promise<Rate> {
  for (let i = 0; i < 500; i++) await fn(i); // warm up
  let n = 0;
  const cpu0 = process.cpuUsage();
  const start = performance.now();
  while (performance.now() - start < DURATION_MS) {
    for (let k = 0; k < 100; k++) await fn(n++);
  }
  const wall = (performance.now() - start) / 1000;
  const cpu = process.cpuUsage(cpu0);
  return { wall: n / wall, cpu: n / ((cpu.user + cpu.system) / 1e6) };
}

const ROLES = ["admin", "operator", "submitter", "reader"];
const ACTIONS = ["job:read", "job:stop", "job:logs", "job:submit"] as const;

/** A varied stream: 1000 users over 4 roles and 10 namespaces, half acting on their own jobs. */
function request(i: number): AuthorizationRequest {
  const u = i % 1000;
  const principal: Principal = {
    id: `user-${u}`,
    kind: "user",
    roles: [ROLES[u % 4]!],
    namespace: `ns-${u % 10}`,
    method: "password",
  };
  const own = i % 2 === 0;
  return {
    principal,
    action: ACTIONS[i % 4]!,
    resource: {
      type: "Job",
      id: `job-${i}`,
      owner: own ? principal.id : `user-${(u + 1) % 1000}`,
      namespace: own ? principal.namespace : `ns-${(u + 3) % 10}`,
    },
  };
}

// The daemon's pino destination (sonic-boom), writing to /dev/null.
const audit = createLogger({
  destination: pino.destination({ dest: "/dev/null", sync: false }) as unknown as NodeJS.WritableStream,
});
const policies = await loadPolicies();
const uncached = new Authorizer({ policies, roles: BUILTIN_ROLES, logger: audit, cacheSize: 0 });
const cached = new Authorizer({ policies, roles: BUILTIN_ROLES, logger: audit });
const cachedQuiet = new Authorizer({ policies, roles: BUILTIN_ROLES });

const baseline = await measure((i) => uncached.authorize(request(i)));
const withCache = await measure((i) => cached.authorize(request(i)));
const withCacheQuiet = await measure((i) => cachedQuiet.authorize(request(i)));

const store = new MemoryAuthStore();
const revocations = new RevocationList(store);
for (let i = 0; i < 10_000; i++)
  await revocations.revoke(`revoked-${i}`, Math.floor(Date.now() / 1000) + 3600);
const tokens = await TokenService.create({
  signingKey: generateKeyPairSync("ec", { namedCurve: "prime256v1" }).privateKey,
  issuer: "spiffe://shoal.local/orchestrator/bench",
  audience: "https://bench:1234",
  revocations,
});
const issued = await Promise.all(
  Array.from({ length: 100 }, (_, i) => tokens.issue(request(i).principal).then((r) => r.token)),
);
const verify = await measure((i) => tokens.verify(issued[i % issued.length]!));
const issue = await measure((i) => tokens.issue(request(i).principal));

const row = (name: string, r: Rate, base?: Rate) =>
  `${name.padEnd(50)} ${Math.round(r.wall).toString().padStart(8)}/s wall ${Math.round(r.cpu).toString().padStart(8)}/s cpu` +
  (base ? `  ×${(r.cpu / base.cpu).toFixed(1)} vs baseline` : "");
console.log(`auth benchmark (${DURATION_MS} ms per row, audit log on; target ≥ 20000 decisions/s)`);
console.log(row("decisions, Cedar every request (baseline)", baseline));
console.log(row("decisions, prepared set + relation cache", withCache, baseline));
console.log(row("  the same without the audit log", withCacheQuiet, baseline));
console.log(row("token verifications, repeated tokens (10k revoked)", verify));
console.log(row("token issues (ES256)", issue));

// --- Added latency per API request ------------------------------------------
// The same HTTPS API twice in this process: without security, and with the
// daemon's ApiAuth (Bearer ES256 token → principal, Cedar decision, audit
// line). Requests alternate between the two over keep-alive connections, so
// both see the same machine load; the difference of the p50s is what authn +
// authz add to a request.
const REQUESTS = Number(process.env.BENCH_REQUESTS ?? 3000);
const benchDir = await fs.mkdtemp(path.join(os.tmpdir(), "shoal-bench-auth-"));
await initPki(path.join(benchDir, "pki"), {});
const pki = await openPki(path.join(benchDir, "pki"));
const serverCert = await pki.issue({ role: "server", dns: ["localhost"], ip: ["127.0.0.1"] });
const https = { key: serverCert.keyPem!, cert: serverCert.certPem };
const services = { jobs: {} as JobService, nodes: {} as NodeService };
const apiOptions = {
  ...services,
  log: createLogger({ level: "silent" }),
  https,
  caBundlePem: () => pki.caCertPem,
  nodeInfo: () => ({}),
  version: "bench",
};
const apiAuth = await ApiAuth.create({
  config: { Methods: ["anonymous", "clientKey", "password"], AccessPolicyPath: "", TokenTTL: "24h" },
  policies,
  store: Object.assign(new MemoryAuthStore(), { watch: async () => {} }),
  dataDir: benchDir,
  issuer: "spiffe://shoal.local/orchestrator/bench",
  trustDomain: "shoal.local",
  caPem: pki.caCertPem,
  job: () => {
    throw new Error("no jobs in this benchmark");
  },
  logger: audit,
  print: () => {},
  env: { SHOAL_ADMIN_PASSWORD: "bench-admin-password" },
});
const plainApi = buildApi(apiOptions);
const securedApi = buildApi({ ...apiOptions, security: apiAuth });
await Promise.all([
  plainApi.listen({ port: 0, host: "127.0.0.1" }),
  securedApi.listen({ port: 0, host: "127.0.0.1" }),
]);
const readerToken = (
  await apiAuth.tokens.issue({
    id: "rdr",
    kind: "user",
    roles: ["reader"],
    namespace: "default",
    method: "password",
  })
).token;
const agent = new Agent({ ca: pki.caCertPem, keepAlive: true, maxSockets: 1 });
const timedGet = (app: typeof plainApi, token?: string) =>
  new Promise<number>((resolve, reject) => {
    const t0 = performance.now();
    const req = httpsRequest(
      {
        host: "127.0.0.1",
        servername: "localhost",
        port: (app.server.address() as { port: number }).port,
        path: "/api/v1/agent/version",
        agent,
        headers: token ? { authorization: `Bearer ${token}` } : {},
      },
      (res) => {
        res.resume();
        res.on("end", () =>
          res.statusCode === 200
            ? resolve(performance.now() - t0)
            : reject(new Error(`HTTP ${res.statusCode}`)),
        );
      },
    );
    req.on("error", reject).end();
  });
const plainTimes: number[] = [];
const securedTimes: number[] = [];
for (let i = 0; i < 300; i++) await Promise.all([timedGet(plainApi), timedGet(securedApi, readerToken)]); // warm up
for (let i = 0; i < REQUESTS; i++) {
  plainTimes.push(await timedGet(plainApi));
  securedTimes.push(await timedGet(securedApi, readerToken));
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const [plainP50, securedP50] = [median(plainTimes), median(securedTimes)];
console.log(
  `API request p50 over HTTPS keep-alive (${REQUESTS} each, GET agent/version): without auth ${plainP50.toFixed(3)} ms, with token + Cedar + audit ${securedP50.toFixed(3)} ms`,
);
console.log(`  added by authn + authz: ${(securedP50 - plainP50).toFixed(3)} ms at p50 (target ≤ 0.2 ms)`);
agent.destroy();
await Promise.all([plainApi.close(), securedApi.close()]);
await fs.rm(benchDir, { recursive: true, force: true });
