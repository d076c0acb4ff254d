import type { JobRecord } from "../orchestrator/index.js";
import type { ApiClient } from "./api-client.js";

/** The most jobs asked for in one request. */
export const LIST_PAGE_SIZE = 1000;

/**
 * Up to `limit` jobs (in `state`, with every one of `labels`), newest first,
 * asked for a page at a time. The
 * orchestrator may end a page early, after reading many jobs the caller may
 * not see; its `NextToken` says where to go on.
 */
export async function listJobs(
  api: ApiClient,
  {
    state,
    labels = {},
    limit,
  }: { state?: string | undefined; labels?: Record<string, string>; limit: number },
): Promise<JobRecord[]> {
  const label = Object.entries(labels).map(([k, v]) => `${k}=${v}`);
  const jobs: JobRecord[] = [];
  let next: string | undefined;
  do {
    const page = await api.get<{ Items: JobRecord[]; NextToken?: string }>("/api/v1/orchestrator/jobs", {
      query: { state, label, limit: Math.min(limit - jobs.length, LIST_PAGE_SIZE), next_token: next },
    });
    jobs.push(...page.Items);
    next = page.NextToken;
  } while (next && jobs.length < limit);
  return jobs;
}
