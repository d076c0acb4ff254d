/** Per-thread CPU time for the benches that spread their work over worker threads. */
import { readlinkSync } from "node:fs";

/** The calling thread's /proc stat file (Linux); a process's CPU time is the sum of its threads'. */
export function threadStatFile(): string {
  return `/proc/${readlinkSync("/proc/thread-self")}/stat`;
}
