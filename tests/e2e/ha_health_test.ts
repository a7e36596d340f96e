/**
 * The health function against a real primary, standby and PgBouncer: every probe healthy, then
 * each fault the issue lists — a stopped standby, a subscription that is disabled or stuck while
 * writes continue, a paused and a killed PgBouncer, a stopped primary, a primary that accepts
 * TCP and never answers — each turning the right probe 503 with a reason, within the deadline.
 */
import assert from "node:assert/strict";
import { PROBE_DEADLINE_MS } from "../../shared/ha/health.ts";
import { type Answer, healthClient } from "../harness/ha_client.ts";
import {
  runCommand,
  serveFunctions,
  setupHa,
  type Stack,
  waitFor,
  withStack,
} from "../harness/mod.ts";

const PROBES = ["/liveness", "/readiness", "/primary", "/standby", "/replication", "/pgbouncer"];
/** A probe answers within its deadline plus request overhead, whatever its dependencies do. */
const ANSWER_MS = PROBE_DEADLINE_MS + 200;

/**
 * Polls a probe until it answers `status` (probe reads are shared for about a second, so a change
 * shows within that), asserting that every answer on the way came within the deadline.
 */
async function untilStatus(
  h: ReturnType<typeof healthClient>,
  path: string,
  status: number,
  reason?: RegExp,
  timeoutMs = 5000,
): Promise<Answer> {
  let last: Answer | undefined;
  await waitFor(
    `${path} to answer ${status}${reason ? ` with ${reason}` : ""}`,
    async () => {
      last = await h.get(path);
      assert.ok(last.ms < ANSWER_MS, `${path} took ${Math.round(last.ms)} ms`);
      return last.status === status && (!reason || reason.test(String(last.body.reason)));
    },
    timeoutMs,
    100,
  );
  return last!;
}

async function connectionsOf(stack: Stack, app: string): Promise<number[]> {
  return await Promise.all([stack.primary!, stack.standby!].map(async (c) => {
    const sql = c.sql("supabase_admin", { max: 1 });
    const [r] =
      await sql`select count(*)::int as n from pg_stat_activity where application_name = ${app}`;
    await sql.end();
    return r.n as number;
  }));
}

