/** The `health` function: probes an external monitor can trust (Patroni-style bodies). */
import { z } from "zod";
import type { HealthConfig } from "../config/mod.ts";
import { type AppContext, FunctionApp } from "../http/app.ts";
import { bearerToken, constantTimeEqual, isUsableToken } from "../http/auth.ts";
import { HttpError } from "../http/errors.ts";
import { addInfoRoute } from "../http/info.ts";
import type { LogSink } from "../http/logger.ts";
import { SELF_CONTAINED_CSP } from "../http/html.ts";
import { dashboardData, renderDashboard } from "./dashboard.ts";
import * as probes from "./health.ts";
import { HaRuntime, type HaRuntimeOptions } from "./runtime.ts";

export interface HealthDeps extends HaRuntimeOptions {
  logSink?: LogSink;
}

const UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  kb: 1024,
  kib: 1024,
  mb: 1024 ** 2,
  mib: 1024 ** 2,
  gb: 1024 ** 3,
  gib: 1024 ** 3,
  tb: 1024 ** 4,
  tib: 1024 ** 4,
};

/** A byte size: `16777216`, `16MB`, `512kB`, `1GiB` (1024-based, as PostgreSQL reads units). */
export const ByteSize = z
  .string()
  .trim()
  .regex(
    /^\d+(\.\d+)?\s*([kKmMgGtT]i?[bB]|[bB])?$/,
    "must be a non-negative size such as 16MB or 16777216",
  )
  .transform((v) => {
    const m = /^(\d+(?:\.\d+)?)\s*([A-Za-z]*)$/.exec(v)!;
    return Math.round(Number(m[1]) * UNITS[m[2].toLowerCase()]);
  })
  .refine((n) => Number.isSafeInteger(n), "is too large");

const Seconds = z
  .string()
  .trim()
  .regex(/^\d+(\.\d+)?$/, "must be a non-negative number of seconds")
  .transform(Number)
  .refine((n) => n <= 86_400 * 7, "must be at most 604800 seconds");

const Site = z.enum(["primary", "standby"]).describe(
  "A configured site; default: whichever holds the role now",
);

export const PrimaryQuery = z.object({ site: Site.optional(), token: z.string().optional() })
  .strict();
export const StandbyQuery = z.object({
  site: Site.optional(),
  lag: ByteSize.optional().describe("Largest healthy lag in bytes or with a unit (default 16MB)"),
  max_staleness: Seconds.optional().describe(
    "Seconds since the last message from the publisher, used when the primary is unreachable (default 60)",
  ),
  token: z.string().optional(),
}).strict();
const TokenOnly = z.object({ token: z.string().optional() }).strict();

const ProbeBody = z.object({
  probe: z.string(),
  state: z.string().optional(),
  role: z.string().optional(),
  epoch: z.number().nullable().optional(),
  reason: z.string().optional().describe("Why the probe is unhealthy (absent when healthy)"),
}).passthrough();

const probeResponses = {
  200: { description: "Healthy", schema: ProbeBody },
  503: { description: "Unhealthy; `reason` says why", schema: ProbeBody },
};

