/**
 * Serves the four functions the way Supabase's gateway does: one listener, URLs shaped
 * `http://<host>:<port>/functions/v1/<name>/<route>`, and each function receiving the path from
 * `/<name>` on. The apps are built by the same factories and config loaders as the entrypoints.
 */
import {
  type Env,
  loadFailoverConfig,
  loadHealthConfig,
  loadStorageConfig,
  loadTelemetryConfig,
} from "../../shared/config/mod.ts";
import type { FunctionApp } from "../../shared/http/app.ts";
import type { LogSink } from "../../shared/http/logger.ts";
import { createFailoverApp, type FailoverDeps } from "../../shared/ha/failover_app.ts";
import { createHealthApp, type HealthDeps } from "../../shared/ha/health_app.ts";
import { createStorageApp } from "../../shared/storage/app.ts";
import { createTelemetryApp } from "../../shared/telemetry/app.ts";

export const FUNCTION_NAMES = ["telemetry", "health", "failover", "storage-to-s3"] as const;
export type FunctionName = typeof FUNCTION_NAMES[number];

/** Extra dependencies for the HA functions (test hooks, the Fly stand-in's fetch). */
export interface FunctionDeps {
  health?: HealthDeps;
  failover?: FailoverDeps;
}

export function createApps(
  env: Env,
  logSink?: LogSink,
  deps: FunctionDeps = {},
): Record<FunctionName, FunctionApp> {
  return {
    telemetry: createTelemetryApp(loadTelemetryConfig(env), { logSink }),
    health: createHealthApp(loadHealthConfig(env), { logSink, ...deps.health }),
    failover: createFailoverApp(loadFailoverConfig(env), { logSink, ...deps.failover }),
    "storage-to-s3": createStorageApp(loadStorageConfig(env), { logSink }),
  };
}

export interface FunctionsServer {
  /** e.g. http://127.0.0.1:54321 */
  origin: string;
  /** e.g. http://127.0.0.1:54321/functions/v1/telemetry */
  url(name: FunctionName): string;
  apps: Record<FunctionName, FunctionApp>;
  stop(): Promise<void>;
}

export function serveFunctions(
  env: Env,
  options: { port?: number; hostname?: string; logSink?: LogSink; deps?: FunctionDeps } = {},
): Promise<FunctionsServer> {
  const apps = createApps(env, options.logSink, options.deps);
  const hostname = options.hostname ?? "127.0.0.1";
  return new Promise((resolve, reject) => {
    try {
      const server = Deno.serve({
        hostname,
        port: options.port ?? 0,
        onListen: () => {},
      }, (request) => {
        const url = new URL(request.url);
        const match = /^\/functions\/v1\/([^/]+)(\/.*)?$/.exec(url.pathname);
        const app = match ? apps[match[1] as FunctionName] : undefined;
        if (!match || !app) {
          return Response.json({
            error: "function_not_found",
            message: "No function at this path.",
          }, { status: 404 });
        }
        url.pathname = `/${match[1]}${match[2] ?? ""}`;
        return app.fetch(new Request(url, request));
      });
      const origin = `http://${hostname}:${server.addr.port}`;
      resolve({
        origin,
        url: (name) => `${origin}/functions/v1/${name}`,
        apps,
        stop: async () => {
          await server.shutdown();
          await Promise.all(Object.values(apps).map((a) => a.close()));
        },
      });
    } catch (e) {
      reject(e);
    }
  });
}
