export * from "./app.ts";
export * from "./auth.ts";
export * from "./errors.ts";
export * from "./logger.ts";
export * from "./redact.ts";
