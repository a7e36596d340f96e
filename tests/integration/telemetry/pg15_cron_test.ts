/** The telemetry schema on PostgreSQL 15 with pg_cron, installed by the real Supabase CLI. */
import assert from "node:assert/strict";
import { dbPush, REPO_ROOT, waitFor, withStack } from "../../harness/mod.ts";
import { telemetrySuite } from "./suite.ts";

Deno.test("telemetry on PostgreSQL 15 with pg_cron: jobs, collection by cron, signals, uninstall", async (t) => {
  await withStack(
    {
      name: "telemetry-pg15",
      primary: true,
      migrate: true,
      pgSettings: { autovacuum_naptime: "1s" },
    },
    async (stack) => {
      const primary = stack.primary!;
      const sql = primary.sql("postgres");
      const [{ installed }] = await sql`select now() as installed`;

      await stack.step(
        t,
        "the three jobs exist with the schedules pg_cron 1.4 supports",
        async () => {
          const [{ v }] = await sql`select telemetry.pg_cron_version()::text as v`;
          assert.equal(v, "1.4");
          const jobs = await sql`select jobname, schedule, command, username from cron.job
               where jobname like 'telemetry\\_%' order by jobname`;
          assert.deepEqual(jobs.map((j) => [j.jobname, j.schedule, j.username]), [
            ["telemetry_cleanup", "17 3 * * *", "postgres"],
            ["telemetry_sample", "* * * * *", "postgres"],
            ["telemetry_snapshot", "*/5 * * * *", "postgres"],
          ]);
          for (const j of jobs) {
            assert.match(
              j.command,
              /^set statement_timeout = '[0-9a-z]+'; set synchronous_commit = local; select/,
            );
          }
        },
      );

      await stack.step(
        t,
        "scheduling again (function or migration) never duplicates a job",
        async () => {
          await sql`select * from telemetry.schedule_jobs()`;
          await sql`select * from telemetry.schedule_jobs()`;
          const push = await dbPush(primary.url("postgres"));
          assert.equal(push.appliedAny, false);
          const [{ n }] =
            await sql`select count(*)::int as n from cron.job where jobname like 'telemetry\\_%'`;
          assert.equal(n, 3);
        },
      );

      await telemetrySuite(t, stack, primary);

      await stack.step(t, "pg_cron really runs the sample job and its rows arrive", async () => {
        const db = primary.sql("postgres");
        await waitFor(
          "a successful telemetry_sample run by pg_cron",
          async () => {
            const r = await db`
            select 1 from cron.job_run_details d join cron.job j using (jobid)
            where j.jobname = 'telemetry_sample' and d.status = 'succeeded' and d.start_time > ${installed}`;
            return r.length > 0;
          },
          90_000,
          1000,
        );
        const [run] = await db`
          select d.start_time from cron.job_run_details d join cron.job j using (jobid)
          where j.jobname = 'telemetry_sample' and d.status = 'succeeded' order by d.start_time desc limit 1`;
        const near = await db`
          select 1 from telemetry.samples
          where captured_at between ${run.start_time}::timestamptz - interval '2 seconds'
                                and ${run.start_time}::timestamptz + interval '5 seconds'`;
        assert.ok(near.length >= 1, "a sample row was written by the cron run");
      });

      await stack.step(t, "cleanup trims our rows in cron.job_run_details", async () => {
        const db = primary.sql("postgres");
        const [{ jobid }] = await db`select jobid from cron.job where jobname = 'telemetry_sample'`;
        await db`
          insert into cron.job_run_details (jobid, runid, job_pid, database, username, command, status, return_message, start_time, end_time)
          values (${jobid}, nextval('cron.runid_seq'), 0, 'postgres', 'postgres', 'select 1', 'succeeded', 'old', now() - interval '3 days', now() - interval '3 days')`;
        await db`select * from telemetry.cleanup()`;
        const old = await db`select 1 from cron.job_run_details where return_message = 'old'`;
        assert.equal(old.length, 0);
      });

      await stack.step(
        t,
        "the documented uninstall removes jobs, run history and schema; push --include-all reinstalls",
        async () => {
          const sqlText = await Deno.readTextFile(`${REPO_ROOT}/supabase/uninstall/telemetry.sql`);
          await primary.psql(sqlText, { role: "postgres" });
          const db = primary.sql("postgres");
          const [state] = await db`
          select to_regnamespace('telemetry') is null as schema_gone,
                 (select count(*)::int from cron.job where jobname like 'telemetry\\_%') as jobs,
                 (select count(*)::int from supabase_migrations.schema_migrations where name like 'telemetry\\_%') as history`;
          assert.deepEqual({ ...state }, { schema_gone: true, jobs: 0, history: 0 });
          await primary.psql(sqlText, { role: "postgres" });
          const push = await dbPush(primary.url("postgres"), ["--include-all"]);
          assert.equal(push.appliedAny, true, push.output);
          const [{ n }] =
            await db`select count(*)::int as n from cron.job where jobname like 'telemetry\\_%'`;
          assert.equal(n, 3);
        },
      );
    },
  );
});
