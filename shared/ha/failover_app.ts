/** The `failover` function: planned switchover, emergency failover and failback, by curl. */
import type { FailoverConfig } from "../config/mod.ts";
import { FunctionApp } from "../http/app.ts";
import { addInfoRoute } from "../http/info.ts";
import type { LogSink } from "../http/logger.ts";

export interface FailoverDeps {
  logSink?: LogSink;
}

export function createFailoverApp(config: FailoverConfig, deps: FailoverDeps = {}): FunctionApp {
  const app = new FunctionApp({
    name: "failover",
    auth: { variable: "FAILOVER_TOKEN", token: config.failoverToken },
    logSink: deps.logSink,
  });
  addInfoRoute(app, config.problems);
  return app;
}
