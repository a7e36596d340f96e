/**
 * The local stack itself: every part starts and does its job, over real sockets.
 * Prints how long the full stack took to start (the figure; not asserted).
 */
import assert from "node:assert/strict";
import { GetObjectCommand, PutObjectCommand } from "@aws-sdk/client-s3";
import { loadStorageConfig } from "../../shared/config/mod.ts";
import { createS3Client } from "../../shared/storage/s3.ts";
import { FAILED_LOGS_DIR, waitFor, withStack } from "../harness/mod.ts";

Deno.test("the full local stack starts and every part works", async (t) => {
  await withStack(
    {
      name: "local-stack",
      primary: true,
      standby: true,
      versions: [16, 17, 18],
      pgbouncer: true,
      s3: true,
    },
    async (stack) => {
      console.log(`full stack start-up: ${JSON.stringify(stack.timings)} (ms)`);
      const primary = stack.primary!;
      const standby = stack.standby!;

      await stack.step(
        t,
        "pg_cron is loaded on the primary and postgres can schedule a job",
        async () => {
          const sql = primary.sql("postgres");
          const [preload] = await sql`select current_setting('shared_preload_libraries') as v`;
          assert.match(preload.v, /pg_cron/);
          const [{ jobid }] =
            await sql`select cron.schedule('sa_toolkit_probe', '* * * * *', 'select 1') as jobid`;
          const jobs =
            await sql`select jobname, schedule, username from cron.job where jobid = ${jobid}`;
          assert.deepEqual([...jobs], [{
            jobname: "sa_toolkit_probe",
            schedule: "* * * * *",
            username: "postgres",
          }]);
          await sql`select cron.unschedule('sa_toolkit_probe')`;
        },
      );

      await stack.step(
        t,
        "the postgres role is not a superuser but has Supabase's attributes",
        async () => {
          const sql = primary.sql("postgres");
          const [r] = await sql`
          select rolsuper, rolcreaterole, rolreplication, rolbypassrls,
                 pg_has_role('postgres', 'pg_read_all_stats', 'usage') as read_all_stats,
                 pg_has_role('postgres', 'pg_monitor', 'usage') as monitor
          from pg_roles where rolname = 'postgres'`;
          assert.deepEqual({ ...r }, {
            rolsuper: false,
            rolcreaterole: true,
            rolreplication: true,
            rolbypassrls: true,
            read_all_stats: true,
            monitor: true,
          });
          const roles =
            await sql`select rolname from pg_roles where rolname in ('anon','authenticated','service_role') order by 1`;
          assert.deepEqual(roles.map((x) => x.rolname), ["anon", "authenticated", "service_role"]);
        },
      );

      await stack.step(
        t,
        "a row inserted on the primary arrives on the standby through a subscription",
        async () => {
          const p = primary.sql("postgres");
          const s = standby.sql("postgres");
          const ddl = "create table public.replication_probe (id bigint primary key, note text)";
          await p.unsafe(ddl);
          await s.unsafe(ddl);
          await p`create publication probe_pub for table public.replication_probe`;
          // CREATE SUBSCRIPTION needs a superuser on PostgreSQL 15 (the platform's role here).
          const admin = standby.sql("supabase_admin");
          const conninfo =
            `host=${primary.host} port=${primary.port} user=postgres password=${primary.passwords.postgres} dbname=postgres`;
          await admin.unsafe(
            `create subscription probe_sub connection '${conninfo}' publication probe_pub`,
          );
          await p`insert into public.replication_probe values (1, 'hello from the primary')`;
          await waitFor(
            "the row on the standby",
            async () => {
              const rows = await s`select note from public.replication_probe where id = 1`;
              return rows.length === 1 && rows[0].note === "hello from the primary";
            },
            20_000,
            100,
          );
          await admin.unsafe("drop subscription probe_sub");
          await p`drop publication probe_pub`;
        },
      );

      await stack.step(t, "a query through PgBouncer reaches the primary", async () => {
        const b = stack.pgbouncer!.sql();
        const [r] = await b`select inet_server_port() as port, current_user as who`;
        assert.equal(r.port, primary.port);
        assert.equal(r.who, "postgres");
      });

      await stack.step(
        t,
        "the PgBouncer admin console answers SHOW POOLS through postgres.js",
        async () => {
          const admin = stack.pgbouncer!.admin();
          const pools = await admin.unsafe("SHOW POOLS").simple();
          const routed = pools.find((p: Record<string, unknown>) => p.database === "postgres");
          assert.ok(routed, "the routed database has a pool");
          assert.equal(routed.pool_mode, "transaction");
          const dbs = await admin.unsafe("SHOW DATABASES").simple();
          const db = dbs.find((d: Record<string, unknown>) => d.name === "postgres");
          assert.equal(Number(db?.port), primary.port);
        },
      );

      await stack.step(t, "an object round-trips through the S3 server", async () => {
        const s3 = createS3Client(loadStorageConfig(stack.env()).s3);
        try {
          const body = new TextEncoder().encode("round trip ✓");
          await s3.send(
            new PutObjectCommand({
              Bucket: stack.s3!.buckets[0],
              Key: "probe/round trip.txt",
              Body: body,
              ContentType: "text/plain; charset=utf-8",
            }),
          );
          const got = await s3.send(
            new GetObjectCommand({ Bucket: stack.s3!.buckets[0], Key: "probe/round trip.txt" }),
          );
          assert.equal(got.ContentType, "text/plain; charset=utf-8");
          assert.equal(await got.Body!.transformToString(), "round trip ✓");
        } finally {
          s3.destroy();
        }
      });

      for (const version of [16, 17, 18] as const) {
        await stack.step(t, `PostgreSQL ${version} starts and reports its version`, async () => {
          const sql = stack.clusters.get(version)!.sql("postgres");
          const [r] = await sql`select current_setting('server_version_num')::int / 10000 as major`;
          assert.equal(r.major, version);
        });
      }
    },
  );
});

Deno.test("a failing test stops its stack and keeps the server logs, printing where", async () => {
  let dir = "";
  await assert.rejects(
    withStack({ name: "doomed", primary: true }, (stack) => {
      dir = stack.dir;
      throw new Error("injected failure");
    }),
    /injected failure/,
  );
  await assert.rejects(Deno.stat(dir), Deno.errors.NotFound);
  const kept: string[] = [];
  for await (const e of Deno.readDir(FAILED_LOGS_DIR)) {
    if (e.name.endsWith("-doomed")) kept.push(e.name);
  }
  assert.ok(kept.length > 0, "a .test-logs/<time>-doomed dir exists");
  const latest = `${FAILED_LOGS_DIR}/${kept.sort().at(-1)}`;
  const files = (await Array.fromAsync(Deno.readDir(latest))).map((e) => e.name);
  assert.ok(files.includes("primary__postgres.log"), files.join(","));
  for (const name of kept) await Deno.remove(`${FAILED_LOGS_DIR}/${name}`, { recursive: true });
});
