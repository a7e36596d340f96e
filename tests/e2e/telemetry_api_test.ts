/**
 * The telemetry function over HTTP against the real stack: every route, auth, bad input (which
 * must change nothing), a database that is down, and the HTML report in headless Chromium.
 */
import assert from "node:assert/strict";
import { inspectPage } from "../harness/chromium.ts";
import { type Stack, withStack } from "../harness/mod.ts";
import { sampledRun, SCENARIOS } from "../integration/telemetry/diagnosis_corpus.ts";

function api(stack: Stack) {
  const base = stack.functions!.url("telemetry");
  const headers = {
    authorization: `Bearer ${stack.tokens.api}`,
    "content-type": "application/json",
  };
  return {
    base,
    get: (path: string) => fetch(`${base}${path}`, { headers }),
    post: (path: string, body?: unknown) =>
      fetch(`${base}${path}`, {
        method: "POST",
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      }),
    del: (path: string) => fetch(`${base}${path}`, { method: "DELETE", headers }),
  };
}

async function json(res: Response): Promise<Record<string, unknown>> {
  const text = await res.text();
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`not JSON (${res.status}): ${text.slice(0, 200)}`);
  }
}

/** Row counts of every telemetry table plus the canary: "nothing changed" means these are equal. */
async function dbState(stack: Stack): Promise<string> {
  const sql = stack.primary!.sql("supabase_admin");
  const rows = await sql`
    select c.relname, (xpath('/row/n/text()', query_to_xml(format('select count(*) as n from telemetry.%I', c.relname), false, true, '')))[1]::text as n
    from pg_class c join pg_namespace ns on ns.oid = c.relnamespace
    where ns.nspname = 'telemetry' and c.relkind = 'r' order by 1`;
  const [canary] = await sql`select to_regclass('public.canary') is not null as present`;
  return JSON.stringify({ rows, canary: canary.present });
}

