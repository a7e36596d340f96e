/**
 * API latency over seven days of synthetic history (30-s samples, 100 backends, 5-minute
 * snapshots): p50/p95 of /compare, /wait-summary, /diagnose (with a baseline) and /report for a
 * one-hour window, and /diagnose for a 24-hour window, over HTTP through the real function.
 *
 *   ./toolkit bench telemetry-api          (BENCH_N=50 requests per endpoint)
 */
import { withStack } from "../../tests/harness/mod.ts";
import { fmt, percentile, printTable } from "../lib/stats.ts";

const N = Number(Deno.env.get("BENCH_N") ?? 50);

await withStack(
  { name: "bench-telemetry-api", primary: true, migrate: true, functions: true },
  async (stack) => {
    const sql = stack.primary!.sql("postgres");
    await sql`select telemetry.unschedule_jobs()`;
    const t0 = performance.now();
    await stack.primary!.psql(await Deno.readTextFile(new URL("./history.sql", import.meta.url)), {
      role: "postgres",
    });
    const [h] = await sql`
    select (select count(*) from telemetry.samples)::int as samples, (select count(*) from telemetry.snapshots)::int as snapshots,
           pg_size_pretty(sum(pg_total_relation_size(c.oid))) as size
    from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = 'telemetry' and c.relkind = 'r'`;
    console.error(
      `history: ${h.samples} samples, ${h.snapshots} snapshots, ${h.size} (${
        ((performance.now() - t0) / 1000).toFixed(1)
      } s to load)`,
    );

    const base = stack.functions!.url("telemetry");
    const headers = { authorization: `Bearer ${stack.tokens.api}` };
    const iso = (hoursAgo: number) =>
      encodeURIComponent(new Date(Date.now() - hoursAgo * 3_600_000).toISOString());
    const run = `start=${iso(26)}&end=${iso(25)}`;
    const baseline = `baseline_start=${iso(50)}&baseline_end=${iso(49)}`;
    const endpoints: [string, string][] = [
      ["/compare (1 h)", `/compare?${run}`],
      ["/wait-summary (1 h)", `/wait-summary?${run}`],
      ["/diagnose (1 h, with 1-h baseline)", `/diagnose?${run}&${baseline}`],
      ["/report (1 h, with 1-h baseline)", `/report?${run}&${baseline}`],
      ["/diagnose (24 h)", `/diagnose?start=${iso(48)}&end=${iso(24)}`],
    ];
    const rows: (string | number)[][] = [];
    for (const [label, path] of endpoints) {
      for (let i = 0; i < 3; i++) await (await fetch(`${base}${path}`, { headers })).text();
      const ms: number[] = [];
      for (let i = 0; i < N; i++) {
        const started = performance.now();
        const res = await fetch(`${base}${path}`, { headers });
        await res.text();
        if (res.status !== 200) throw new Error(`${label}: HTTP ${res.status}`);
        ms.push(performance.now() - started);
      }
      rows.push([
        label,
        fmt(percentile(ms, 50), 1),
        fmt(percentile(ms, 95), 1),
        fmt(Math.max(...ms), 1),
      ]);
    }
    console.log(
      `\nTelemetry API latency over 7 days of history (${h.samples} samples, ${h.snapshots} snapshots), ${N} requests each\n`,
    );
    printTable(["endpoint", "p50 ms", "p95 ms", "max ms"], rows);
  },
);
