export * from "./errors.js";
export * from "./exec.js";
export * from "./executor.js";
export * from "./job-inputs.js";
export * from "./job-results.js";
export * from "./output-capture.js";
export * from "./wasm.js";
export { capModuleMemory, WASM_PAGE_BYTES } from "./wasm-module.js";
