import type { Resources } from "../fabric/index.js";

/**
 * The node's capacity and what executions hold of it. Resources are reserved
 * when a bid is accepted (so two concurrent bids cannot both take the last
 * core), kept while the execution runs and released when it ends or when the
 * reservation is not followed by a `run` in time.
 */
export class CapacityLedger {
  readonly capacity: Resources;
  readonly #held = new Map<string, Resources>();

  constructor(capacity: Resources) {
    this.capacity = Object.freeze({ ...capacity });
  }

  /** What all executions hold together. */
  allocated(): Resources {
    let cpu = 0;
    let memory = 0;
    for (const r of this.#held.values()) {
      cpu += r.cpu;
      memory += r.memory;
    }
    return { cpu, memory };
  }

  /** What is left for new executions (never negative). */
  free(): Resources {
    const a = this.allocated();
    return {
      cpu: Math.max(0, this.capacity.cpu - a.cpu),
      memory: Math.max(0, this.capacity.memory - a.memory),
    };
  }

  /** Reserves `resources` for `executionId` (again: replaces its reservation). */
  hold(executionId: string, resources: Resources): void {
    this.#held.set(executionId, { cpu: resources.cpu, memory: resources.memory });
  }

  has(executionId: string): boolean {
    return this.#held.has(executionId);
  }

  release(executionId: string): void {
    this.#held.delete(executionId);
  }

  executions(): string[] {
    return [...this.#held.keys()];
  }
}
