/** The `health` function: probes an external monitor can trust (Patroni-style bodies). */
import type { HealthConfig } from "../config/mod.ts";
import { FunctionApp } from "../http/app.ts";
import { addInfoRoute } from "../http/info.ts";
import type { LogSink } from "../http/logger.ts";

export interface HealthDeps {
  logSink?: LogSink;
}

export function createHealthApp(config: HealthConfig, deps: HealthDeps = {}): FunctionApp {
  const app = new FunctionApp({
    name: "health",
    auth: {
      variable: "HEALTH_TOKEN",
      token: config.healthToken,
      allowQueryToken: true,
      openWhenUnset: true,
    },
    logSink: deps.logSink,
  });
  addInfoRoute(app, config.problems);
  app.route(
    {
      method: "get",
      path: "/liveness",
      summary: "The function process answers (no SQL)",
      responses: { 200: { description: "Alive" } },
    },
    (_input, c) => c.json({ state: "running", role: "unknown", probe: "liveness" }),
  );
  return app;
}
