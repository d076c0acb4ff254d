export * from "./errors.js";
export * from "./files.js";
export * from "./logger.js";
