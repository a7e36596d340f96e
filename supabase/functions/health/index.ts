import { loadHealthConfig } from "../../../shared/config/mod.ts";
import { createHealthApp } from "../../../shared/ha/health_app.ts";
Deno.serve(createHealthApp(loadHealthConfig(Deno.env.toObject())).fetch);
