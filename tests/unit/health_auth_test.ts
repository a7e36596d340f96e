/**
 * The health function fails closed: with HEALTH_TOKEN unset or blank only /health/liveness
 * answers (no SQL); every other route is 503 not_configured. With it set, liveness needs the
 * token like every route. No database is needed: nothing here may reach one.
 */
import assert from "node:assert/strict";
import { loadHealthConfig } from "../../shared/config/mod.ts";
import { createHealthApp } from "../../shared/ha/health_app.ts";
import { memorySink } from "../../shared/http/logger.ts";

const ROUTES = ["/readiness", "/primary", "/standby", "/replication", "/pgbouncer", "/dashboard"];
const DB = {
  PRIMARY_DB_URL: "postgresql://u:p@127.0.0.1:1/db",
  STANDBY_DB_URL: "postgresql://u:p@127.0.0.1:2/db",
};

for (const token of [undefined, "", "   "]) {
  Deno.test(`HEALTH_TOKEN ${JSON.stringify(token)}: only liveness answers, the rest is 503 not_configured`, async () => {
    const app = createHealthApp(loadHealthConfig({ ...DB, HEALTH_TOKEN: token }), {
      logSink: memorySink().sink,
    });
    try {
      const live = await app.request("/health/liveness");
      assert.equal(live.status, 200);
      assert.equal((await live.json()).probe, "liveness");
      for (const path of ROUTES) {
        for (const method of ["GET", "HEAD", "OPTIONS"]) {
          const res = await app.request(`/health${path}`, { method });
          assert.equal(res.status, 503, `${method} ${path}`);
          if (method === "GET") assert.equal((await res.json()).error, "not_configured");
          else await res.body?.cancel();
        }
      }
    } finally {
      await app.close();
    }
  });
}

Deno.test("with HEALTH_TOKEN set, liveness needs it (header or ?token=) like every route", async () => {
  const token = "t".repeat(32);
  const app = createHealthApp(loadHealthConfig({ ...DB, HEALTH_TOKEN: token }), {
    logSink: memorySink().sink,
  });
  try {
    assert.equal((await app.request("/health/liveness")).status, 401);
    assert.equal((await app.request("/health/liveness?token=nope")).status, 401);
    const ok = await app.request("/health/liveness", {
      headers: { authorization: `Bearer ${token}` },
    });
    assert.equal(ok.status, 200);
    await ok.body?.cancel();
    const q = await app.request(`/health/liveness?token=${token}`);
    assert.equal(q.status, 200);
    await q.body?.cancel();
  } finally {
    await app.close();
  }
});
