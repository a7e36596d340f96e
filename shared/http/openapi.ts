/**
 * OpenAPI 3.1 for a function, generated at request time from the very routes and zod schemas the
 * handlers validate with — so the document cannot drift from the code. Served at
 * `GET /<function>/openapi.json` (behind the function's token, like every route).
 */
import { z } from "zod";
import type { FunctionApp, RouteSpec } from "./app.ts";

/** The one error shape every function answers with. */
export const ErrorBody = z.object({
  error: z.string().describe("snake_case code, e.g. invalid_input, unauthorized, not_configured"),
  message: z.string(),
  details: z.unknown().optional(),
});

type Json = Record<string, unknown>;

function jsonSchema(schema: z.ZodType, io: "input" | "output"): Json {
  const s = z.toJSONSchema(schema, { io, unrepresentable: "any", target: "draft-2020-12" }) as Json;
  delete s.$schema;
  return s;
}

/** Query/path parameters from a zod object schema (other shapes become one free-form object). */
function parameters(schema: z.ZodType | undefined, where: "query" | "path"): Json[] {
  if (!schema) return [];
  const js = jsonSchema(schema, "input");
  const props = (js.properties ?? {}) as Record<string, Json>;
  const required = new Set((js.required ?? []) as string[]);
  return Object.entries(props).map(([name, s]) => ({
    name,
    in: where,
    required: where === "path" || required.has(name),
    ...(s.description ? { description: s.description } : {}),
    schema: s,
  }));
}

/** Statuses every route can answer besides its own. */
export function standardStatuses(spec: RouteSpec): Record<number, string> {
  const out: Record<number, string> = {
    401: "Missing or wrong bearer token",
    500: "Internal error (the body carries the request id, never internals)",
    503: "Not configured, or a dependency is down",
  };
  if (spec.query || spec.body || spec.params) out[400] = "Invalid input (zod issues in details)";
  if (spec.body) out[400] = "Invalid input or body that is not JSON";
  return out;
}

export function openApiDocument(app: FunctionApp, origin = ""): Json {
  const paths: Record<string, Record<string, Json>> = {};
  for (const spec of app.routes) {
    const path =
      `/${app.name}${spec.path === "/" ? "" : spec.path}`.replace(/:([A-Za-z_]+)/g, "{$1}") ||
      `/${app.name}`;
    const responses: Record<string, Json> = {};
    for (const [status, r] of Object.entries(spec.responses)) {
      const type = r.contentType ?? "application/json";
      responses[status] = {
        description: r.description,
        ...(r.schema || type === "application/json"
          ? {
            content: {
              [type]: { schema: r.schema ? jsonSchema(r.schema, "output") : { type: "object" } },
            },
          }
          : { content: { [type]: { schema: { type: "string" } } } }),
      };
    }
    for (const [status, description] of Object.entries(standardStatuses(spec))) {
      responses[status] ??= {
        description,
        content: { "application/json": { schema: { $ref: "#/components/schemas/Error" } } },
      };
    }
    const op: Json = {
      operationId: `${spec.method}_${app.name}${spec.path}`.replace(/[^A-Za-z0-9]+/g, "_").replace(
        /_+$/,
        "",
      ),
      summary: spec.summary,
      ...(spec.description ? { description: spec.description } : {}),
      parameters: [...parameters(spec.params, "path"), ...parameters(spec.query, "query")],
      responses,
    };
    if (spec.body) {
      op.requestBody = {
        required: true,
        content: { "application/json": { schema: jsonSchema(spec.body, "input") } },
      };
    }
    (paths[path] ??= {})[spec.method] = op;
  }
  return {
    openapi: "3.1.0",
    info: {
      title: `SA Toolkit — ${app.name}`,
      version: app.version,
      description:
        `The ${app.name} Edge Function. Every route needs \`Authorization: Bearer <token>\`.`,
    },
    servers: [{ url: origin ? `${origin}/functions/v1` : "/functions/v1" }],
    security: [{ bearer: [] }, ...(app.name === "health" ? [{ queryToken: [] }] : [])],
    components: {
      securitySchemes: {
        bearer: { type: "http", scheme: "bearer" },
        ...(app.name === "health"
          ? { queryToken: { type: "apiKey", in: "query", name: "token" } }
          : {}),
      },
      schemas: { Error: jsonSchema(ErrorBody, "output") },
    },
    paths,
  };
}

export function addOpenApiRoute(app: FunctionApp): void {
  app.route(
    {
      method: "get",
      path: "/openapi.json",
      summary: "This function's OpenAPI 3.1 document, generated from the route schemas",
      query: app.name === "health"
        ? z.object({ token: z.string().optional() }).strict()
        : undefined,
      responses: {
        200: { description: "OpenAPI 3.1 document", schema: z.record(z.string(), z.unknown()) },
      },
    },
    (_input, c) => {
      const url = new URL(c.req.url);
      const origin = c.req.header("x-forwarded-host")
        ? `https://${c.req.header("x-forwarded-host")}`
        : url.origin;
      return c.json(openApiDocument(app, origin));
    },
  );
}
