/**
 * Health probes under monitor load: the health function in its own process (serve.ts), and an
 * open-loop load generator in another process that fires
 * `BENCH_RATE` req/s (default 1000) for `BENCH_SECONDS` (default 20) alternately at
 * /health/primary and /health/standby of the real function, against a real primary/standby/
 * PgBouncer stack. Reports p50/p99/max latency, achieved req/s, errors, and the Postgres
 * connection count before and after. Side by side, in the same run: the upstream toolkit's
 * check_primary_health.sh + check_standby_health.sh re-created as the psql calls they make
 * (one psql process and connection per query), timed per check.
 *
 *   ./toolkit bench health
 */
import { REPO_ROOT, setupHa, withStack } from "../../tests/harness/mod.ts";
import { fmt, percentile, printTable } from "../lib/stats.ts";

const RATE = Number(Deno.env.get("BENCH_RATE") ?? 1000);
const SECONDS = Number(Deno.env.get("BENCH_SECONDS") ?? 20);
const UPSTREAM_N = Number(Deno.env.get("BENCH_UPSTREAM_N") ?? 30);

// Request logs are formatted as in production but not printed (they would drown the table).
await withStack(
  { name: "bench-health", ha: true, functions: { logSink: () => {} } },
  async (stack) => {
    await setupHa(stack);
    // The function under load runs in its own process (bench/health/serve.ts), with the same
    // environment as the stack's.
    const server = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", `${REPO_ROOT}/bench/health/serve.ts`, JSON.stringify(stack.env())],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const origin = (await new Response(server.stdout).body!.getReader().read()).value;
    const base = `${new TextDecoder().decode(origin).trim()}/functions/v1/health`;
    const counts = async () => {
      const out: number[] = [];
      for (const c of [stack.primary!, stack.standby!]) {
        const sql = c.sql("supabase_admin", { max: 1 });
        // The health function's own sessions (its application_name), not the pair's background
        // jobs (the lease tick and heartbeat open a session per run).
        const [r] = await sql`select count(*)::int as n from pg_stat_activity
          where backend_type = 'client backend' and application_name like 'sa-toolkit/health%'`;
        out.push(r.n);
        await sql.end();
      }
      return out;
    };
    // Warm the pools the way the first monitor polls would.
    for (let i = 0; i < 5; i++) {
      await Promise.all(
        ["/primary", "/standby"].map((p) =>
          fetch(`${base}${p}`, { headers: { authorization: `Bearer ${stack.tokens.health}` } })
            .then((
              r,
            ) => r.arrayBuffer())
        ),
      );
    }
    const before = await counts();
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        `${REPO_ROOT}/bench/health/load.ts`,
        JSON.stringify({
          urls: [`${base}/primary`, `${base}/standby`],
          rate: RATE,
          seconds: SECONDS,
          token: stack.tokens.health,
        }),
      ],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const during: number[][] = [];
    const sampler = setInterval(() => counts().then((c) => during.push(c)).catch(() => {}), 2000);
    const out = await child.output();
    clearInterval(sampler);
    const after = await counts();
    server.kill();
    await server.status;
    const r = JSON.parse(new TextDecoder().decode(out.stdout)) as {
      latencies: number[];
      statuses: Record<string, number>;
      elapsed: number;
      lateStarts: number;
      sent: number;
    };
    const errors = Object.entries(r.statuses).filter(([s]) => s !== "200").reduce(
      (a, [, n]) => a + n,
      0,
    );

    // The upstream's probes: bash scripts running one psql per query (5 for the primary check,
    // 5 for the standby check), each a new process and a new connection.
    const psql = "/usr/lib/postgresql/15/bin/psql";
    const primaryQueries = [
      "select 1",
      "show default_transaction_read_only",
      "select count(*) from pg_stat_activity where state = 'active'",
      "select active from pg_replication_slots where slot_name = 'dr_subscription'",
      "select pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)) from pg_replication_slots where slot_name = 'dr_subscription'",
    ];
    const standbyQueries = [
      "select 1",
      "select count(*) from pg_subscription where subname = 'dr_subscription'",
      "select subenabled from pg_subscription where subname = 'dr_subscription'",
      "select last_msg_receipt_time from pg_stat_subscription where subname = 'dr_subscription'",
      "select count(*) filter (where srsubstate = 'r'), count(*) from pg_subscription_rel",
    ];
    const check = async (cluster: typeof stack.primary, queries: string[]) => {
      const t = performance.now();
      for (const q of queries) {
        const p = await new Deno.Command(psql, {
          args: [
            "-X",
            "-t",
            "-A",
            "-h",
            cluster!.host,
            "-p",
            String(cluster!.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            q,
          ],
          env: { PGPASSWORD: cluster!.passwords.postgres },
          stdout: "piped",
          stderr: "piped",
        }).output();
        if (p.code !== 0) throw new Error(new TextDecoder().decode(p.stderr));
      }
      return performance.now() - t;
    };
    const upstream: number[] = [];
    for (let i = 0; i < UPSTREAM_N; i++) {
      upstream.push(await check(stack.primary, primaryQueries));
      upstream.push(await check(stack.standby, standbyQueries));
    }

    console.log(
      `\n${RATE} req/s for ${SECONDS} s, alternating /health/primary and /health/standby (load from a second process)\n`,
    );
    printTable([
      "probe",
      "requests",
      "achieved req/s",
      "p50 ms",
      "p99 ms",
      "max ms",
      "non-200",
      "PG connections (primary/standby) before → during max → after",
    ], [
      [
        "this toolkit, /health/{primary,standby}",
        r.latencies.length,
        fmt(r.latencies.length / r.elapsed, 1),
        fmt(percentile(r.latencies, 50), 1),
        fmt(percentile(r.latencies, 99), 1),
        fmt(Math.max(...r.latencies), 1),
        errors,
        `${before.join("/")} → ${
          [0, 1].map((i) => Math.max(...during.map((d) => d[i]), before[i])).join("/")
        } → ${after.join("/")}`,
      ],
      [
        "upstream scripts (psql per query), per check",
        upstream.length,
        fmt(1000 / percentile(upstream, 50), 1) + " (serial)",
        fmt(percentile(upstream, 50), 1),
        fmt(percentile(upstream, 99), 1),
        fmt(Math.max(...upstream), 1),
        0,
        "5 new connections per check",
      ],
    ]);
    console.log(
      `\np50 ratio upstream / toolkit: ${
        fmt(percentile(upstream, 50) / percentile(r.latencies, 50), 1)
      }×; late starts in the generator: ${r.lateStarts}`,
    );
  },
);
