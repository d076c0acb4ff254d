import { Agent, request } from "node:https";

// biome-ignore lint/suspicious/noExplicitAny: response bodies are checked field by field by the tests
export type Json = Record<string, any>;

export interface ApiReply {
  status: number;
  json: Json;
  text: string;
  headers: Record<string, string | string[] | undefined>;
}

/**
 * A raw HTTPS caller for API tests: JSON in and out, an optional bearer
 * token and an optional TLS client certificate. It never throws on a 4xx/5xx,
 * so tests assert the status and the error code.
 */
export function apiCaller(baseUrl: string, caPem: string, clientCert?: { cert: string; key: string }) {
  const agent = new Agent({ ca: caPem, keepAlive: true, ...(clientCert ?? {}) });
  const call = (method: string, path: string, opts: { token?: string; body?: unknown } = {}) =>
    new Promise<ApiReply>((resolve, reject) => {
      const body = opts.body === undefined ? undefined : JSON.stringify(opts.body);
      const req = request(
        new URL(path, baseUrl),
        {
          method,
          agent,
          headers: {
            ...(body === undefined
              ? {}
              : { "content-type": "application/json", "content-length": String(Buffer.byteLength(body)) }),
            ...(opts.token ? { authorization: `Bearer ${opts.token}` } : {}),
          },
        },
        (res) => {
          let text = "";
          res.on("data", (d) => {
            text += d;
          });
          res.on("end", () => {
            let json: Json = {};
            try {
              json = JSON.parse(text);
            } catch {}
            resolve({ status: res.statusCode ?? 0, json, text, headers: res.headers });
          });
        },
      );
      req.on("error", reject);
      req.end(body);
    });
  return { call, close: () => agent.destroy() };
}