Deno.test("the telemetry API: routes, auth, validation, outages and the HTML report", async (t) => {
  await withStack(
    { name: "telemetry-api", primary: true, migrate: true, functions: true },
    async (stack) => {
      const primary = stack.primary!;
      const sql = primary.sql("postgres", { max: 16 });
      await sql`select telemetry.unschedule_jobs()`; // nothing writes behind the tests' back
      await sql`create table public.canary (id int)`;
      await sql`create table public.orders (id bigint primary key, v text)`;
      await sql`update telemetry.config set value = '2' where key = 'cpu_count'`;
      const c = api(stack);

      await stack.step(
        t,
        "every route answers 401 without a token and with a wrong one",
        async () => {
          const routes = stack.functions!.apps.telemetry.routes.filter((r) => r.path !== "/");
          assert.ok(routes.length >= 12);
          for (const r of routes) {
            const path = r.path.replace(":kind", "waits").replace(":id", "1").replace(
              ":schema",
              "public",
            ).replace(":table", "orders");
            for (const headers of [{}, { authorization: `Bearer ${stack.tokens.api}x` }]) {
              const res = await fetch(`${c.base}${path}`, {
                method: r.method.toUpperCase(),
                headers,
              });
              assert.equal(res.status, 401, `${r.method} ${path}`);
              assert.equal((await json(res)).error, "unauthorized");
            }
          }
        },
      );

      let runId = 0;
      let baselineRunId = 0;
      await stack.step(t, "runs are started and ended over HTTP", async () => {
        const created = await c.post("/runs", { name: "api baseline", meta: { job: "etl" } });
        assert.equal(created.status, 201);
        baselineRunId = Number(((await json(created)).run as Record<string, unknown>).id);
        const conn = await sql.reserve();
        await conn`insert into public.orders select g, 'x' from generate_series(1, 100) g`;
        await conn`select pg_stat_force_next_flush()`;
        conn.release();
        await new Promise((res) => setTimeout(res, 200));
        const ended = await c.post(`/runs/${baselineRunId}/end`);
        assert.equal(ended.status, 200);
        const run = (await json(ended)).run as Record<string, unknown>;
        assert.ok(run.ended_at);
        assert.deepEqual(run.meta, { job: "etl" });
        const again = await c.post(`/runs/${baselineRunId}/end`);
        assert.equal(again.status, 409);
        assert.equal((await json(again)).error, "conflict");
        const missing = await c.post("/runs/999999/end");
        assert.equal(missing.status, 404);
        const list = await json(await c.get("/runs?limit=5"));
        assert.ok((list.runs as unknown[]).length >= 1);
      });

      await stack.step(t, "tracked tables are added, listed, compared and removed", async () => {
        const added = await c.post("/tracked-tables", { table: "public.orders" });
        assert.equal(added.status, 201);
        assert.equal((await json(added)).table, "public.orders");
        const listed = await json(await c.get("/tracked-tables"));
        assert.ok((listed.tables as { relname: string }[]).some((x) => x.relname === "orders"));
        const r = await json(await c.post("/runs", { name: "orders load" }));
        const id = (r.run as { id: number }).id;
        const conn = await sql.reserve();
        await conn`insert into public.orders select g, 'y' from generate_series(1001, 3000) g`;
        await conn`select pg_stat_force_next_flush()`;
        conn.release();
        await new Promise((res) => setTimeout(res, 200));
        await c.post(`/runs/${id}/end`);
        const tc = await c.get(`/table-compare?table=orders&run=${id}`);
        assert.equal(tc.status, 200);
        const body = await json(tc);
        assert.equal((body.compare as Record<string, unknown>).inserts_delta, 2000);
        const gone = await c.del("/tracked-tables/public/orders");
        assert.equal(gone.status, 200);
        const again = await c.del("/tracked-tables/public/orders");
        assert.equal(again.status, 404);
        assert.equal((await json(again)).error, "not_tracked");
      });

      await stack.step(
        t,
        "a lock-contention batch is compared, summarised and diagnosed over HTTP",
        async () => {
          const scenario = SCENARIOS.find((s) => s.cause === "row_lock_wait")!;
          const ctx = { cluster: primary, sql, admin: primary.sql("supabase_admin") };
          await scenario.setup?.(ctx);
          const base = await sampledRun(ctx, "api clean", () => scenario.baseline(ctx));
          const run = await sampledRun(ctx, "api contended", () => scenario.faulty(ctx));
          runId = run.id;
          baselineRunId = base.id;

          const cmp = await json(await c.get(`/compare?run=${run.id}`));
          assert.equal((cmp.window as Record<string, unknown>).start, run.start);
          assert.equal(typeof (cmp.compare as Record<string, unknown>).wal_bytes_delta, "number");

          const byTime = await c.get(
            `/compare?start=${
              encodeURIComponent(new Date(Date.parse(run.start) - 1000).toISOString())
            }&end=${encodeURIComponent(new Date(Date.parse(run.end) + 1000).toISOString())}`,
          );
          assert.equal(byTime.status, 200);
          await byTime.body?.cancel();

          const ws = await json(await c.get(`/wait-summary?run=${run.id}`));
          assert.ok((ws.samples as number) > 5);
          const lock = (ws.rows as { wait_class: string; avg_waiters: number }[]).find((r) =>
            r.wait_class === "Lock"
          );
          assert.ok(lock && lock.avg_waiters > 0.5, JSON.stringify(ws.rows));

          const recent = await json(await c.get("/recent/locks?limit=5"));
          assert.ok((recent.rows as unknown[]).length > 0);
          assert.ok((recent.rows as unknown[]).length <= 5);

          const d = await json(await c.get(`/diagnose?run=${run.id}&baseline_run=${base.id}`));
          const findings = d.findings as { cause: string; evidence: Record<string, unknown> }[];
          assert.equal(findings[0].cause, "row_lock_wait");
          assert.ok(findings[0].evidence.blocker_pid);
          assert.equal(
            ((d.attribution as Record<string, unknown>).by_wait_class as { wait_class: string }[])[
              0
            ].wait_class,
            "Lock",
          );
        },
      );

      await stack.step(
        t,
        "bad input is a 400 with the error shape, and changes nothing",
        async () => {
          const before = await dbState(stack);
          const now = Date.now();
          const iso = (ms: number) => encodeURIComponent(new Date(ms).toISOString());
          const cases: [string, string, unknown?][] = [
            ["GET", `/compare?start=yesterday&end=${iso(now)}`],
            ["GET", `/compare?start=2026-11-27T01:00:00&end=${iso(now)}`],
            ["GET", `/compare?start=${iso(now)}&end=${iso(now - 60_000)}`],
            ["GET", `/compare?start=${iso(now)}`],
            ["GET", `/compare?run=abc`],
            ["GET", `/compare?run=1&start=${iso(now - 1000)}&end=${iso(now)}`],
            ["GET", `/compare?start=${iso(now - 30 * 86_400_000)}&end=${iso(now)}`],
            ["GET", `/wait-summary?start=2026-13-45T99:00:00Z&end=${iso(now)}`],
            ["GET", `/recent/bogus`],
            ["GET", `/recent/locks?limit=0`],
            ["GET", `/recent/locks?limit=100000`],
            [
              "GET",
              `/table-compare?table=${encodeURIComponent("x; drop table canary")}&start=${
                iso(now - 60_000)
              }&end=${iso(now)}`,
            ],
            [
              "GET",
              `/table-compare?table=${encodeURIComponent('"..."')}&start=${iso(now - 60_000)}&end=${
                iso(now)
              }`,
            ],
            [
              "GET",
              `/table-compare?table=no_such_table&start=${iso(now - 60_000)}&end=${iso(now)}`,
            ],
            ["GET", `/diagnose?run=${runId}&baseline_start=${iso(now - 60_000)}`],
            [
              "GET",
              `/diagnose?run=${runId}&baseline_run=${baselineRunId}&baseline_start=${
                iso(now - 60_000)
              }&baseline_end=${iso(now)}`,
            ],
            ["GET", `/diagnose?run=${runId}&cpu_count=-1`],
            ["GET", `/report?start=${iso(now)}&end=${iso(now - 1)}`],
            ["POST", "/tracked-tables", { table: "x; drop table canary" }],
            ["POST", "/tracked-tables", { table: "canary", extra: 1 }],
            ["POST", "/tracked-tables", { table: 42 }],
            ["POST", "/runs", {}],
            ["POST", "/runs", { name: "" }],
            ["POST", "/runs", { name: "x".repeat(201) }],
            ["POST", "/runs", "not an object"],
            ["POST", "/runs/-1/end"],
            ["DELETE", "/tracked-tables/public/x;drop"],
          ];
          for (const [method, path, body] of cases) {
            const res = method === "GET"
              ? await c.get(path)
              : method === "POST"
              ? await c.post(path, body)
              : await c.del(path);
            assert.equal(res.status, 400, `${method} ${path} → ${res.status}`);
            const err = await json(res);
            assert.match(String(err.error), /^[a-z_]+$/);
            assert.equal(typeof err.message, "string");
          }
          const raw = await fetch(`${c.base}/runs`, {
            method: "POST",
            headers: { authorization: `Bearer ${stack.tokens.api}` },
            body: "{not json",
          });
          assert.equal(raw.status, 400);
          assert.equal((await json(raw)).error, "invalid_json");
          assert.equal(await dbState(stack), before);
        },
      );

      await stack.step(
        t,
        "the report is self-contained HTML that Chromium renders with charts and no console errors",
        async () => {
          const res = await c.get(`/report?run=${runId}&baseline_run=${baselineRunId}`);
          assert.equal(res.status, 200);
          assert.match(res.headers.get("content-type") ?? "", /text\/html/);
          const html = await res.text();
          assert.doesNotMatch(html, /<script|<link|@import|url\(|https?:\/\//i);
          const file = await Deno.makeTempFile({ prefix: "sa-toolkit-report-", suffix: ".html" });
          try {
            await Deno.writeTextFile(file, html);
            await Deno.chmod(file, 0o644);
            const page = await inspectPage(`file://${file}`, {
              expression: `JSON.stringify({
            series: document.querySelectorAll('#aas-chart .series').length,
            areas: [...document.querySelectorAll('#aas-chart .series')].map((p) => p.getBBox().height).filter((h) => h > 0).length,
            wal: document.querySelectorAll('#wal-chart .series').length,
            findings: document.querySelectorAll('.finding').length,
            lockRows: document.querySelectorAll('table.locks tbody tr').length,
            summary: document.getElementById('summary').textContent
          })`,
              screenshotName: "telemetry-report",
            });
            assert.deepEqual(page.problems, []);
            const v = JSON.parse(String(page.value));
            assert.ok(v.series >= 2, `series: ${v.series}`);
            assert.ok(v.areas >= 1, "at least one series has a visible area");
            assert.ok(v.wal >= 1);
            assert.ok(v.findings >= 1);
            assert.ok(v.lockRows >= 1);
            assert.match(v.summary, /Row-lock waits/);
            const png = await Deno.stat(page.screenshot!);
            assert.ok(png.size > 10_000, "the screenshot has content");
            console.log(`report screenshot: ${page.screenshot}`);
          } finally {
            await Deno.remove(file);
          }
        },
      );

      await stack.step(
        t,
        "a database that is down gives 503 database_unavailable, and the API recovers",
        async () => {
          await primary.stop("fast");
          try {
            const res = await c.get(`/compare?run=${runId}`);
            assert.equal(res.status, 503);
            assert.equal((await json(res)).error, "database_unavailable");
          } finally {
            await primary.start();
          }
          let status = 0;
          for (let i = 0; i < 20 && status !== 200; i++) {
            const res = await c.get(`/compare?run=${runId}`);
            status = res.status;
            await res.body?.cancel();
            if (status !== 200) await new Promise((r) => setTimeout(r, 250));
          }
          assert.equal(status, 200);
        },
      );
    },
  );
});
