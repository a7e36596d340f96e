/**
 * `deno task demo` (or `./toolkit demo`): a guided tour of the three tools on the local stack,
 * everything over HTTP through the real functions:
 *
 *   1. Batch telemetry — a batch runs twice, once clean and once behind a long transaction that
 *      holds its rows; the diagnosis names the cause, and the HTML report is written to a file.
 *   2. HA/DR — the health probes, a planned switchover under a small write load (write gap and
 *      the zero-loss check), then the failback.
 *   3. Storage → S3 — a small bucket copied to the local S3 with progress, then verified.
 *
 * It prints what each step does and what it proved, and stops everything at the end (or on
 * Ctrl-C).
 */
import { failoverClient, healthClient } from "./ha_client.ts";
import { setupHa, waitOperation, Writers } from "./ha.ts";
import { waitFor } from "./process.ts";
import { REPO_ROOT } from "./paths.ts";
import { type Stack, startStack } from "./stack.ts";
import { sampledRun, SCENARIOS } from "../integration/telemetry/diagnosis_corpus.ts";
import { storageDemo } from "./demo_storage.ts";

const bold = (s: string) => (Deno.stdout.isTerminal() ? `\x1b[1m${s}\x1b[0m` : s);
const say = (s = "") => console.log(s);
const step = (s: string) => console.log(`  · ${s}`);
const proved = (s: string) => console.log(`  ✔ ${s}`);
const secs = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

async function telemetryTour(stack: Stack): Promise<void> {
  say(bold("\n1/3  Batch telemetry: why did this batch take longer than last night?"));
  const cluster = stack.primary!;
  const ctx = {
    cluster,
    sql: cluster.sql("postgres", { max: 16 }),
    admin: cluster.sql("supabase_admin", { max: 2 }),
  };
  await ctx.sql`select telemetry.unschedule_jobs()`;
  await ctx.sql`update telemetry.config set value = '2' where key = 'cpu_count'`;
  const scenario = SCENARIOS.find((s) => s.cause === "row_lock_wait")!;
  await scenario.setup?.(ctx);
  step(
    "running the batch (updates on a hot table) as run 'nightly (good)', sampling every 100 ms ...",
  );
  let t = performance.now();
  const base = await sampledRun(ctx, "nightly (good)", () => scenario.baseline(ctx));
  step(`done in ${secs(performance.now() - t)}`);
  step("running it again while another session holds the same rows in a long transaction ...");
  t = performance.now();
  const slow = await sampledRun(ctx, "nightly (slow)", () => scenario.faulty(ctx));
  step(`done in ${secs(performance.now() - t)}`);
  const api = stack.functions!.url("telemetry");
  const headers = { authorization: `Bearer ${stack.tokens.api}` };
  step(`GET /telemetry/diagnose?run=${slow.id}&baseline_run=${base.id}`);
  const d =
    await (await fetch(`${api}/diagnose?run=${slow.id}&baseline_run=${base.id}`, { headers }))
      .json();
  say(`\n    ${d.summary}`);
  for (const f of (d.findings as Record<string, unknown>[]).slice(0, 2)) {
    say(
      `    #${f.rank} ${f.cause} (${f.wait_class}, ${f.impact_session_seconds} session-s): ${
        String(f.recommendation).split(". ")[0]
      }.`,
    );
  }
  const report = `${REPO_ROOT}/.artifacts/demo-telemetry-report.html`;
  await Deno.mkdir(`${REPO_ROOT}/.artifacts`, { recursive: true });
  await Deno.writeTextFile(
    report,
    await (await fetch(`${api}/report?run=${slow.id}&baseline_run=${base.id}`, { headers })).text(),
  );
  proved(`the diagnosis ranks ${d.findings[0].cause} first; the HTML report is ${report}`);
  // The demo's table goes again, so the HA part starts from schemas that match on both sites.
  await ctx.sql`drop table if exists public.diag_hot`;
  await ctx.sql.end();
  await ctx.admin.end();
}

async function haTour(stack: Stack): Promise<void> {
  say(bold("\n2/3  HA/DR: is the standby healthy, and can we switch without losing a row?"));
  step(
    "replicating public.ledger and public.accounts from primary to standby (POST /failover/setup) ...",
  );
  await setupHa(stack);
  const h = healthClient(stack);
  const f = failoverClient(stack);
  for (const p of ["/primary", "/standby", "/pgbouncer"]) {
    const r = await h.get(p);
    const lag = r.body.lag ? `, lag ${(r.body.lag as Record<string, unknown>).bytes} bytes` : "";
    step(
      `GET /health${p} → ${r.status} (site ${
        r.body.site ?? r.body.routes_to
      }, epoch ${r.body.epoch}${lag})`,
    );
  }
  for (
    const [label, path, body] of [["planned switchover", "/", { mode: "planned" }], [
      "failback",
      "/failback",
      {},
    ]] as const
  ) {
    const writers = new Writers(stack.pgbouncer!.url(), 2, 5);
    writers.start();
    await writers.progress(100);
    step(`${label} while 2 writers commit through PgBouncer ...`);
    const started = Date.now();
    const r = await f.post(path, body);
    if (r.status !== 202) throw new Error(`${label}: ${r.status} ${JSON.stringify(r.body)}`);
    const op = await waitOperation(f.base, f.token, String(r.body.operation_id));
    const took = Date.now() - started;
    writers.measureGapsBetween(started, Date.now());
    await writers.progress(100);
    const stats = await writers.stop();
    const site = String(r.body.target);
    const missing = await writers.missingOn(
      (site === "primary" ? stack.primary! : stack.standby!).sql("supabase_admin", { max: 1 }),
    );
    step(`${op.state} in ${took} ms: ${r.body.source} → ${site}, epoch ${r.body.epoch_to}`);
    proved(
      `writes paused ${stats.maxGapMs} ms; ${stats.acked} commits acknowledged, ${missing.length} missing on the new primary, ${stats.duplicateKeyErrors} duplicate keys`,
    );
    await waitFor(
      "the new standby to apply",
      async () => (await h.get("/standby")).status === 200,
      30_000,
      200,
    );
  }
  step(
    "the HA dashboard (topology, lag chart, these operations) is /health/dashboard under ./toolkit dev",
  );
}

const started = performance.now();
say(
  bold("SA Toolkit demo") +
    " — starting the local stack (PostgreSQL 15 primary + standby, PgBouncer, S3, Storage stand-in) ...",
);
const stack = await startStack({
  name: "demo",
  ha: true,
  s3: true,
  storage: true,
  functions: { logSink: () => {} },
});
stack.stopOnSignals(() => {
  console.log("Stopped. Nothing is left running.");
  Deno.exit(130);
});
let failed = false;
try {
  say(`  stack up in ${secs(performance.now() - started)}`);
  await telemetryTour(stack);
  await haTour(stack);
  await storageDemo(stack, { say, step, proved, bold });
  say(bold(`\nDone in ${secs(performance.now() - started)}.`) + " Stopping the stack ...");
} catch (e) {
  failed = true;
  console.error(`\nThe demo failed: ${e instanceof Error ? e.message : e}`);
} finally {
  await stack.stop({ failed });
}
if (failed) Deno.exit(1);
