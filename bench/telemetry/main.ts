/**
 * Collector cost: telemetry.sample() and telemetry.snapshot() against a behavioural re-creation
 * of the replaced tool's collectors (upstream_baseline.sql), alternating A/B call by call on the
 * same connection, with 100 connected backends (50 busy: 45 in pg_sleep, 1 idle-in-transaction
 * lock holder, 4 lock waiters), 5 tracked tables and pg_stat_statements capture on. Then pgbench
 * TPS with sample() every second versus none, in interleaved blocks.
 *
 *   ./toolkit bench telemetry            (BENCH_N=200 calls per side, BENCH_PGBENCH_SECONDS=10)
 */
import type { Sql } from "../../shared/db/mod.ts";
import {
  dbPush,
  PG15_BIN,
  type PgCluster,
  runCommand,
  withStack,
} from "../../tests/harness/mod.ts";
import { fmt, mean, median, percentile, printTable } from "../lib/stats.ts";

const N = Number(Deno.env.get("BENCH_N") ?? 200);
const PGBENCH_SECONDS = Number(Deno.env.get("BENCH_PGBENCH_SECONDS") ?? 6);
const PGBENCH_PAIRS = Number(Deno.env.get("BENCH_PGBENCH_PAIRS") ?? 10);
const VERSIONS = (Deno.env.get("BENCH_VERSIONS") ?? "15,17").split(",").map(Number) as (15 | 17)[];

interface Measure {
  ms: number[];
  wal: number[];
}

async function callMeasured(conn: Sql, sqlText: string, into: Measure): Promise<void> {
  const [{ lsn: before }] = await conn`select pg_current_wal_lsn()::text as lsn`;
  const t0 = performance.now();
  await conn.unsafe(sqlText);
  into.ms.push(performance.now() - t0);
  const [{ d }] =
    await conn`select pg_wal_lsn_diff(pg_current_wal_lsn(), ${before}::pg_lsn)::float8 as d`;
  into.wal.push(d);
}

/** CPU time (ms) the backend serving `conn` has used so far, from /proc (10 ms ticks). */
async function backendCpuMs(conn: Sql): Promise<number> {
  const [{ pid }] = await conn`select pg_backend_pid() as pid`;
  const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) * 10; // utime + stime, at 100 ticks per second
}

async function startLoad(cluster: PgCluster): Promise<() => Promise<void>> {
  const pool = cluster.sql("postgres", { max: 101, applicationName: "bench-load" });
  let stop = false;
  await pool`create table if not exists public.bench_locks (id int primary key, v int)`;
  await pool`insert into public.bench_locks values (1, 0) on conflict do nothing`;
  const holder = await pool.reserve();
  await holder`begin`;
  await holder`update public.bench_locks set v = v + 1 where id = 1`;
  const waiters = await Promise.all([1, 2, 3, 4].map(() => pool.reserve()));
  const waiting = waiters.map((w) =>
    w`update public.bench_locks set v = v + 1 where id = 1`.execute().catch(() => {})
  );
  const sleepers: Promise<void>[] = [];
  for (let i = 0; i < 45; i++) {
    sleepers.push((async () => {
      const c = await pool.reserve();
      while (!stop) await c`select pg_sleep(0.5)`;
      c.release();
    })());
  }
  const idle = await Promise.all(Array.from({ length: 50 }, () => pool.reserve()));
  await Promise.all(idle.map((c) => c`select 1`));
  return async () => {
    stop = true;
    await holder`rollback`;
    holder.release();
    await Promise.all(waiting);
    waiters.forEach((w) => w.release());
    idle.forEach((c) => c.release());
    await Promise.all(sleepers);
    await pool.end({ timeout: 5 });
  };
}

async function pgbench(cluster: PgCluster, args: string[]): Promise<number> {
  const r = await runCommand(`${PG15_BIN}/pgbench`, [
    "-h",
    cluster.host,
    "-p",
    String(cluster.port),
    "-U",
    "postgres",
    ...args,
    "postgres",
  ], {
    env: { PGPASSWORD: cluster.passwords.postgres },
  });
  if (r.code !== 0) throw new Error(`pgbench failed: ${r.stderr}`);
  const m = /tps = ([\d.]+) \(without initial connection time\)/.exec(r.stdout);
  return m ? Number(m[1]) : NaN;
}

