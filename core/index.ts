export * from "./config.js";
export * from "./errors.js";
export * from "./files.js";
export * from "./logger.js";
