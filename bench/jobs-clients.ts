/**
 * The HTTPS clients of bench/jobs.ts, on a worker thread of their own: a
 * user's client runs on its own machine, not on the orchestrator's event loop,
 * so the bench keeps its clients' TLS, HTTP and JSON work off the
 * orchestrator's thread. Their CPU still counts in the process's.
 *
 * The main thread sends one {@link ClientsRequest} per phase and gets a
 * {@link ClientsResult} back.
 */
import { Agent, request } from "node:https";
import { isMainThread, parentPort, workerData } from "node:worker_threads";
import { threadStatFile } from "./thread-stat.js";

export interface ClientsSetup {
  apiUrl: string;
  ca: Buffer;
  token: string;
  /** The job submitted, again and again. */
  spec: unknown;
}

export interface ClientsRequest {
  /** Concurrent clients; each submits a job and follows it to its end, then the next. */
  clients: number;
  /** Jobs in all; the phase also stops after `budgetMs`. */
  jobs: number;
  budgetMs: number;
}

export interface JobRun {
  id: string;
  /** submit → final state seen, ms. */
  ms: number;
  /** Wall clock (ms since the epoch) of the submit and of the final state seen. */
  submitted: number;
  seen: number;
}

export interface ClientsResult {
  runs: JobRun[];
  /** Wall time of the phase, ms. */
  elapsedMs: number;
  /** The clients' thread's /proc stat file, for its CPU time. */
  threadStat: string;
}

/** One HTTPS call to the API; resolves to the response's text. */
export type ApiCall = (method: string, apiPath: string, body?: unknown) => Promise<string>;

/** Calls to the API at `apiUrl` over kept-alive connections, as `token`'s bearer once it is set. */
export function apiClient(
  apiUrl: string,
  ca: Buffer,
): { call: ApiCall; agent: Agent; setToken(t: string): void } {
  const agent = new Agent({ ca, keepAlive: true });
  let token = "";
  const call: ApiCall = (method, apiPath, body) =>
    new Promise<string>((resolve, reject) => {
      const headers: Record<string, string> = token ? { authorization: `Bearer ${token}` } : {};
      if (body) headers["content-type"] = "application/json";
      const req = request(`${apiUrl}/api/v1/${apiPath}`, { method, agent, headers }, (res) => {
        let text = "";
        res.on("data", (d) => {
          text += d;
        });
        res.on("end", () => resolve(text));
      });
      req.on("error", reject);
      req.end(body === undefined ? undefined : JSON.stringify(body));
    });
  return {
    call,
    agent,
    setToken: (t) => {
      token = t;
    },
  };
}

/** Submits one job and waits for its final state on the streaming history endpoint. */
async function runOne(call: ApiCall, spec: unknown): Promise<JobRun> {
  const submitted = Date.now();
  const t0 = performance.now();
  const { JobID } = JSON.parse(await call("PUT", "orchestrator/jobs", { Job: spec })) as { JobID: string };
  const text = await call("GET", `orchestrator/jobs/${JobID}/history?follow=true`);
  const last = JSON.parse(text.trim().split("\n").at(-1)!) as { Job: { State: string } };
  if (last.Job.State !== "Completed") throw new Error(`job ${JobID} ended ${last.Job.State}`);
  return { id: JobID, ms: performance.now() - t0, submitted, seen: Date.now() };
}

async function runPhase(call: ApiCall, spec: unknown, r: ClientsRequest): Promise<ClientsResult> {
  const runs: JobRun[] = [];
  let started = 0;
  const start = performance.now();
  await Promise.all(
    Array.from({ length: r.clients }, async () => {
      while (started < r.jobs && performance.now() - start < r.budgetMs) {
        started++;
        runs.push(await runOne(call, spec));
      }
    }),
  );
  return { runs, elapsedMs: performance.now() - start, threadStat: threadStatFile() };
}

if (!isMainThread && parentPort) {
  const setup = workerData as ClientsSetup;
  const { call, setToken } = apiClient(setup.apiUrl, Buffer.from(setup.ca));
  setToken(setup.token);
  const port = parentPort;
  port.on("message", (r: ClientsRequest) => {
    runPhase(call, setup.spec, r).then(
      (result) => port.postMessage(result),
      (err: unknown) => port.postMessage({ error: String(err) }),
    );
  });
}
