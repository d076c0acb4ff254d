import { X509Certificate } from "node:crypto";
import https from "node:https";
import type { AddressInfo } from "node:net";
import { PassThrough } from "node:stream";
import tls from "node:tls";
import type { Test } from "tap";
import { createLogger, type Logger } from "../../core/index.js";
import type { ApiTlsEvent, ApiTlsManager } from "../../orchestrator/api-tls.js";

/** A node HTTPS server on 127.0.0.1 using the manager's certificate (kept current via attach). */
export async function serveWith(
  t: Test,
  manager: ApiTlsManager,
  host = "127.0.0.1",
): Promise<https.Server & { port: number }> {
  const server = https.createServer(manager.serverOptions(), (req, res) => {
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify({ ok: true, path: req.url }));
  });
  manager.attach(server);
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  t.teardown(
    () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  );
  return Object.assign(server, { port: (server.address() as AddressInfo).port });
}

/** The leaf certificate a new TLS connection sees, verified against `ca` for `servername`/`host`. */
export function peerCertificate(
  port: number,
  opts: { host?: string; servername?: string; ca: string },
): Promise<X509Certificate> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({
      host: opts.host ?? "127.0.0.1",
      port,
      ca: opts.ca,
      ...(opts.servername ? { servername: opts.servername } : {}),
    });
    socket.once("error", reject);
    socket.once("secureConnect", () => {
      const cert = new X509Certificate(socket.getPeerCertificate().raw);
      socket.destroy();
      resolve(cert);
    });
  });
}

/** A logger whose JSON lines are collected, to assert the codes logged. */
export function capturedLogger(): { log: Logger; lines: () => Record<string, unknown>[] } {
  const out = new PassThrough();
  let text = "";
  out.on("data", (d: Buffer) => {
    text += d.toString("utf8");
  });
  return {
    log: createLogger({ level: "debug", destination: out }),
    lines: () =>
      text
        .split("\n")
        .filter(Boolean)
        .map((l) => JSON.parse(l) as Record<string, unknown>),
  };
}

/** The next manager event matching `pred`, or a rejection after `timeoutMs` (a bound, not an assertion). */
export function nextEvent<T extends ApiTlsEvent["type"]>(
  manager: ApiTlsManager,
  type: T,
  timeoutMs = 20_000,
): Promise<Extract<ApiTlsEvent, { type: T }>> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${type} event within ${timeoutMs} ms`));
    }, timeoutMs);
    const off = manager.onEvent((e) => {
      if (e.type === type) {
        clearTimeout(timer);
        off();
        resolve(e as Extract<ApiTlsEvent, { type: T }>);
      }
    });
  });
}

/** Keep-alive GET loops against 127.0.0.1:port, counting 200s and recording every failure. */
export interface KeepAliveLoad {
  ok(): number;
  readonly failures: string[];
  /** Waits until `count` more requests succeeded (bounded by `ms`). */
  more(count: number, ms?: number): Promise<void>;
  /** Ends the loops and waits for their last requests. */
  stop(): Promise<void>;
}

/**
 * Two loops of keep-alive requests (each bounded to `maxRequests`) to run
 * through a certificate swap: a request failing across the swap is a dropped one.
 */
export function keepAliveLoad(
  t: Test,
  opts: { port: number; path: string; ca: string; maxRequests: number },
): KeepAliveLoad {
  const agent = new https.Agent({ keepAlive: true, maxSockets: 2, ca: opts.ca });
  t.teardown(() => agent.destroy());
  let ok = 0;
  let stopped = false;
  const failures: string[] = [];
  const request = () =>
    new Promise<void>((resolve) => {
      https
        .get({ host: "127.0.0.1", port: opts.port, path: opts.path, agent }, (res) => {
          res.resume();
          res.on("end", () => {
            if (res.statusCode === 200) ok++;
            else failures.push(`HTTP ${res.statusCode}`);
            resolve();
          });
        })
        .on("error", (err) => {
          failures.push(err.message);
          resolve();
        });
    });
  const loop = async () => {
    for (let i = 0; i < opts.maxRequests && !stopped; i++) await request();
  };
  const loops = [loop(), loop()];
  return {
    ok: () => ok,
    failures,
    async more(count, ms = 20_000) {
      const target = ok + count;
      const end = Date.now() + ms;
      while (ok < target && !stopped && Date.now() < end) await new Promise((r) => setTimeout(r, 5));
    },
    async stop() {
      stopped = true;
      await Promise.all(loops);
    },
  };
}