const CORES = navigator.hardwareConcurrency;
const results: (string | number)[][] = [];
const cpuRows: (string | number)[][] = [];
const tpsRows: (string | number)[][] = [];

for (const version of VERSIONS) {
  await withStack(
    version === 15
      ? { name: "bench-telemetry-15", primary: true }
      : { name: `bench-telemetry-${version}`, versions: [version] },
    async (stack) => {
      const cluster = version === 15 ? stack.primary! : stack.clusters.get(version)!;
      await dbPush(cluster.url("postgres"));
      await cluster.psql(
        await Deno.readTextFile(new URL("./upstream_baseline.sql", import.meta.url)),
        { role: "postgres" },
      );
      const sql = cluster.sql("postgres", { max: 2 });
      if (version === 15) await sql`select telemetry.unschedule_jobs()`; // no cron runs during the measurement
      for (let i = 1; i <= 5; i++) {
        await sql.unsafe(`create table public.bench_t${i} (id bigint primary key, v text)`);
        await sql.unsafe(
          `insert into public.bench_t${i} select g, md5(g::text) from generate_series(1, 20000) g`,
        );
        await sql`select telemetry.track_table(${`bench_t${i}`})`;
        await sql.unsafe(
          `insert into upstream_baseline.tracked_tables select oid, 'public', relname from pg_class where relname = 'bench_t${i}'`,
        );
      }
      const stopLoad = await startLoad(cluster);
      const conn = await sql.reserve();
      try {
        const [{ n }] =
          await conn`select count(*)::int as n from pg_stat_activity where pid <> pg_backend_pid()`;
        const [{ busy }] =
          await conn`select count(*)::int as busy from pg_stat_activity where state <> 'idle' and pid <> pg_backend_pid() and backend_type = 'client backend'`;
        console.error(
          `PG${version}: ${n} backends (${busy} busy client backends); ${N} calls per collector per side`,
        );
        const ours: Measure = { ms: [], wal: [] };
        const base: Measure = { ms: [], wal: [] };
        for (let i = 0; i < 10; i++) {
          await conn`select telemetry.sample()`;
          await conn`select upstream_baseline.sample()`;
        }
        for (let i = 0; i < N; i++) {
          if (i % 2 === 0) {
            await callMeasured(conn, "select telemetry.sample()", ours);
            await callMeasured(conn, "select upstream_baseline.sample()", base);
          } else {
            await callMeasured(conn, "select upstream_baseline.sample()", base);
            await callMeasured(conn, "select telemetry.sample()", ours);
          }
        }
        // Scheduled snapshots capture pg_stat_statements at most every 15 minutes; run boundaries
        // always do. Both variants are measured against the same baseline calls.
        const snapOurs: Measure = { ms: [], wal: [] };
        const snapStmts: Measure = { ms: [], wal: [] };
        const snapBase: Measure = { ms: [], wal: [] };
        const M = Math.max(20, Math.round(N / 4));
        for (let i = 0; i < M; i++) {
          await callMeasured(conn, "select telemetry._snapshot(false, false)", snapOurs);
          await callMeasured(conn, "select upstream_baseline.snapshot()", snapBase);
          await callMeasured(conn, "select telemetry._snapshot(false, true)", snapStmts);
        }
        // Server CPU per call, from the backend's own utime+stime over many calls.
        const cpu: Record<string, number> = {};
        for (
          const [label, text] of [["ours", "select telemetry.sample()"], [
            "baseline",
            "select upstream_baseline.sample()",
          ]]
        ) {
          const before = await backendCpuMs(conn);
          for (let i = 0; i < 500; i++) await conn.unsafe(text);
          cpu[label] = (await backendCpuMs(conn) - before) / 500;
        }
        cpuRows.push([
          `PG${version}`,
          fmt(cpu.ours, 2),
          fmt(cpu.baseline, 2),
          fmt((cpu.ours / 1000 / CORES) * 100, 3),
        ]);
        const [{ stmts }] =
          await conn`select cardinality(queryid) as stmts from telemetry.statement_snapshots order by snapshot_id desc limit 1`;
        for (
          const [what, a, b] of [
            ["sample()", ours, base],
            ["snapshot(): tables, no statements", snapOurs, snapBase],
            ["snapshot(): tables + top-100 statements", snapStmts, snapBase],
          ] as const
        ) {
          results.push([
            `PG${version}`,
            what,
            fmt(median(a.ms), 3),
            fmt(percentile(a.ms, 95), 3),
            fmt(median(b.ms), 3),
            fmt(percentile(b.ms, 95), 3),
            fmt(median(a.ms) / median(b.ms), 2),
            fmt(median(a.wal), 0),
            fmt(mean(a.wal), 0),
            fmt(median(b.wal), 0),
            fmt(mean(b.wal), 0),
          ]);
        }
        console.error(
          `PG${version}: snapshot kept ${stmts} pg_stat_statements rows and 5 tracked tables`,
        );
      } finally {
        conn.release();
      }

      // pgbench TPS with sample() every second versus none, interleaved blocks. The 100-backend
      // load is stopped first: its 90 pg_sleep round trips a second only add scheduling noise.
      await stopLoad();
      await pgbench(cluster, ["-i", "-s", "10", "-q"]).catch(async () => {
        // -i prints no tps line; NaN is expected.
      });
      const none: number[] = [];
      const sampled: number[] = [];
      const pairCost: number[] = [];
      // ABBA order: each adjacent pair sees the same drift, so the pairwise ratio cancels it.
      for (let p = 0; p < PGBENCH_PAIRS; p++) {
        const order = p % 2 === 0 ? ["none", "sampled"] : ["sampled", "none"];
        const tps: Record<string, number> = {};
        for (const mode of order) {
          let stop = false;
          const sampler = mode === "sampled"
            ? (async () => {
              while (!stop) {
                await sql`select telemetry.sample()`;
                await new Promise((r) => setTimeout(r, 1000));
              }
            })()
            : Promise.resolve();
          tps[mode] = await pgbench(cluster, [
            "-S",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            String(PGBENCH_SECONDS),
            "-n",
          ]);
          stop = true;
          await sampler;
        }
        none.push(tps.none);
        sampled.push(tps.sampled);
        pairCost.push(100 * (1 - tps.sampled / tps.none));
      }
      tpsRows.push([
        `PG${version}`,
        fmt(median(none), 0),
        fmt(median(sampled), 0),
        fmt(median(pairCost), 2),
        pairCost.map((x) => fmt(x, 2)).join(", "),
      ]);
    },
  );
}

console.log(
  `\nCollector cost, ${N} alternating calls per side (ms = client round trip; WAL = bytes of WAL per call)\n`,
);
printTable(
  [
    "PG",
    "collector",
    "ours p50 ms",
    "ours p95 ms",
    "baseline p50 ms",
    "baseline p95 ms",
    "ratio p50",
    "ours WAL p50",
    "ours WAL mean",
    "baseline WAL p50",
    "baseline WAL mean",
  ],
  results,
);
console.log(
  `\nServer CPU per sample() call (500 calls, /proc utime+stime of the backend); cost of one sample a second on ${CORES} cores\n`,
);
printTable([
  "PG",
  "ours CPU ms/call",
  "baseline CPU ms/call",
  "ours: % of the machine at 1 sample/s",
], cpuRows);
console.log(
  `\npgbench -S (-c 4 -j 2, ${PGBENCH_SECONDS} s blocks, ${PGBENCH_PAIRS} ABBA pairs): TPS without sampling vs sample() every second\n`,
);
printTable([
  "PG",
  "TPS none (median)",
  "TPS sampled (median)",
  "cost % (median of pairs)",
  "cost % per pair",
], tpsRows);
