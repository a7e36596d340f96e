import { loadFailoverConfig } from "../../../shared/config/mod.ts";
import { createFailoverApp } from "../../../shared/ha/failover_app.ts";
Deno.serve(createFailoverApp(loadFailoverConfig(Deno.env.toObject())).fetch);
