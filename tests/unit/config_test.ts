import assert from "node:assert/strict";
import {
  loadFailoverConfig,
  loadHealthConfig,
  loadStorageConfig,
  loadTelemetryConfig,
  requireConfigured,
} from "../../shared/config/mod.ts";
import { HttpError } from "../../shared/http/errors.ts";

Deno.test("a complete telemetry environment has no problems", () => {
  const c = loadTelemetryConfig({
    SUPABASE_DB_URL: "postgresql://postgres:x@db:5432/postgres",
    TOOLKIT_API_TOKEN: "t",
  });
  assert.deepEqual(c.problems, []);
  assert.equal(c.apiToken, "t");
});

Deno.test("missing and malformed variables become problems naming the variable, never its value", () => {
  const c = loadStorageConfig({
    SUPABASE_DB_URL: "mysql://nope",
    S3_PREFIX: "/abs",
    S3_FORCE_PATH_STYLE: "maybe",
  });
  const vars = c.problems.map((p) => p.variable).sort();
  assert.deepEqual(vars, [
    "AWS_S3_BUCKET",
    "S3_FORCE_PATH_STYLE",
    "S3_PREFIX",
    "SUPABASE_DB_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_URL",
  ]);
  assert.doesNotMatch(JSON.stringify(c.problems), /mysql:\/\/nope/);
});

Deno.test("storage settings parse bucket lists, prefixes and booleans", () => {
  const c = loadStorageConfig({
    SUPABASE_BUCKETS: "avatars, docs  media",
    S3_PREFIX: "backup/2026/",
    S3_FORCE_PATH_STYLE: "TRUE",
  });
  assert.deepEqual(c.buckets, ["avatars", "docs", "media"]);
  assert.equal(c.s3.prefix, "backup/2026/");
  assert.equal(c.s3.forcePathStyle, true);
  assert.equal(loadStorageConfig({ SUPABASE_BUCKETS: "ALL" }).buckets, "all");
  assert.ok(
    loadStorageConfig({ S3_PREFIX: "a/../b/" }).problems.some((p) => p.variable === "S3_PREFIX"),
  );
});

Deno.test("the fly router requires its app name and API token", () => {
  const c = loadFailoverConfig({ PGBOUNCER_ROUTER: "fly" });
  const vars = c.problems.map((p) => p.variable);
  assert.ok(vars.includes("FLY_APP_NAME"));
  assert.ok(vars.includes("FLY_API_TOKEN"));
  assert.equal(c.fly.apiUrl, "https://api.machines.dev");
  assert.ok(
    loadFailoverConfig({ PGBOUNCER_ROUTER: "dns" }).problems.some((p) =>
      p.variable === "PGBOUNCER_ROUTER"
    ),
  );
});

Deno.test("health config keeps HEALTH_TOKEN optional", () => {
  const c = loadHealthConfig({
    PRIMARY_DB_URL: "postgresql://a@b/c",
    STANDBY_DB_URL: "postgresql://a@d/c",
  });
  assert.equal(c.healthToken, undefined);
  assert.deepEqual(c.problems, []);
});

Deno.test("requireConfigured throws 503 not_configured listing only the asked variables", () => {
  const c = loadTelemetryConfig({});
  assert.throws(() => requireConfigured(c, ["SUPABASE_DB_URL"]), (e: unknown) => {
    assert.ok(e instanceof HttpError);
    assert.equal(e.status, 503);
    assert.equal(e.code, "not_configured");
    assert.deepEqual((e.details as { variables: string[] }).variables, ["SUPABASE_DB_URL"]);
    return true;
  });
  requireConfigured(c, ["SOMETHING_ELSE"]);
});
