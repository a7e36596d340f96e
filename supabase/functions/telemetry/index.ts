import { loadTelemetryConfig } from "../../../shared/config/mod.ts";
import { createTelemetryApp } from "../../../shared/telemetry/app.ts";
Deno.serve(createTelemetryApp(loadTelemetryConfig(Deno.env.toObject())).fetch);
