/**
 * Scheduling: storage_to_s3.schedule() creates one pg_cron job per migration job whose command
 * carries neither URL nor secret; each tick queues, through pg_net, the POST the function expects
 * with the bearer token read from Vault at that moment; replaying those queued requests runs the
 * job to the end, and the finished job unschedules itself. pg_net and Vault are stand-ins here
 * (tests/harness/sql/platform_standins.sql); everything up to pg_net's HTTP call is real. And on
 * a database without pg_cron, pg_net or Vault the migrations still apply, with a NOTICE, and
 * schedule() says what is missing.
 */
import assert from "node:assert/strict";
import postgres from "postgres";
import { REPO_ROOT, withStack } from "../../harness/mod.ts";
import { RunBody } from "../../../shared/storage/schemas.ts";
import { serveStorageFunction } from "./corpus.ts";

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

async function storageMigrations(): Promise<string[]> {
  const files: string[] = [];
  for await (const e of Deno.readDir(`${REPO_ROOT}/supabase/migrations`)) {
    if (/^2026112713\d{4}_storage_to_s3_.*\.sql$/.test(e.name)) files.push(e.name);
  }
  files.sort();
  return await Promise.all(
    files.map((f) => Deno.readTextFile(`${REPO_ROOT}/supabase/migrations/${f}`)),
  );
}

