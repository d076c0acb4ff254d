export * from "./capacity-ledger.js";
export * from "./errors.js";
export * from "./job-selection.js";
export * from "./result-spool.js";
