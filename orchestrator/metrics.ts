import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";
import type { StateStore } from "./state-store.js";

/** Seconds: an API request is milliseconds; a followed job's stream is minutes. */
const API_SECONDS_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300];
/** Joins the label values of a count's key. */
const LABELS = "\0";

/**
 * The orchestrator's Prometheus metrics, served at `GET /api/v1/agent/metrics`
 * (action `agent:metrics`). One registry per orchestrator, so several in one
 * process (tests, benchmarks) keep apart. What the state store holds is
 * read when scraped (jobs and executions from counts kept as they change);
 * what passes (requests, refusals, job endings) is counted as it happens.
 * Every label has a bounded set of values: route templates, states, message
 * kinds, error codes.
 */
export class OrchestratorMetrics {
  readonly registry = new Registry();
  readonly #apiRequests = new Counter({
    name: "shoal_api_requests_total",
    help: "API requests answered, by method, route template and HTTP status.",
    labelNames: ["method", "route", "status"] as const,
    registers: [this.registry],
  });
  readonly #apiSeconds = new Histogram({
    name: "shoal_api_request_duration_seconds",
    help: "Time from an API request to its response's end (a followed stream lasts as long as it is followed).",
    labelNames: ["method", "route"] as const,
    buckets: API_SECONDS_BUCKETS,
    registers: [this.registry],
  });
  readonly #nodeDropped = this.#counter(
    "shoal_node_messages_dropped_total",
    "Node messages dropped unverified because their sender exceeded a rate (kind: message for the overall rate, else register or renew).",
    "kind",
  );
  readonly #nodeRefused = this.#counter(
    "shoal_node_messages_refused_total",
    "Node messages that failed envelope verification, by error code.",
    "code",
  );
  readonly #jobsFinished = this.#counter(
    "shoal_jobs_finished_total",
    "Jobs this orchestrator finished, by final state.",
    "state",
  );
  readonly #natsRestarts = new Counter({
    name: "shoal_nats_server_restarts_total",
    help: "Times this orchestrator's own nats-server was started again: it exited, or it was stopped because its JetStream no longer answered.",
    registers: [this.registry],
  });

  /** @param store what is counted at each scrape: jobs, executions and nodes by state. */
  constructor(store: StateStore) {
    // Jobs and executions are counted as they change: a scan of 100,000 held the event loop 20-35 ms.
    this.#counted(
      "shoal_jobs",
      "Jobs known to this orchestrator (in a cluster: every orchestrator's), by state.",
      ["state"],
      () => store.jobs.tally("state"),
    );
    this.#counted("shoal_executions", "Executions known to this orchestrator, by state.", ["state"], () =>
      store.executions.tally("state"),
    );
    this.#counted(
      "shoal_nodes",
      "Compute nodes by approval and health (as this orchestrator sees them).",
      ["approval", "health"],
      () => {
        const counts = new Map<string, number>();
        for (const n of store.nodes.values()) {
          const key = [n.Approval, n.Health].join(LABELS);
          counts.set(key, (counts.get(key) ?? 0) + 1);
        }
        return counts;
      },
    );
    this.#counted(
      "shoal_nodes_short_of_disk",
      "Compute nodes whose heartbeats say their disk is short of room (Compute.Storage.MinFree): no job goes there.",
      [],
      () => new Map([["", [...store.nodes.values()].filter((n) => n.LowDisk !== undefined).length]]),
    );
    collectDefaultMetrics({ register: this.registry });
  }

  #counter<L extends string>(name: string, help: string, label: L): Counter<L> {
    return new Counter({ name, help, labelNames: [label], registers: [this.registry] });
  }

  /**
   * A gauge set at each scrape from `counts()`: how many have each
   * combination of label values (joined by {@link LABELS}).
   */
  #counted(
    name: string,
    help: string,
    labelNames: string[],
    counts: () => ReadonlyMap<string, number>,
  ): void {
    new Gauge({
      name,
      help,
      labelNames,
      registers: [this.registry],
      collect() {
        this.reset();
        for (const [key, n] of counts()) {
          const labels = key.split(LABELS);
          this.set(Object.fromEntries(labelNames.map((l, i) => [l, labels[i]!])), n);
        }
      },
    });
  }

  /** An API response ended (`route`: the route's template, or "unmatched"). */
  apiRequest(method: string, route: string, status: number, seconds: number): void {
    this.#apiRequests.inc({ method, route, status: String(status) });
    this.#apiSeconds.observe({ method, route }, seconds);
  }

  /** A node message was dropped for its sender's rate. */
  nodeMessageDropped(kind: string): void {
    this.#nodeDropped.inc({ kind });
  }

  /** A node message failed verification. */
  nodeMessageRefused(code: string): void {
    this.#nodeRefused.inc({ code });
  }

  jobFinished(state: string): void {
    this.#jobsFinished.inc({ state });
  }

  /** The orchestrator's own nats-server is being started again. */
  natsServerRestarted(): void {
    this.#natsRestarts.inc();
  }

  /** The exposition text and its content type. */
  async render(): Promise<{ contentType: string; text: string }> {
    return { contentType: this.registry.contentType, text: await this.registry.metrics() };
  }
}