/** A TCP server that accepts connections and never says a word (a half-dead host). */
function tarpit(): { port: number; close: () => void } {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const held: Deno.Conn[] = [];
  (async () => {
    for await (const conn of listener) held.push(conn);
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    close: () => {
      for (const c of held) c.close();
      listener.close();
    },
  };
}

Deno.test("health probes: healthy, faults, deadlines, auth and bad input", async (t) => {
  await withStack({ name: "ha-health", ha: true, functions: true }, async (stack) => {
    await setupHa(stack);
    const h = healthClient(stack);
    const primarySql = stack.primary!.sql("postgres");

    await stack.step(
      t,
      "a healthy pair answers 200 on every probe, bodies name sites not hosts",
      async () => {
        for (const p of PROBES) {
          const r = await h.get(p);
          assert.equal(r.status, 200, `${p}: ${JSON.stringify(r.body)}`);
          const text = JSON.stringify(r.body);
          for (
            const secret of [
              String(stack.primary!.port),
              String(stack.standby!.port),
              stack.primary!.passwords.postgres,
            ]
          ) {
            assert.ok(!text.includes(secret), `${p} leaks a host port or secret`);
          }
        }
        const primary = await h.get("/primary");
        assert.equal(primary.body.role, "primary");
        assert.equal(primary.body.site, "primary");
        assert.equal(primary.body.epoch, 1);
        const standby = await h.get("/standby");
        assert.equal(standby.body.role, "standby");
        assert.equal((standby.body.lag as Record<string, unknown>).measured, "bytes");
        assert.equal((await h.get("/primary?site=standby")).status, 503);
        assert.equal((await h.get("/standby?site=primary")).status, 503);
        const repl = await h.get("/replication");
        const streams = repl.body.streams as Record<string, unknown>[];
        assert.equal(streams.length, 1);
        assert.equal(streams[0].publisher, "primary");
        assert.ok(
          ["reserved", "extended"].includes(
            String((streams[0].slot as Record<string, unknown>).wal_status),
          ),
        );
      },
    );

    await stack.step(
      t,
      "a monitor that accepts gzip and br gets the probe body uncompressed (no-transform)",
      async () => {
        for (const path of ["/primary", "/standby"]) {
          // curl, not fetch: fetch decompresses and hides how the body was sent.
          const r = await runCommand("curl", [
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            `authorization: Bearer ${stack.tokens.health}`,
            "-H",
            "accept-encoding: gzip, br",
            `${h.base}${path}`,
          ]);
          const headers = r.stdout.toLowerCase();
          assert.match(headers, /^http\/1\.1 200/, r.stdout);
          assert.doesNotMatch(headers, /content-encoding:/, r.stdout);
          assert.match(headers, /cache-control: no-store, no-transform/, r.stdout);
        }
      },
    );

    await stack.step(t, "HEAD answers the status with no body", async () => {
      for (
        const [path, status] of [["/primary", 200], ["/primary?site=standby", 503], [
          "/liveness",
          200,
        ]] as const
      ) {
        const res = await fetch(`${h.base}${path}`, {
          method: "HEAD",
          headers: { authorization: `Bearer ${stack.tokens.health}` },
        });
        assert.equal(res.status, status, path);
        assert.equal((await res.arrayBuffer()).byteLength, 0);
      }
    });

    await stack.step(
      t,
      "401 without or with a wrong token on every route; ?token= works for monitors",
      async () => {
        for (const p of PROBES) {
          assert.equal((await h.get(p, {})).status, 401, p);
          assert.equal(
            (await h.get(p, { authorization: `Bearer ${stack.tokens.health}x` })).status,
            401,
            p,
          );
          assert.equal((await h.get(`${p}?token=nope`, {})).status, 401, p);
        }
        assert.equal((await h.get(`/primary?token=${stack.tokens.health}`, {})).status, 200);
      },
    );

    await stack.step(t, "bad query values are 400 invalid_input", async () => {
      for (
        const q of [
          "/standby?lag=abc",
          "/standby?lag=-1",
          "/standby?lag=16XB",
          "/standby?lag=",
          "/standby?max_staleness=-5",
          "/standby?max_staleness=abc",
          "/standby?max_staleness=1e9",
          "/primary?site=elsewhere",
          "/primary?unknown=1",
          "/standby?lag=99999999999999999999GB",
        ]
      ) {
        const r = await h.get(q);
        assert.equal(r.status, 400, q);
        assert.equal(r.body.error, "invalid_input", q);
      }
      assert.equal((await h.get("/standby?lag=16MB&max_staleness=60")).status, 200);
      assert.equal((await h.get("/standby?lag=0.5GiB")).status, 200);
    });

    await stack.step(
      t,
      "polling reuses connections: the count on each site stays flat",
      async () => {
        // Warm up: concurrent probes grow each pool to its bound (2), and no further.
        await Promise.all([h.get("/primary"), h.get("/standby"), h.get("/replication")]);
        const before = await connectionsOf(stack, "sa-toolkit/health");
        for (let i = 0; i < 40; i++) {
          await Promise.all([h.get("/primary"), h.get("/standby"), h.get("/replication")]);
        }
        const after = await connectionsOf(stack, "sa-toolkit/health");
        console.log(
          `  health connections per site before ${before.join("/")} after 120 probes ${
            after.join("/")
          }`,
        );
        assert.deepEqual(after, before);
        assert.ok(after.every((n) => n <= 2));
      },
    );

    await stack.step(
      t,
      "setup refuses to publish a table without replica identity, names it, and changes nothing",
      async () => {
        for (const c of [stack.primary!, stack.standby!]) {
          await c.psql("create table public.no_pk (x int); insert into public.no_pk values (1);", {
            role: "postgres",
          });
        }
        const res = await fetch(`${stack.functions!.url("failover")}/setup`, {
          method: "POST",
          headers: {
            authorization: `Bearer ${stack.tokens.failover}`,
            "content-type": "application/json",
          },
          body: "{}",
        });
        const body = await res.json();
        assert.equal(res.status, 412, JSON.stringify(body));
        assert.equal(body.error, "replica_identity_missing");
        const tables = body.details.tables as { table: string; problem: string }[];
        assert.deepEqual(tables.map((p) => p.table), ["public.no_pk"]);
        assert.match(tables[0].problem, /no primary key/);
        // Nothing changed: not published, not guarded, and the application's UPDATE still works
        // (a published table without replica identity would refuse it).
        const [{ published, triggers }] = await primarySql`
          select (select count(*) from pg_publication_tables where tablename = 'no_pk')::int
                   as published,
                 (select count(*) from pg_trigger where tgrelid = 'public.no_pk'::regclass)::int
                   as triggers`;
        assert.deepEqual({ published, triggers }, { published: 0, triggers: 0 });
        await stack.primary!.psql("update public.no_pk set x = 2;", { role: "postgres" });
        for (const c of [stack.primary!, stack.standby!]) {
          await c.psql("drop table public.no_pk;", { role: "postgres" });
        }
      },
    );

    await stack.step(
      t,
      "a stuck apply worker: lag grows, the standby turns 503 at the bound and 200 after catch-up",
      async () => {
        const standbySql = stack.standby!.sql("supabase_admin", { max: 2 });
        const blocker = await standbySql.reserve();
        await blocker`begin`;
        await blocker`lock table public.ledger in access exclusive mode`;
        try {
          assert.equal((await h.get("/standby?lag=64kB")).status, 200);
          await primarySql`insert into public.ledger (writer, n) select 1000, g from generate_series(1, 3000) g`;
          let lagged: Record<string, unknown> = {};
          await waitFor(
            "the standby to report lag over 64 kB",
            async () => {
              const r = await h.get("/standby?lag=64kB");
              lagged = r.body;
              return r.status === 503;
            },
            15_000,
            100,
          );
          assert.match(String(lagged.reason), /lag \d+ bytes exceeds 65536/);
          const repl = await h.get("/replication");
          const lagBytes = Number((repl.body.streams as Record<string, unknown>[])[0].lag_bytes);
          assert.equal(repl.status, 200);
          assert.ok(lagBytes > 65536, `lag_bytes ${lagBytes}`);
          assert.equal((await h.get("/standby")).status, 200, "still within the default 16MB");
        } finally {
          await blocker`rollback`;
          blocker.release();
        }
        await waitFor(
          "the standby to catch up",
          async () => (await h.get("/standby?lag=64kB")).status === 200,
          15_000,
          100,
        );
      },
    );

    await stack.step(
      t,
      "a disabled subscription is 503 while writes continue, 200 once enabled and caught up",
      async () => {
        const standbySql = stack.standby!.sql("supabase_admin", { max: 1 });
        await stack.standby!.psql("alter subscription dr_subscription disable;");
        await primarySql`insert into public.ledger (writer, n) select 1001, g from generate_series(1, 2000) g`;
        await waitFor(
          "lag to show in /replication",
          async () => {
            const r = await h.get("/replication");
            return Number((r.body.streams as Record<string, unknown>[])[0].lag_bytes) > 65536;
          },
          10_000,
          100,
        );
        await untilStatus(h, "/standby", 503, /^the subscription is disabled$/);
        await stack.standby!.psql("alter subscription dr_subscription enable;");
        await waitFor(
          "the standby to be healthy again",
          async () => (await h.get("/standby?lag=64kB")).status === 200,
          20_000,
          100,
        );
        const [{ n }] =
          await standbySql`select count(*)::int as n from public.ledger where writer = 1001`;
        assert.equal(n, 2000);
      },
    );

    await stack.step(t, "standby stopped: /standby 503 fast, /primary still 200", async () => {
      await stack.standby!.stop("fast");
      await untilStatus(h, "/standby", 503, /site standby is unreachable/);
      assert.equal((await h.get("/primary")).status, 200);
      await stack.standby!.start();
      await waitFor(
        "the standby to recover",
        async () => (await h.get("/standby")).status === 200,
        30_000,
        200,
      );
    });

    await stack.step(
      t,
      "PgBouncer paused is 503; killed is 503 within the deadline; restarted it keeps its route",
      async () => {
        const admin = stack.pgbouncer!.admin();
        await admin.unsafe("PAUSE postgres").simple();
        const paused = await untilStatus(h, "/pgbouncer", 503);
        assert.equal(paused.body.reason, "the routed database is paused");
        await admin.unsafe("RESUME postgres").simple();
        await untilStatus(h, "/pgbouncer", 200);
        await stack.pgbouncer!.kill();
        const dead = await untilStatus(h, "/pgbouncer", 503);
        assert.match(String(dead.body.reason), /PgBouncer admin console/);
        await stack.pgbouncer!.start();
        await waitFor(
          "PgBouncer to be healthy",
          async () => (await h.get("/pgbouncer")).status === 200,
          10_000,
          100,
        );
        const body = (await h.get("/pgbouncer")).body;
        assert.equal(body.routes_to, "primary");
        assert.equal(body.epoch, 1);
      },
    );

    await stack.step(
      t,
      "primary stopped: /primary 503 within the deadline; /standby judged by the heartbeat's age",
      async () => {
        await primarySql`select ha.beat()`;
        await waitFor(
          "the heartbeat to reach the standby",
          async () => {
            const sql = stack.standby!.sql("supabase_admin", { max: 1 });
            const rows = await sql`select 1 from ha.heartbeat where site = 'primary'`;
            await sql.end();
            return rows.length === 1;
          },
          10_000,
          100,
        );
        await stack.primary!.stop("immediate");
        await untilStatus(h, "/primary", 503, /no reachable site holds the primary role/);
        const pinned = await h.get("/primary?site=primary");
        assert.equal(pinned.status, 503);
        assert.match(String(pinned.body.reason), /unreachable \(connection refused\)/);
        const fresh = await h.get("/standby?max_staleness=600");
        assert.equal(fresh.status, 200, JSON.stringify(fresh.body));
        assert.equal((fresh.body.lag as Record<string, unknown>).measured, "heartbeat");
        const stale = await h.get("/standby?max_staleness=0");
        assert.equal(stale.status, 503);
        assert.match(String(stale.body.reason), /over 0 s/);
        await stack.primary!.start();
        await waitFor(
          "the primary to be healthy",
          async () => (await h.get("/primary")).status === 200,
          20_000,
          200,
        );
      },
    );

    await stack.step(
      t,
      "a primary that accepts TCP and never answers: 503 within the deadline, no hang",
      async () => {
        const pit = tarpit();
        const env = stack.env();
        const url = new URL(env.PRIMARY_DB_URL!);
        url.port = String(pit.port);
        const server = await serveFunctions({ ...env, PRIMARY_DB_URL: url.toString() });
        try {
          const started = performance.now();
          const res = await fetch(`${server.url("health")}/primary?site=primary`, {
            headers: { authorization: `Bearer ${stack.tokens.health}` },
          });
          const body = await res.json();
          const ms = performance.now() - started;
          assert.equal(res.status, 503);
          assert.match(String(body.reason), /unreachable/);
          assert.ok(ms < ANSWER_MS, `took ${ms} ms (deadline ${PROBE_DEADLINE_MS} ms)`);
          console.log(`  tarpit primary: 503 in ${Math.round(ms)} ms (${body.reason})`);
          const ready = await fetch(`${server.url("health")}/readiness`, {
            headers: { authorization: `Bearer ${stack.tokens.health}` },
          });
          assert.equal(ready.status, 200, "the standby's control row is still readable");
          await ready.body?.cancel();
        } finally {
          await server.stop();
          pit.close();
        }
      },
    );
  });
});
