/** The telemetry schema on PostgreSQL 16, 17 and 18 (no pg_cron there: collectors called directly). */
import assert from "node:assert/strict";
import { dbPush, withStack } from "../../harness/mod.ts";
import { telemetrySuite } from "./suite.ts";

Deno.test("telemetry works on PostgreSQL 16, 17 and 18", async (t) => {
  await withStack(
    {
      name: "telemetry-versions",
      versions: [16, 17, 18],
      pgSettings: { autovacuum_naptime: "1s" },
    },
    async (stack) => {
      for (const version of [16, 17, 18] as const) {
        const cluster = stack.clusters.get(version)!;
        await stack.step(
          t,
          `PG${version}: migrations apply through supabase db push without pg_cron, with a notice`,
          async () => {
            const push = await dbPush(cluster.url("postgres"));
            assert.equal(push.appliedAny, true, push.output);
            const notice = await cluster.psql("select * from telemetry.schedule_jobs()", {
              role: "postgres",
            });
            assert.match(
              notice.stderr,
              /NOTICE: +pg_cron is not installed: telemetry jobs are not scheduled/,
            );
            const [{ n }] = await cluster.sql(
              "postgres",
            )`select count(*)::int as n from telemetry.snapshots`;
            assert.ok(n >= 1);
          },
        );
        await telemetrySuite(t, stack, cluster);
      }
    },
  );
});
