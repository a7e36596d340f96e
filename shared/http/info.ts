/** The `GET /<name>/` route every function has: what it is and whether it is fully configured. */
import { z } from "zod";
import type { ConfigProblem } from "../config/mod.ts";
import type { FunctionApp } from "./app.ts";
import { addOpenApiRoute } from "./openapi.ts";

export const FunctionInfo = z.object({
  function: z.string(),
  version: z.string(),
  configured: z.boolean(),
  missing: z.array(z.string()).describe(
    "Environment variables that are unset or invalid (names only).",
  ),
  routes: z.array(z.string()),
});

/** Registers `GET /<name>/` (description, missing configuration) and `GET /<name>/openapi.json`. */
export function addInfoRoute(app: FunctionApp, problems: ConfigProblem[]): void {
  addOpenApiRoute(app);
  app.route(
    {
      method: "get",
      path: "/",
      summary: "Describe this function and report missing configuration",
      responses: { 200: { description: "Function description", schema: FunctionInfo } },
    },
    (_input, c) =>
      c.json({
        function: app.name,
        version: app.version,
        configured: problems.length === 0,
        missing: problems.map((p) => p.variable),
        routes: app.routes.map((r) => `${r.method.toUpperCase()} /${app.name}${r.path}`),
      }),
  );
}
