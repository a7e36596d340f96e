/** The `telemetry` function: compare windows, summarise waits and diagnose slow batches. */
import type { TelemetryConfig } from "../config/mod.ts";
import { FunctionApp } from "../http/app.ts";
import { addInfoRoute } from "../http/info.ts";
import type { LogSink } from "../http/logger.ts";

export interface TelemetryDeps {
  logSink?: LogSink;
}

export function createTelemetryApp(config: TelemetryConfig, deps: TelemetryDeps = {}): FunctionApp {
  const app = new FunctionApp({
    name: "telemetry",
    auth: { variable: "TOOLKIT_API_TOKEN", token: config.apiToken },
    logSink: deps.logSink,
  });
  addInfoRoute(app, config.problems);
  return app;
}
