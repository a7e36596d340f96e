/**
 * The planned switchover's write gap as the schema grows: for each size in BENCH_TABLES (default
 * 1,1000,10000) a fresh pair whose `public` schema holds that many extra replicated tables, each
 * with its own sequence (bigserial), empty (set up with copy_data = false). Under 4 writers
 * committing one row per transaction through PgBouncer, BENCH_SWITCHOVERS (default 5) planned
 * switchovers alternating direction; per size: the write gap (longest time with no acknowledged
 * commit) p50 / p99 / max, acknowledged rows lost, and the median of each paused step's time.
 *
 *   ./toolkit bench switchover-scale
 */
import { failoverClient } from "../../tests/harness/ha_client.ts";
import {
  setupHa,
  underWriteLoad,
  waitFor,
  waitOperation,
  withStack,
} from "../../tests/harness/mod.ts";
import { LEDGER_DDL } from "../../tests/harness/ha.ts";
import { fmt, median, percentile, printTable } from "../lib/stats.ts";
import { PLANNED } from "../../shared/ha/failover_steps.ts";

const SIZES = (Deno.env.get("BENCH_TABLES") ?? "1,1000,10000").split(",").map(Number);
const SWITCHOVERS = Number(Deno.env.get("BENCH_SWITCHOVERS") ?? 5);
/** The steps between PAUSE and RESUME (the write gap), from the step table itself. */
const NAMES = PLANNED.map((s) => s.name);
const PAUSED = NAMES.slice(NAMES.indexOf("pause"), NAMES.indexOf("resume") + 1);

globalThis.addEventListener("unhandledrejection", (e) => {
  e.preventDefault();
  console.error(`  (load generator: ${e.reason instanceof Error ? e.reason.message : e.reason})`);
});

/** N tables with a bigserial each, created by one DO block that commits every 500. */
function schemaWith(n: number): string {
  return `${LEDGER_DDL}
do $$
begin
  for i in 1..${n} loop
    execute format('create table if not exists public.t%s (id bigserial primary key, v text)', i);
    if i % 500 = 0 then
      commit; -- keeps the locks of one transaction within the default lock table
    end if;
  end loop;
end
$$;`;
}

const rows: (string | number)[][] = [];
const stepRows: (string | number)[][] = [];
for (const size of SIZES) {
  console.error(`${size} extra tables: starting a pair ...`);
  await withStack(
    { name: `bench-scale-${size}`, ha: true, functions: { logSink: () => {} } },
    async (stack) => {
      const t0 = performance.now();
      await setupHa(stack, schemaWith(size), { copyData: false });
      console.error(`  set up in ${Math.round(performance.now() - t0)} ms`);
      const f = failoverClient(stack);
      let primary = "primary";
      const gaps: number[] = [];
      let lost = 0;
      const steps = new Map<string, number[]>();
      for (let i = 0; i < SWITCHOVERS; i++) {
        await waitFor(
          "the pair to be ready",
          async () => (await f.get("/checks")).body.ok === true,
          120_000,
          250,
        );
        const target = primary === "primary" ? "standby" : "primary";
        const run = await underWriteLoad(stack.pgbouncer!.url(), async () => {
          const r = await f.post("/", { mode: "planned" });
          if (r.status !== 202) throw new Error(`${r.status} ${JSON.stringify(r.body)}`);
          const op = await waitOperation(f.base, f.token, String(r.body.operation_id), {
            timeoutMs: 300_000,
          });
          if (op.state !== "succeeded") throw new Error(`${op.step}: ${op.error}`);
          return op;
        }, { pauseMs: 2, warmup: 200 });
        const site = (target === "primary" ? stack.primary! : stack.standby!).sql(
          "supabase_admin",
          { max: 1 },
        );
        lost += (await run.writers.missingOn(site)).length;
        if (Deno.env.get("BENCH_TIMELINE")) {
          // Where the gap goes: each step's end relative to the last commit before the gap.
          const at = await site`
            select step, outcome, extract(epoch from at) * 1000 as ms from ha.operation_steps
            where operation_id = ${run.result.operation_id} order by id`;
          const t0 = run.stats.maxGapAt;
          console.error(
            "    " + at.map((r) => `${r.step}:${r.outcome} ${Math.round(Number(r.ms) - t0)}`)
              .join(", "),
          );
          console.error(`    writer errors ${JSON.stringify(run.stats.errors)}`);
          const sync = (run.result.steps ?? []).find((s) =>
            s.step === "seq_sync" && s.outcome === "done"
          );
          console.error(`    seq_sync ${JSON.stringify(sync?.details ?? {})}`);
        }
        await site.end();
        gaps.push(run.stats.maxGapMs);
        for (const s of run.result.steps ?? []) {
          if (s.outcome !== "done" || !PAUSED.includes(s.step)) continue;
          steps.set(s.step, [...(steps.get(s.step) ?? []), Number(s.details.ms ?? 0)]);
        }
        primary = target;
        const paused = (run.result.steps ?? []).filter((s) =>
          s.outcome === "done" && PAUSED.includes(s.step)
        ).map((s) => `${s.step} ${s.details.ms ?? "?"}`).join(", ");
        console.error(`  #${i + 1}: write gap ${run.stats.maxGapMs} ms (${paused})`);
      }
      rows.push([
        size + 2, // the ledger and accounts tables of LEDGER_DDL besides the extra ones
        size + 2,
        gaps.length,
        `${median(gaps)} ms`,
        `${percentile(gaps, 99)} ms`,
        `${Math.max(...gaps)} ms`,
        lost,
      ]);
      stepRows.push([
        size + 2,
        ...PAUSED.map((s) => fmt(median(steps.get(s) ?? [NaN]), 0)),
      ]);
    },
  );
}

console.log("\nPlanned switchover under 4 writers, by schema size (sequences: one per table)\n");
printTable(
  [
    "replicated app tables",
    "sequences",
    "runs",
    "write gap p50",
    "p99",
    "max",
    "acknowledged rows lost",
  ],
  rows,
);
console.log("\nMedian ms per paused step\n");
printTable(["tables", ...PAUSED], stepRows);
