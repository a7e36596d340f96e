/**
 * The app factory every function is built on: `new Hono().basePath("/<name>")` with a request
 * id, a JSON-lines request log, bearer auth, the one error shape, a JSON 404, and a small route
 * registry so handlers validate their input with zod and the OpenAPI document is generated from
 * the very same schemas.
 */
import { type Context, Hono } from "hono";
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { z } from "zod";
import { requireToken, type TokenPolicy } from "./auth.ts";
import { HttpError } from "./errors.ts";
import { createLogger, type Logger, type LogSink } from "./logger.ts";
import { redactText } from "./redact.ts";

export type AppEnv = { Variables: { requestId: string; log: Logger } };
export type AppContext = Context<AppEnv>;
export type HttpMethod = "get" | "post" | "put" | "delete";

export interface RouteResponse {
  description: string;
  schema?: z.ZodType;
  contentType?: string;
}

export interface RouteSpec<
  Q extends z.ZodType = z.ZodType,
  B extends z.ZodType = z.ZodType,
  P extends z.ZodType = z.ZodType,
> {
  method: HttpMethod;
  /** Hono path under the base path, e.g. `/jobs/:id/run`. */
  path: string;
  summary: string;
  description?: string;
  /**
   * False for routes outside the function's token gate; such a route names its own check in
   * `authorize`, which runs before anything of the request is parsed (a request without the right
   * token gets 401 whatever its body).
   */
  auth?: boolean;
  authorize?: (c: AppContext) => Promise<void>;
  query?: Q;
  body?: B;
  params?: P;
  responses: Record<number, RouteResponse>;
}

export interface RouteInput<Q, B, P> {
  query: Q;
  body: B;
  params: P;
}

export interface FunctionAppOptions {
  /** The function slug; also the base path. */
  name: string;
  auth: TokenPolicy;
  logSink?: LogSink;
  version?: string;
}

const REQUEST_ID = /^[A-Za-z0-9._:-]{8,128}$/;

/** A Hono app plus the list of routes it registered (read by the OpenAPI generator). */
export class FunctionApp {
  readonly name: string;
  readonly hono: Hono<AppEnv>;
  readonly routes: RouteSpec[] = [];
  readonly log: Logger;
  readonly version: string;
  readonly #closers: (() => Promise<void> | void)[] = [];

  constructor(options: FunctionAppOptions) {
    this.name = options.name;
    this.version = options.version ?? "1.0.0";
    this.log = createLogger(options.name, { sink: options.logSink });
    const log = this.log;
    const hono = new Hono<AppEnv>({ strict: false }).basePath(`/${options.name}`);

    hono.use("*", async (c, next) => {
      const incoming = c.req.header("x-request-id") ?? c.req.header("sb-request-id");
      const requestId = incoming && REQUEST_ID.test(incoming) ? incoming : crypto.randomUUID();
      c.set("requestId", requestId);
      c.set("log", log.child({ request_id: requestId }));
      const started = performance.now();
      await next();
      c.header("x-request-id", requestId);
      // The query string is never logged: health monitors may carry ?token= in it.
      c.get("log").info("request", {
        method: c.req.method,
        path: new URL(c.req.url).pathname,
        status: c.res.status,
        ms: Math.round((performance.now() - started) * 10) / 10,
      });
    });

    const gate = requireToken(options.auth);
    hono.use("*", async (c, next) => {
      const match = this.routes.find((r) => r.auth === false && matchesPath(c, this.name, r));
      if (match) return await next();
      return await gate(c, next);
    });

    hono.onError((err, c) => renderError(err, c));
    hono.notFound((c) =>
      c.json({
        error: "not_found",
        message: `No route ${c.req.method} ${new URL(c.req.url).pathname}.`,
      }, 404)
    );
    this.hono = hono;
  }

  /** Registers a route whose query, body and path params are parsed with the given schemas. */
  route<Q extends z.ZodType, B extends z.ZodType, P extends z.ZodType>(
    spec: RouteSpec<Q, B, P>,
    handler: (
      input: RouteInput<z.infer<Q>, z.infer<B>, z.infer<P>>,
      c: AppContext,
    ) => Response | Promise<Response>,
  ): this {
    this.routes.push(spec as unknown as RouteSpec);
    this.hono.on(spec.method.toUpperCase(), spec.path, async (c) => {
      if (spec.authorize) await spec.authorize(c as AppContext);
      const query = spec.query ? parseWith(spec.query, c.req.query(), "query") : undefined;
      const params = spec.params ? parseWith(spec.params, c.req.param(), "path") : undefined;
      let body: unknown = undefined;
      if (spec.body) body = parseWith(spec.body, await readJson(c), "body");
      return await handler(
        { query, body, params } as RouteInput<z.infer<Q>, z.infer<B>, z.infer<P>>,
        c as AppContext,
      );
    });
    return this;
  }

  /** Registers cleanup (pools, timers) run by `close()`; tests and the dev server call it. */
  onClose(fn: () => Promise<void> | void): void {
    this.#closers.push(fn);
  }

  async close(): Promise<void> {
    const closers = this.#closers.splice(0);
    await Promise.allSettled(closers.map((fn) => fn()));
  }

  get fetch(): (request: Request) => Response | Promise<Response> {
    return (request: Request) => this.hono.fetch(request);
  }

  /** Test helper mirroring Hono's `app.request`. */
  request(path: string, init?: RequestInit): Response | Promise<Response> {
    return this.hono.request(path, init);
  }
}

function matchesPath(c: Context, base: string, route: RouteSpec): boolean {
  if (
    c.req.method.toLowerCase() !== route.method &&
    !(c.req.method === "HEAD" && route.method === "get")
  ) {
    return false;
  }
  const path = new URL(c.req.url).pathname.replace(/\/+$/, "");
  const pattern = `/${base}${route.path}`.replace(/\/+$/, "").replace(/:[A-Za-z_]+/g, "[^/]+");
  return new RegExp(`^${pattern}$`).test(path);
}

async function readJson(c: Context): Promise<unknown> {
  const text = await c.req.text();
  if (text.trim() === "") return {};
  try {
    return JSON.parse(text);
  } catch {
    throw new HttpError(400, "invalid_json", "The request body is not valid JSON.");
  }
}

/** Parses one part of the request; a failure is a 400 with zod's issues as details. */
export function parseWith<S extends z.ZodType>(
  schema: S,
  value: unknown,
  where: string,
): z.infer<S> {
  const result = schema.safeParse(value);
  if (!result.success) {
    throw new HttpError(400, "invalid_input", `The request ${where} is invalid.`, {
      location: where,
      issues: result.error.issues.map((i) => ({
        path: i.path.map(String).join("."),
        code: i.code,
        message: i.message,
      })),
    });
  }
  return result.data;
}

function renderError(err: Error, c: Context<AppEnv>): Response {
  const requestId = c.get("requestId");
  if (requestId) c.header("x-request-id", requestId);
  if (err instanceof HttpError) {
    if (err.headers) { for (const [k, v] of Object.entries(err.headers)) c.header(k, v); }
    return c.json(err.body(), err.status);
  }
  if (err instanceof HTTPException) {
    const status = err.status as ContentfulStatusCode;
    return c.json({
      error: status === 400 ? "invalid_input" : "http_error",
      message: "The request was rejected.",
    }, status);
  }
  const log = c.get("log");
  log?.error("unhandled_error", { error: err, stack: redactText(err.stack ?? "") });
  return c.json(
    {
      error: "internal_error",
      message: "An internal error occurred; the function log has details under this request id.",
      details: { request_id: requestId },
    },
    500,
  );
}
