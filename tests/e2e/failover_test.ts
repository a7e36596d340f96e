/**
 * The failover function against a real primary, standby and PgBouncer: guardrails that refuse
 * with 412 and change nothing, a planned switchover and a failback while four writers commit
 * through PgBouncer (every acknowledged row must survive, no duplicate keys), 409 on a concurrent
 * request, idempotency keys, the active-site answer, and bad input.
 */
import assert from "node:assert/strict";
import { inspectPage } from "../harness/chromium.ts";
import { failoverClient, healthClient } from "../harness/ha_client.ts";
import {
  haState,
  setupHa,
  type Stack,
  underWriteLoad,
  waitFor,
  waitOperation,
  waitReplicating,
  withStack,
} from "../harness/mod.ts";

const lagLocks = new Map<Stack, import("../../shared/db/mod.ts").ReservedSql>();

interface Fault {
  name: string;
  mode?: "planned" | "emergency" | "failback";
  expect: string;
  inject: (stack: Stack) => Promise<void>;
  heal: (stack: Stack) => Promise<void>;
}

const FAULTS: Fault[] = [
  {
    name: "PgBouncer is down",
    expect: "router_reachable",
    inject: (s) => s.pgbouncer!.stop(),
    heal: (s) => s.pgbouncer!.start(),
  },
  {
    name: "PgBouncer is paused",
    expect: "router_routes_to_primary",
    inject: async (s) => void await s.pgbouncer!.admin().unsafe("PAUSE postgres").simple(),
    heal: async (s) => void await s.pgbouncer!.admin().unsafe("RESUME postgres").simple(),
  },
  {
    name: "the standby is down",
    expect: "standby_ready",
    inject: (s) => s.standby!.stop("fast"),
    heal: async (s) => {
      await s.standby!.start();
      await waitReplicating(s);
    },
  },
  {
    name: "the subscription is disabled",
    expect: "subscription_healthy",
    inject: (s) => s.standby!.psql("alter subscription dr_subscription disable;").then(() => {}),
    heal: async (s) => {
      await s.standby!.psql("alter subscription dr_subscription enable;");
      await waitReplicating(s);
    },
  },
  {
    name: "the schema drifted on the standby",
    expect: "schema_equal",
    inject: (s) =>
      s.standby!.psql("alter table public.accounts add column note text;", { role: "postgres" })
        .then(() => {}),
    heal: (s) =>
      s.standby!.psql("alter table public.accounts drop column note;", { role: "postgres" }).then(
        () => {},
      ),
  },
  {
    name: "a published table has no replica identity",
    expect: "replica_identity",
    inject: async (s) => {
      for (const c of [s.primary!, s.standby!]) {
        await c.psql("create table public.bare (x int);", { role: "postgres" });
      }
      await s.primary!.psql("alter publication dr_publication add table public.bare;");
      await s.standby!.psql("alter subscription dr_subscription refresh publication;");
    },
    heal: async (s) => {
      await s.primary!.psql("alter publication dr_publication drop table public.bare;");
      await s.standby!.psql("alter subscription dr_subscription refresh publication;");
      for (const c of [s.primary!, s.standby!]) {
        await c.psql("drop table public.bare;", { role: "postgres" });
      }
    },
  },
  {
    name: "replication lags by more than 16 MB",
    expect: "lag_under_threshold",
    inject: async (s) => {
      // The apply worker waits on a lock on the standby while ~25 MB of WAL piles up behind it.
      const lock = await s.standby!.sql("supabase_admin", { max: 1 }).reserve();
      lagLocks.set(s, lock);
      await lock`begin`;
      await lock`lock table public.accounts in access exclusive mode`;
      // 60 transactions, not one: while a single large transaction is still being decoded, the
      // subscriber's replies to keepalives move confirmed_flush_lsn into it, so the slot does
      // not look behind. After the first small one blocks the apply worker, nothing confirms.
      await s.primary!.psql(
        `do $$ begin
           for i in 1..60 loop
             insert into public.accounts (name) select repeat('x', 400) from generate_series(1, 1000);
             commit;
           end loop;
         end $$;`,
        { role: "postgres" },
      );
      // The precondition itself: the slot is more than 16 MB behind before the request is made.
      const src = s.primary!.sql("supabase_admin", { max: 1 });
      try {
        await waitFor(
          "the slot to lag by more than 16 MB",
          async () => {
            const [slot] = await src`
            select coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::float8 as lag,
                   active, confirmed_flush_lsn::text as confirmed
            from pg_replication_slots where slot_name = 'dr_subscription'`;
            if (!(slot?.lag > 16 * 1024 * 1024)) {
              throw new Error(`last seen ${JSON.stringify(slot ?? "no slot")}`);
            }
            return true;
          },
          30_000,
          100,
        );
      } finally {
        await src.end();
      }
    },
    heal: async (s) => {
      const lock = lagLocks.get(s);
      lagLocks.delete(s);
      if (lock) {
        await lock`rollback`;
        lock.release();
      }
      const sql = s.standby!.sql("supabase_admin", { max: 1 });
      await waitFor(
        "the standby to catch up",
        async () => {
          const [{ n }] = await sql`select count(*)::int as n from public.accounts`;
          return n >= 60000;
        },
        60_000,
        200,
      );
      await sql.end();
    },
  },
  {
    name: "an emergency failover while the primary is reachable",
    mode: "emergency",
    expect: "primary_unreachable",
    inject: async () => {},
    heal: async () => {},
  },
  {
    name: "a failback while the primary role is already at home",
    mode: "failback",
    expect: "away_from_home",
    inject: async () => {},
    heal: async () => {},
  },
];