export function createHealthApp(config: HealthConfig, deps: HealthDeps = {}): FunctionApp {
  const app = new FunctionApp({
    name: "health",
    // Unset or blank HEALTH_TOKEN: every route but /liveness answers 503 not_configured.
    auth: { variable: "HEALTH_TOKEN", token: config.healthToken, allowQueryToken: true },
    logSink: deps.logSink,
  });
  const rt = new HaRuntime(config, "sa-toolkit/health", deps);
  app.onClose(() => rt.close());
  const siteProblems = () =>
    config.problems.filter((p) =>
      p.variable === "PRIMARY_DB_URL" || p.variable === "STANDBY_DB_URL"
    ).map((p) => p.variable);
  const send = (r: probes.ProbeResult, c: import("../http/app.ts").AppContext) => {
    // no-transform: monitors send Accept-Encoding (Go's client always does), and compressing
    // each small probe body cost more than answering it (bench/health at 1,000 req/s).
    c.header("cache-control", "no-store, no-transform");
    return c.json(r.body, r.healthy ? 200 : 503);
  };
  const unconfigured = (probe: string): probes.ProbeResult => ({
    healthy: false,
    body: {
      probe,
      state: "not_configured",
      reason: `missing configuration: ${siteProblems().join(", ")}`,
    },
  });

  addInfoRoute(app, config.problems);
  app.route(
    {
      method: "get",
      path: "/liveness",
      summary:
        "The function process answers (no SQL). Needs the token like every route, except when HEALTH_TOKEN is unset: then it is the one route that answers",
      auth: false,
      authorize: (c) => livenessAuth(c, config.healthToken),
      query: TokenOnly,
      responses: { 200: { description: "Alive", schema: ProbeBody } },
    },
    (_input, c) =>
      send({ healthy: true, body: { probe: "liveness", state: "running", role: "unknown" } }, c),
  );
  app.route(
    {
      method: "get",
      path: "/readiness",
      summary: "Configuration loaded and the control state (ha.state) readable on a site",
      query: TokenOnly,
      responses: probeResponses,
    },
    async (_input, c) => send(await probes.readiness(rt, siteProblems()), c),
  );
  app.route(
    {
      method: "get",
      path: "/primary",
      summary:
        "A writable primary: reachable, not in recovery, not read-only, not fenced, newest epoch",
      query: PrimaryQuery,
      responses: probeResponses,
    },
    async ({ query }, c) =>
      send(
        siteProblems().length
          ? unconfigured("primary")
          : await probes.primary(rt, query.site, c.get("log")),
        c,
      ),
  );
  app.route(
    {
      method: "get",
      path: "/standby",
      summary: "A standby that applies: subscription enabled, worker running, lag under the bound",
      query: StandbyQuery,
      responses: probeResponses,
    },
    async ({ query }, c) =>
      send(
        siteProblems().length ? unconfigured("standby") : await probes.standby(rt, query.site, {
          lagBytes: query.lag ?? 16 * 1024 ** 2,
          maxStalenessSeconds: query.max_staleness ?? 60,
        }, c.get("log")),
        c,
      ),
  );
  app.route(
    {
      method: "get",
      path: "/replication",
      summary: "Replication metrics for graphs (always 200 once configured)",
      query: TokenOnly,
      responses: {
        200: { description: "Metrics", schema: ProbeBody },
        503: { description: "Not configured", schema: ProbeBody },
      },
    },
    async (_input, c) =>
      send(
        siteProblems().length
          ? unconfigured("replication")
          : await probes.replication(rt, c.get("log")),
        c,
      ),
  );
  app.route(
    {
      method: "get",
      path: "/pgbouncer",
      summary:
        "PgBouncer answers, the database is not paused or disabled, and routes to the primary",
      query: TokenOnly,
      responses: probeResponses,
    },
    async (_input, c) => {
      if (!rt.routerConfigured()) {
        return send({
          healthy: false,
          body: {
            probe: "pgbouncer",
            state: "not_configured",
            reason: "the PgBouncer router is not configured",
          },
        }, c);
      }
      return send(
        siteProblems().length
          ? unconfigured("pgbouncer")
          : await probes.pgbouncer(rt, c.get("log")),
        c,
      );
    },
  );
  app.route(
    {
      method: "get",
      path: "/dashboard",
      summary:
        "Self-contained HTML status page: topology, lag over the last hour, recent failovers. Opened with ?token= once, it sets an HttpOnly cookie and redirects, so the page it refreshes carries no token",
      auth: false,
      query: TokenOnly,
      responses: {
        200: { description: "HTML page", contentType: "text/html" },
        303: { description: "Token accepted from the URL: the cookie is set, the URL cleaned" },
        401: { description: "No valid token or cookie" },
        503: { description: "Not configured" },
      },
    },
    async ({ query }, c) => {
      const redirect = await dashboardAuth(c, config.healthToken, query.token);
      if (redirect) return redirect;
      if (siteProblems().length) return send(unconfigured("dashboard"), c);
      const standby = await probes.standby(rt, undefined, {
        lagBytes: 16 * 1024 ** 2,
        maxStalenessSeconds: 60,
      }, c.get("log"));
      const obs = await rt.observeShared(probes.PROBE_DEADLINE_MS);
      const html = renderDashboard(await dashboardData(rt, standby, obs));
      c.header("content-security-policy", SELF_CONTAINED_CSP);
      c.header("cache-control", "no-store");
      c.header("referrer-policy", "no-referrer");
      return c.html(html);
    },
  );
  return app;
}

const DASHBOARD_COOKIE = "sa_health_dashboard";

/** How long a dashboard cookie opens the page (checked server-side, not only by the browser). */
const COOKIE_SECONDS = 12 * 3600;