Deno.test("storage_to_s3.schedule drives a job through pg_cron and pg_net", async (t) => {
  await withStack(
    {
      name: "storage-schedule",
      primary: true,
      migrate: true,
      s3: true,
      storage: true,
    },
    async (stack) => {
      const sql = stack.primary!.sql("postgres");
      const st = stack.storage!;
      const fn = serveStorageFunction(stack.env());
      const fnUrl = fn.url;
      const headers = {
        authorization: `Bearer ${stack.tokens.api}`,
        "content-type": "application/json",
      };
      await st.createBucket("sched");
      await st.seed(
        Array.from({ length: 30 }, (_, i) => ({ bucket: "sched", name: `o${i}`, size: 50_000 })),
      );
      const create = async (body: Json) => {
        const res = await fetch(`${fnUrl}/jobs`, {
          method: "POST",
          headers,
          body: JSON.stringify(body),
        });
        assert.equal(res.status, 201);
        return (await res.json()).job_id as number;
      };
      const jobId = await create({ buckets: ["sched"] });
      const dryId = await create({ buckets: ["sched"], dry_run: true });
      await sql`select vault.create_secret(${stack.tokens.api}, 'toolkit_api_token')`;
      const cronJobs = () =>
        sql`select jobid, jobname, schedule, command, username, active from cron.job
            where jobname like 'storage_to_s3_job_%'`;

      let command = "";
      await stack.step(
        t,
        "schedule() creates one cron job whose command holds no URL or secret",
        async () => {
          const [row] = await sql`select * from storage_to_s3.schedule(${jobId}, ${
            fnUrl + "/"
          }, '1 minute')`;
          assert.equal(row.function_url, fnUrl, "trailing slash removed");
          assert.equal(row.cron_schedule, "* * * * *");
          let jobs = await cronJobs();
          assert.equal(jobs.length, 1);
          assert.equal(jobs[0].jobname, `storage_to_s3_job_${jobId}`);
          assert.equal(jobs[0].command, `select storage_to_s3.tick(${jobId})`);
          assert.equal(jobs[0].username, "postgres");
          assert.equal(jobs[0].active, true);
          command = jobs[0].command;
          const [again] =
            await sql`select * from storage_to_s3.schedule(${jobId}, ${fnUrl}, '5 minutes', p_max_seconds => 40,
                      p_run_options => ${sql.json({ concurrency: 8, multipart_concurrency: 2 })})`;
          assert.equal(again.cron_schedule, "*/5 * * * *");
          assert.deepEqual(again.run_options, { concurrency: 8, multipart_concurrency: 2 });
          const [kept] =
            await sql`select * from storage_to_s3.schedule(${jobId}, ${fnUrl}, '5 minutes', p_max_seconds => 40)`;
          assert.deepEqual(kept.run_options, again.run_options, "scheduling again keeps them");
          jobs = await cronJobs();
          assert.equal(jobs.length, 1, "rescheduling updates the job in place");
          assert.equal(jobs[0].schedule, "*/5 * * * *");
          const progress = await (await fetch(`${fnUrl}/jobs/${jobId}`, { headers })).json();
          assert.equal(progress.schedule.cron_job_name, `storage_to_s3_job_${jobId}`);
          assert.equal(progress.schedule.max_seconds, 40);
        },
      );

      await stack.step(
        t,
        "bad arguments are refused with clear errors and change nothing",
        async () => {
          const before = JSON.stringify(await cronJobs());
          const cases: [() => Promise<unknown>, RegExp][] = [
            [
              () => sql`select storage_to_s3.schedule(${jobId}, ${fnUrl}, '30 seconds')`,
              /no seconds schedules/,
            ],
            [
              () => sql`select storage_to_s3.schedule(${jobId}, ${fnUrl}, 'every tuesday')`,
              /neither/,
            ],
            [() => sql`select storage_to_s3.schedule(${jobId}, ${fnUrl}, '0 minutes')`, /1 to 59/],
            [
              () => sql`select storage_to_s3.schedule(${jobId}, 'ftp://x/y', '1 minute')`,
              /function_url/,
            ],
            [
              () =>
                sql`select storage_to_s3.schedule(${jobId}, ${
                  fnUrl + "'; drop table x; --"
                }, '1 minute')`,
              /function_url/,
            ],
            [
              () => sql`select storage_to_s3.schedule(999999, ${fnUrl}, '1 minute')`,
              /does not exist/,
            ],
            [() => sql`select storage_to_s3.schedule(${dryId}, ${fnUrl}, '1 minute')`, /dry run/],
            [
              () => sql`select storage_to_s3.schedule(${jobId}, ${fnUrl}, '1 minute', 'nope')`,
              /no secret named nope/,
            ],
            [
              () => sql`select storage_to_s3.schedule(${jobId}, ${fnUrl}, '1 minute', 'x', 1)`,
              /max_seconds/,
            ],
            ...([
              [[8], /must be a JSON object/],
              [{ nope: 1 }, /unknown option "nope"/],
              [{ concurrency: "8" }, /concurrency must be a number/],
              [{ concurrency: 100 }, /concurrency must be an integer from 1 to 64/],
              [{ max_cpu_ms: 12.5 }, /max_cpu_ms must be an integer/],
              [{ part_size_mib: 4 }, /part_size_mib must be an integer from 5/],
            ] as [unknown, RegExp][]).map(([options, message]) =>
              [
                () =>
                  sql`select storage_to_s3.schedule(${jobId}, ${fnUrl}, '1 minute', p_run_options => ${
                    sql.json(options as never)
                  })`,
                message,
              ] as [() => Promise<unknown>, RegExp]
            ),
          ];
          for (const [fn, message] of cases) {
            await assert.rejects(fn, message);
          }
          await assert.rejects(
            () => sql`select storage_to_s3.schedule(${jobId}, ${fnUrl}, '1 minute', 'nope')`,
            (e: { hint?: string }) => /vault\.create_secret/.test(e.hint ?? ""),
          );
          assert.equal(JSON.stringify(await cronJobs()), before);
        },
      );

      await stack.step(
        t,
        "schedule() checks run options with the same bounds as the function",
        async () => {
          const bounds: Record<string, [number, number]> = {
            concurrency: [1, 64],
            multipart_concurrency: [1, 16],
            max_bytes: [1024 * 1024, 1024 ** 4],
            max_cpu_ms: [50, 600_000],
            part_size_mib: [5, 5120],
            lease_seconds: [5, 3600],
            retry_delay_seconds: [0, 3600],
          };
          const sqlAccepts = async (o: Record<string, number>) => {
            try {
              await sql`select storage_to_s3.check_run_options(${sql.json(o)})`;
              return true;
            } catch {
              return false;
            }
          };
          for (const [key, [min, max]] of Object.entries(bounds)) {
            for (
              const [value, ok] of [[min, true], [max, true], [min - 1, false], [max + 1, false]]
            ) {
              const o = { [key]: value as number };
              assert.equal(RunBody.safeParse(o).success, ok, `the function on ${key}=${value}`);
              assert.equal(await sqlAccepts(o), ok, `schedule() on ${key}=${value}`);
            }
          }
          // Every option the function takes besides max_seconds (which has its own argument).
          assert.deepEqual(
            Object.keys(RunBody.shape).filter((k) => k !== "max_seconds").sort(),
            Object.keys(bounds).sort(),
          );
        },
      );

      let queued: Json = {};
      await stack.step(
        t,
        "a tick queues the POST the function expects, with the token from Vault",
        async () => {
          // Exactly what pg_cron runs.
          const [{ tick }] = await sql.unsafe(`${command} as tick`);
          assert.ok(Number(tick) > 0);
          const [req] = await sql`select * from net.http_request_queue where id = ${tick}`;
          assert.equal(req.method, "POST");
          assert.equal(req.url, `${fnUrl}/jobs/${jobId}/run`);
          assert.deepEqual(req.headers, {
            "Content-Type": "application/json",
            Authorization: `Bearer ${stack.tokens.api}`,
          });
          assert.deepEqual(JSON.parse(new TextDecoder().decode(req.body)), {
            max_seconds: 40,
            concurrency: 8,
            multipart_concurrency: 2,
          });
          assert.equal(req.timeout_milliseconds, 70_000, "the chunk's budget plus a margin");
          const [s] =
            await sql`select ticks, last_request_id from storage_to_s3.schedules where job_id = ${jobId}`;
          assert.equal(Number(s.ticks), 1);
          assert.equal(Number(s.last_request_id), Number(tick));
          queued = req;
        },
      );

      await stack.step(
        t,
        "the token is read at every tick, so rotating it needs no rescheduling",
        async () => {
          await sql`delete from vault.secrets where name = 'toolkit_api_token'`;
          await sql`select vault.create_secret('rotated-token-0123456789', 'toolkit_api_token')`;
          const [{ tick }] = await sql`select storage_to_s3.tick(${jobId}) as tick`;
          const [req] = await sql`select headers from net.http_request_queue where id = ${tick}`;
          assert.equal(req.headers.Authorization, "Bearer rotated-token-0123456789");
          await sql`delete from vault.secrets where name = 'toolkit_api_token'`;
          await sql`select vault.create_secret(${stack.tokens.api}, 'toolkit_api_token')`;
        },
      );

      await stack.step(
        t,
        "replaying the queued requests runs the job to the end; it unschedules itself",
        async () => {
          const replay = async (req: Json) => {
            const res = await fetch(req.url, {
              method: req.method,
              headers: req.headers,
              body: new TextDecoder().decode(req.body),
            });
            assert.equal(res.status, 200);
            return await res.json();
          };
          let last = await replay(queued);
          for (let i = 0; i < 10 && last.status !== "completed"; i++) {
            const [{ tick }] = await sql`select storage_to_s3.tick(${jobId}) as tick`;
            const [req] = await sql`select * from net.http_request_queue where id = ${tick}`;
            last = await replay(req);
          }
          assert.equal(last.status, "completed");
          assert.equal(last.progress.objects.copied, 30);
          assert.equal((await cronJobs()).length, 0, "the cron job is gone");
          const rows = await sql`select * from storage_to_s3.schedules where job_id = ${jobId}`;
          assert.equal(rows.length, 0);
          const [{ n: before }] = await sql`select count(*)::int as n from net.http_request_queue`;
          const [{ tick }] = await sql`select storage_to_s3.tick(${jobId}) as tick`;
          assert.equal(tick, null, "a tick of a finished job sends nothing");
          const [{ n: after }] = await sql`select count(*)::int as n from net.http_request_queue`;
          assert.equal(after, before);
          await assert.rejects(
            () => sql`select storage_to_s3.schedule(${jobId}, ${fnUrl}, '1 minute')`,
            /already completed/,
          );
        },
      );

      await stack.step(
        t,
        "without pg_cron, pg_net and Vault the migrations apply and schedule() explains",
        async () => {
          const admin = stack.primary!.sql("supabase_admin");
          await admin.unsafe("create database bare owner postgres");
          const notices: string[] = [];
          const bare = postgres(stack.primary!.url("postgres", "bare"), {
            prepare: false,
            max: 1,
            onnotice: (n) => void notices.push(String(n.message)),
          });
          try {
            for (let pass = 0; pass < 2; pass++) {
              for (const text of await storageMigrations()) await bare.unsafe(text);
            }
            assert.ok(
              notices.some((n) => /pg_cron, pg_net, Supabase Vault not available/.test(n)),
              notices.join("\n"),
            );
            const [{ id }] = await bare`
            insert into storage_to_s3.jobs (selection, buckets, s3_bucket, status)
            values ('{}', '{}', 'b', 'pending') returning id`;
            await assert.rejects(
              () =>
                bare`select storage_to_s3.schedule(${id}, 'https://x.supabase.co/functions/v1/storage-to-s3', '1 minute')`,
              /pg_cron is not installed/,
            );
            const [{ u }] = await bare`select storage_to_s3.unschedule(${id}) as u`;
            assert.equal(u, false);
          } finally {
            await bare.end();
            await admin.unsafe("drop database bare with (force)");
          }
        },
      );
      await fn.stop();
    },
  );
});