Deno.test("failover: guardrails, zero-loss switchover and failback under writers, 409, idempotency, bad input", async (t) => {
  await withStack({
    name: "failover",
    ha: true,
    functions: {
      env: {
        PRIMARY_SUPABASE_URL: "https://primary-ref.supabase.co",
        STANDBY_SUPABASE_URL: "https://standby-ref.supabase.co",
      },
    },
  }, async (stack) => {
    await setupHa(stack);
    const f = failoverClient(stack);
    const h = healthClient(stack);

    await stack.step(t, "a dry run evaluates every guardrail and changes nothing", async () => {
      const before = await haState(stack);
      const r = await f.post("/", { mode: "planned", dry_run: true });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      assert.equal(r.body.ok, true);
      const names = (r.body.checks as { name: string; ok: boolean }[]).map((c) => c.name);
      for (
        const n of [
          "router_reachable",
          "primary_healthy",
          "standby_ready",
          "router_routes_to_primary",
          "subscription_healthy",
          "lag_under_threshold",
          "schema_equal",
          "replica_identity",
          "source_privileges",
          "no_running_operation",
        ]
      ) assert.ok(names.includes(n), `missing check ${n}`);
      assert.equal(await haState(stack), before);
    });

    for (const fault of FAULTS) {
      await stack.step(
        t,
        `guardrail: ${fault.name} → 412 ${fault.expect}, nothing changed`,
        async () => {
          let error: unknown;
          try {
            // Injected inside the try: a fault made only in part is still healed, so one failed
            // case cannot leave (say) the apply worker locked for every step after it.
            await fault.inject(stack);
            const before = await haState(stack);
            const r = fault.mode === "failback"
              ? await f.post("/failback", {})
              : await f.post("/", { mode: fault.mode ?? "planned" });
            assert.equal(r.status, 412, JSON.stringify(r.body));
            assert.equal(r.body.error, "guardrail_failed");
            const failed = (r.body.details as { failed: string[] }).failed;
            assert.ok(failed.includes(fault.expect), `expected ${fault.expect} in ${failed}`);
            assert.equal(await haState(stack), before);
          } catch (e) {
            error = e;
          }
          try {
            await fault.heal(stack);
          } catch (e) {
            // After a failed step the heal may find its fault half-made: keep the first error.
            if (error === undefined) throw e;
            console.error(`heal after a failed step: ${e instanceof Error ? e.message : e}`);
          }
          if (error !== undefined) throw error;
        },
      );
    }

    await stack.step(
      t,
      "planned switchover under 4 writers: every acknowledged row survives, no duplicate keys",
      async () => {
        // Rows inserted with explicit ids far above their sequence, as some applications do: the
        // new primary's sequences must start above the column's largest value, not only above
        // the source sequence's.
        await stack.primary!.psql(
          `insert into public.accounts (id, name) values (5000000, 'explicit');
           insert into public.ledger (id, writer, n) values (7000000, 999, 1);`,
          { role: "postgres" },
        );
        const run = await underWriteLoad(stack.pgbouncer!.url(), async () => {
          const r = await f.post("/", { mode: "planned", idempotency_key: "switch-1" });
          assert.equal(r.status, 202, JSON.stringify(r.body));
          const second = await f.post("/", { mode: "planned" });
          assert.equal(second.status, 409, JSON.stringify(second.body));
          assert.equal(second.body.error, "operation_in_progress");
          return await waitOperation(f.base, f.token, String(r.body.operation_id));
        });
        const { result: op, stats, writers } = run;
        assert.equal(op.state, "succeeded", `${op.step}: ${op.error}`);
        console.log(
          `  switchover: ${run.ms} ms end to end, write gap ${stats.maxGapMs} ms, ${stats.acked} commits acknowledged, errors ${
            JSON.stringify(stats.errors)
          }`,
        );
        const newPrimary = stack.standby!.sql("supabase_admin");
        assert.deepEqual(await writers.missingOn(newPrimary), []);
        assert.equal(stats.duplicateKeyErrors, 0);
        const done = (op.steps ?? []).filter((s) => s.outcome === "done").map((s) => s.step);
        for (
          const s of [
            "seq_prebump",
            "reverse_prepare",
            "freeze",
            "marker",
            "wait_marker",
            "seq_sync",
            "detach",
            "reverse",
            "repoint",
            "epoch",
            "resume",
            "seq_verify",
            "postcheck",
          ]
        ) {
          assert.ok(done.includes(s), `step ${s} not done`);
        }
        const primary = await h.get("/primary");
        assert.equal(primary.status, 200);
        assert.equal(primary.body.site, "standby");
        assert.equal(primary.body.epoch, 2);
        assert.equal((await h.get("/standby")).body.site, "primary");
        assert.equal((await h.get("/pgbouncer")).status, 200);
        // The old primary refuses application writes, even in an explicit READ WRITE transaction.
        await assert.rejects(
          () =>
            stack.primary!.psql(
              "begin read write; insert into public.ledger (writer, n) values (77, 1); commit;",
              { role: "postgres" },
            ),
          /site primary fenced at epoch 2 \(it is the standby\): writes go to site standby/,
        );
      },
    );

    await stack.step(
      t,
      "the new primary's sequences are above the explicit ids: inserts with the default succeed",
      async () => {
        const sql = stack.standby!.sql("app_writer", { max: 1 });
        const [a] = await sql`insert into public.accounts (name) values ('after') returning id`;
        const [l] = await sql`insert into public.ledger (writer, n) values (998, 1) returning id`;
        await sql.end();
        assert.ok(Number(a.id) > 5000000, `accounts id ${a.id}`);
        assert.ok(Number(l.id) > 7000000, `ledger id ${l.id}`);
      },
    );

    await stack.step(t, "the same idempotency key returns the finished operation", async () => {
      const r = await f.post("/", { mode: "planned", idempotency_key: "switch-1" });
      assert.equal(r.status, 200);
      assert.equal(r.body.state, "succeeded");
      const other = await f.post("/failback", { idempotency_key: "switch-1" });
      assert.equal(other.status, 409);
      assert.equal(other.body.error, "idempotency_conflict");
    });

    await stack.step(
      t,
      "GET /failover/active answers the site, epoch and project URL (failover or health token)",
      async () => {
        const r = await f.get("/active");
        assert.equal(r.status, 200);
        assert.deepEqual(
          { primary: r.body.primary, epoch: r.body.epoch, url: r.body.supabase_url },
          { primary: "standby", epoch: 2, url: "https://standby-ref.supabase.co" },
        );
        const withHealth = await fetch(`${f.base}/active`, {
          headers: { authorization: `Bearer ${stack.tokens.health}` },
        });
        assert.equal(withHealth.status, 200);
        await withHealth.body?.cancel();
        const none = await fetch(`${f.base}/active`);
        assert.equal(none.status, 401);
        await none.body?.cancel();
        assert.ok(!JSON.stringify(r.body).includes(String(stack.standby!.port)));
      },
    );

    await stack.step(t, "failback under 4 writers: zero loss in reverse", async () => {
      const run = await underWriteLoad(stack.pgbouncer!.url(), async () => {
        const r = await f.post("/failback", {});
        assert.equal(r.status, 202, JSON.stringify(r.body));
        return await waitOperation(f.base, f.token, String(r.body.operation_id));
      });
      const { result: op, stats, writers } = run;
      assert.equal(op.state, "succeeded", `${op.step}: ${op.error}`);
      console.log(
        `  failback: ${run.ms} ms end to end, write gap ${stats.maxGapMs} ms, ${stats.acked} commits`,
      );
      assert.deepEqual(await writers.missingOn(stack.primary!.sql("supabase_admin")), []);
      assert.equal(stats.duplicateKeyErrors, 0);
      const primary = await h.get("/primary");
      assert.equal(primary.body.site, "primary");
      assert.equal(primary.body.epoch, 3);
      const verify = await f.get("/verify");
      assert.equal(verify.status, 200);
      await waitFor(
        "the standby to hold the same rows",
        async () => (await f.get("/verify")).body.match === true,
        20_000,
        200,
      );
    });

    await stack.step(
      t,
      "the dashboard shows topology, the lag chart and the operations, in Chromium without errors",
      async () => {
        const beat = stack.primary!.sql("postgres", { max: 1 });
        for (let i = 0; i < 5; i++) {
          await beat`select ha.beat()`;
          await new Promise((r) => setTimeout(r, 100));
        }
        const url = `${h.base}/dashboard?token=${stack.tokens.health}`;
        // The token in the URL is swapped for an HttpOnly cookie; the page it refreshes has none.
        const swap = await fetch(url, { redirect: "manual" });
        assert.equal(swap.status, 303);
        assert.equal(swap.headers.get("location"), "dashboard");
        const cookie = swap.headers.get("set-cookie") ?? "";
        assert.match(
          cookie,
          /^sa_health_dashboard=\d+\.[0-9a-f]{64}; Max-Age=43200; Path=\/functions\/v1\/health\/dashboard; HttpOnly; SameSite=Strict/,
        );
        assert.ok(!cookie.includes(stack.tokens.health), "the cookie is not the token");
        await swap.body?.cancel();
        const res = await fetch(`${h.base}/dashboard`, {
          headers: { cookie: cookie.split(";")[0] },
        });
        assert.equal(res.status, 200);
        assert.match(res.headers.get("content-type") ?? "", /text\/html/);
        const html = await res.text();
        assert.doesNotMatch(html, /<script|<link|@import|url\(|https?:\/\//i);
        assert.doesNotMatch(html, new RegExp(stack.tokens.health));
        for (
          const headers of [{}, { cookie: "sa_health_dashboard=1." + "0".repeat(64) }, {
            authorization: "Bearer wrong-token-wrong-token",
          }]
        ) {
          const anon = await fetch(`${h.base}/dashboard`, { headers, redirect: "manual" });
          assert.equal(anon.status, 401, JSON.stringify(headers));
          await anon.body?.cancel();
        }
        // A genuine cookie issued more than 12 h ago no longer opens the page.
        const issued = Math.floor(Date.now() / 1000) - 13 * 3600;
        const key = await crypto.subtle.importKey(
          "raw",
          new TextEncoder().encode(stack.tokens.health),
          { name: "HMAC", hash: "SHA-256" },
          false,
          ["sign"],
        );
        const mac = new Uint8Array(
          await crypto.subtle.sign(
            "HMAC",
            key,
            new TextEncoder().encode(`health-dashboard/v2/${issued}`),
          ),
        );
        const old = `${issued}.${Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join("")}`;
        const expired = await fetch(`${h.base}/dashboard`, {
          headers: { cookie: `sa_health_dashboard=${old}` },
        });
        assert.equal(expired.status, 401, "an expired cookie is refused server-side");
        await expired.body?.cancel();
        const wrong = await fetch(`${h.base}/dashboard?token=not-the-token-at-all`, {
          redirect: "manual",
        });
        assert.equal(wrong.status, 401, "a wrong token in the URL sets no cookie");
        assert.equal(wrong.headers.get("set-cookie"), null);
        await wrong.body?.cancel();
        const page = await inspectPage(url, {
          expression: `JSON.stringify({
          status: document.getElementById('status').textContent,
          rows: document.querySelectorAll('#topology tr').length,
          lagPoints: document.querySelectorAll('#lag-chart .dot').length,
          lagPath: document.querySelector('#lag-chart .lag-line').getBBox().width,
          lagSegments: document.querySelector('#lag-chart .lag-line').getAttribute('d').split('L').length,
          ops: document.querySelectorAll('details.op').length,
          firstOp: document.querySelector('details.op summary').textContent,
        })`,
          screenshotName: "ha-dashboard",
        });
        assert.deepEqual(page.problems, []);
        const v = JSON.parse(String(page.value));
        assert.match(v.status, /Primary: primary/);
        assert.match(v.status, /routes to primary at epoch 3/);
        assert.match(v.status, /standby: applying/);
        assert.equal(v.rows, 3);
        assert.ok(v.lagPoints >= 5, `lag points ${v.lagPoints}`);
        assert.ok(v.lagSegments >= 5, `lag segments ${v.lagSegments}`);
        assert.ok(v.lagPath > 0, `lag line width ${v.lagPath}`);
        assert.ok(v.ops >= 2);
        assert.match(v.firstOp, /succeeded\s*failback standby → primary \(epoch 3\)/);
      },
    );

    await stack.step(
      t,
      "bad input is a 400 (401 without a token) and changes nothing",
      async () => {
        const before = await haState(stack);
        for (
          const [path, body] of [
            ["/", { mode: "sideways" }],
            ["/", { mode: "planned", force: true }],
            ["/", { mode: "planned", idempotency_key: "has spaces" }],
            ["/", { mode: "planned", idempotency_key: "x".repeat(201) }],
            ["/", { mode: "planned", dry_run: "yes" }],
            ["/failback", { mode: "planned" }],
            ["/rejoin", { site: "primary" }],
            ["/rejoin", { site: "primary", discard_unreplicated: "true" }],
            ["/setup", { schemas: ["public; drop table x"] }],
          ] as const
        ) {
          const r = await f.post(path, body);
          assert.equal(r.status, 400, `${path} ${JSON.stringify(body)}: ${JSON.stringify(r.body)}`);
          assert.equal(r.body.error, "invalid_input");
        }
        const raw = await fetch(`${f.base}/`, {
          method: "POST",
          headers: { authorization: `Bearer ${f.token}`, "content-type": "application/json" },
          body: "{mode:",
        });
        assert.equal(raw.status, 400);
        assert.equal((await raw.json()).error, "invalid_json");
        assert.equal((await f.get("/operations/not-a-uuid")).status, 400);
        assert.equal((await f.get(`/operations/${crypto.randomUUID()}`)).status, 404);
        assert.equal((await f.get("/checks?mode=sideways")).status, 400);
        for (
          const r of stack.functions!.apps.failover.routes.filter((x) =>
            x.path !== "/" || x.method !== "get"
          )
        ) {
          const path = r.path.replace(":id", crypto.randomUUID());
          const res = await fetch(`${f.base}${path === "/" ? "" : path}`, {
            method: r.method.toUpperCase(),
          });
          assert.equal(res.status, 401, `${r.method} ${path}`);
          await res.body?.cancel();
        }
        assert.equal(await haState(stack), before);
      },
    );
  });
});