/**
 * The cookie value: `<issued, unix seconds>.<HMAC(token, issued)>`, so the cookie is not the
 * token, needs no server state, and expires whatever the browser does; rotating HEALTH_TOKEN
 * invalidates every cookie.
 */
async function cookieValue(token: string, issued: number): Promise<string> {
  const key = await crypto.subtle.importKey(
    "raw",
    new TextEncoder().encode(token),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  const mac = await crypto.subtle.sign(
    "HMAC",
    key,
    new TextEncoder().encode(`health-dashboard/v2/${issued}`),
  );
  const hex = Array.from(new Uint8Array(mac), (b) => b.toString(16).padStart(2, "0")).join("");
  return `${issued}.${hex}`;
}

async function cookieValid(token: string, value: string | undefined): Promise<boolean> {
  const m = /^(\d{1,12})\.[0-9a-f]{64}$/.exec(value ?? "");
  if (!m) return false;
  const issued = Number(m[1]);
  const now = Math.floor(Date.now() / 1000);
  if (issued > now + 60 || now - issued > COOKIE_SECONDS) return false;
  return await constantTimeEqual(value!, await cookieValue(token, issued));
}

/**
 * The path the browser requested: the function sees `/health/dashboard`; Supabase's gateway (and
 * the local one) serve it under `/functions/v1`.
 */
function dashboardPath(seen: string): string {
  return seen.startsWith("/functions/v1/") ? seen : `/functions/v1${seen}`;
}

function readCookie(header: string | undefined, name: string): string | undefined {
  for (const part of (header ?? "").split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return v.join("=");
  }
  return undefined;
}

/**
 * The dashboard accepts the bearer header, its cookie, or `?token=` — which it swaps for the
 * cookie with a 303 to the same path without the query, so neither the meta refresh nor the
 * browser history holds the token. Returns the redirect, or undefined when the request may go on.
 */
async function dashboardAuth(
  c: AppContext,
  token: string | undefined,
  fromQuery: string | undefined,
): Promise<Response | undefined> {
  if (!isUsableToken(token)) {
    throw new HttpError(
      503,
      "not_configured",
      "This function is not configured: set HEALTH_TOKEN.",
    );
  }
  const unauthorized = () =>
    new HttpError(401, "unauthorized", "A valid bearer token is required.", undefined, {
      "WWW-Authenticate": 'Bearer realm="sa-toolkit"',
    });
  const header = bearerToken(c.req.header("authorization"));
  if (header !== undefined) {
    if (!(await constantTimeEqual(header, token))) throw unauthorized();
    return undefined;
  }
  if (fromQuery !== undefined) {
    if (!(await constantTimeEqual(fromQuery, token))) throw unauthorized();
    const url = new URL(c.req.url);
    const secure = url.protocol === "https:" || c.req.header("x-forwarded-proto") === "https";
    const value = await cookieValue(token, Math.floor(Date.now() / 1000));
    return new Response(null, {
      status: 303,
      headers: {
        // Relative: resolves to the same path without the query, behind the gateway's prefix.
        location: "dashboard",
        // Sent to this page only, and valid for COOKIE_SECONDS whatever the browser keeps.
        "set-cookie": `${DASHBOARD_COOKIE}=${value}; Max-Age=${COOKIE_SECONDS}; Path=${
          dashboardPath(url.pathname)
        }; HttpOnly; SameSite=Strict${secure ? "; Secure" : ""}`,
        "cache-control": "no-store",
        "referrer-policy": "no-referrer",
      },
    });
  }
  const cookie = readCookie(c.req.header("cookie"), DASHBOARD_COOKIE);
  if (!(await cookieValid(token, cookie))) throw unauthorized();
  return undefined;
}

/** Liveness: the usual token check when HEALTH_TOKEN is set; open when it is not. */
async function livenessAuth(c: AppContext, token: string | undefined): Promise<void> {
  if (token === undefined || token.trim() === "") return;
  if (!isUsableToken(token)) {
    throw new HttpError(503, "not_configured", "HEALTH_TOKEN is too short.");
  }
  const presented = bearerToken(c.req.header("authorization")) ?? c.req.query("token");
  if (presented === undefined || !(await constantTimeEqual(presented, token))) {
    throw new HttpError(401, "unauthorized", "A valid bearer token is required.", undefined, {
      "WWW-Authenticate": 'Bearer realm="sa-toolkit"',
    });
  }
}
