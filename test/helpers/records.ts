import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import { separateModules, wasmJobSpec } from "../../core/index.js";
import type { MessageBody } from "../../fabric/protocol.js";
import type { LogEntry, LogStore } from "../../orchestrator/log-store.js";
import type { ExecutionRecord, JobRecord } from "../../orchestrator/records.js";

/** The smallest WebAssembly module: its header. */
export const EMPTY_MODULE = Buffer.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]);

/**
 * A Pending batch job record created (and last changed) at `time`, with
 * `fields` over it; its spec is what an orchestrator stores for
 * `job run --wasm` (the module by digest).
 */
export function jobRecord(id: string, time: number, fields: Partial<JobRecord> = {}): JobRecord {
  return {
    ID: id,
    Name: id,
    Namespace: "default",
    Type: "batch",
    Spec: separateModules(wasmJobSpec({ name: id, module: EMPTY_MODULE })).spec,
    Submitter: { sub: "anonymous", namespace: "default", method: "anonymous" },
    State: "Pending",
    StateMessage: "submitted",
    Count: 1,
    Retries: 0,
    CreateTime: time,
    ModifyTime: time,
    ...fields,
  };
}

/** An execution of `jobId` on `node` in `state`, created (and last changed) at `time`. */
export function executionRecord(
  id: string,
  jobId: string,
  state: ExecutionRecord["State"],
  { node = "n1", time = Date.now() }: { node?: string; time?: number } = {},
): ExecutionRecord {
  return {
    ID: id,
    JobID: jobId,
    NodeID: node,
    State: state,
    StateMessage: state,
    Resources: { cpu: 0.1, memory: 1 },
    CreateTime: time,
    ModifyTime: time,
  };
}

/** Polls `check` every 20 ms for up to 5 s (a KV watch delivers in milliseconds). */
export async function eventually(what: string, check: () => boolean | Promise<boolean>): Promise<void> {
  for (let i = 0; i < 250 && !(await check()); i++) await new Promise((r) => setTimeout(r, 20));
  if (!(await check())) throw new Error(`timed out waiting until ${what}`);
}

export const sha256 = (s: string) => createHash("sha256").update(s).digest("hex");

/**
 * The chunks and manifest a node sends for one file `out.txt` of a Completed
 * execution, holding the concatenation of `parts` (one chunk each).
 */
export function resultMessages(
  executionId: string,
  parts: string[],
): { chunks: MessageBody<"result-chunk">[]; manifest: MessageBody<"result"> } {
  const content = parts.join("");
  const chunks = parts.map((p, index) => ({
    executionId,
    file: "out.txt",
    index,
    data: Buffer.from(p).toString("base64"),
    sha256: sha256(p),
  }));
  const manifest = {
    executionId,
    state: "Completed",
    exitCode: 0,
    stdout: "",
    stderr: "",
    stdoutTruncated: false,
    stderrTruncated: false,
    files: [
      { name: "out.txt", size: content.length, sha256: sha256(content), chunks: chunks.map((c) => c.sha256) },
    ],
  } as MessageBody<"result">;
  return { chunks, manifest };
}

/** Every line the log store holds of the job, oldest first. */
export async function storedLines(logs: LogStore, jobId: string): Promise<LogEntry[]> {
  const lines: LogEntry[] = [];
  for await (const line of logs.lines(jobId)) lines.push(line);
  return lines;
}

/**
 * What a result spool directory holds, sorted, but the spare manifests it
 * keeps for reuse (`.spare-N.tmp`, see ResultSpool): the entries and their leftovers.
 */
export async function spoolEntries(spoolDir: string): Promise<string[]> {
  return (await fs.readdir(spoolDir)).filter((name) => !/^\.spare-\d+\.tmp$/.test(name)).sort();
}
