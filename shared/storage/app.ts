/** The `storage-to-s3` function: plan, run, inspect and verify Storage → S3 migration jobs. */
import type { StorageConfig } from "../config/mod.ts";
import { FunctionApp } from "../http/app.ts";
import { addInfoRoute } from "../http/info.ts";
import type { LogSink } from "../http/logger.ts";

export interface StorageDeps {
  logSink?: LogSink;
}

export function createStorageApp(config: StorageConfig, deps: StorageDeps = {}): FunctionApp {
  const app = new FunctionApp({
    name: "storage-to-s3",
    auth: { variable: "TOOLKIT_API_TOKEN", token: config.apiToken },
    logSink: deps.logSink,
  });
  addInfoRoute(app, config.problems);
  return app;
}
