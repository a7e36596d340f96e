import { loadStorageConfig } from "../../../shared/config/mod.ts";
import { createStorageApp } from "../../../shared/storage/app.ts";
Deno.serve(createStorageApp(loadStorageConfig(Deno.env.toObject())).fetch);
