/**
 * Failures: transient source errors are retried (in the same chunk, or later with backoff),
 * a broken download resumes from the exact byte with Range, a corrupted read never reaches S3,
 * permanent errors are listed with reasons; and when Storage, S3 or Postgres is down or rejects
 * our credentials the function answers 503 with the reason, promptly, having changed nothing.
 */
import assert from "node:assert/strict";
import type { S3Client } from "@aws-sdk/client-s3";
import { type Env, loadStorageConfig } from "../../../shared/config/mod.ts";
import { createStorageApp } from "../../../shared/storage/app.ts";
import { createS3Client } from "../../../shared/storage/s3.ts";
import { freePort, type Stack, withStack } from "../../harness/mod.ts";
import { countRequests, getObject, MiB, openUploads, PART_MIB } from "./corpus.ts";

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

function api(stack: Stack, overrides: Env = {}, s3?: S3Client) {
  const app = createStorageApp(loadStorageConfig({ ...stack.env(), ...overrides }), {
    s3,
    logSink: () => {},
  });
  const call = async (method: string, path: string, body?: unknown) => {
    const started = performance.now();
    const res = await app.request(`/storage-to-s3${path}`, {
      method,
      headers: {
        authorization: `Bearer ${stack.tokens.api}`,
        "content-type": "application/json",
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return {
      status: res.status,
      body: (await res.json()) as Json,
      ms: performance.now() - started,
    };
  };
  return {
    app,
    get: (p: string) => call("GET", p),
    post: (p: string, b: unknown = {}) => call("POST", p, b),
  };
}

const RUN = { part_size_mib: PART_MIB, concurrency: 4, retry_delay_seconds: 0 };

Deno.test("storage to S3 under faults and outages", async (t) => {
  await withStack(
    { name: "storage-faults", primary: true, migrate: true, s3: true, storage: true },
    async (stack) => {
      const st = stack.storage!;
      const admin = stack.primary!.sql("supabase_admin");
      const bucket = stack.s3!.buckets[0];
      const s3 = createS3Client(loadStorageConfig(stack.env()).s3);
      const requests = countRequests(s3);
      const ok = api(stack, {}, s3);
      await st.createBucket("flaky");
      const seeded = await st.seed([
        { bucket: "flaky", name: "f1.txt", size: 1000 },
        { bucket: "flaky", name: "f2.bin", size: 12 * MiB },
        { bucket: "flaky", name: "f3.bin", size: 2048 },
        { bucket: "flaky", name: "f4.txt", body: "file goes missing" },
        { bucket: "flaky", name: "f5.txt", body: "replaced after the snapshot" },
        { bucket: "flaky", name: "f6.bin", size: 11 * MiB + 5 },
      ]);
      const by = Object.fromEntries(seeded.map((o) => [o.name, o]));
      const state = async (jobId: number) =>
        Object.fromEntries(
          (await admin`
            select name, state, attempts, error_code, last_error from storage_to_s3.objects
            where job_id = ${jobId}`).map((r) => [r.name, r]),
        );

      let jobId = 0;
      await stack.step(
        t,
        "transient errors are retried and permanent ones listed with reasons",
        async () => {
          const created = await ok.post("/jobs", { buckets: ["flaky"] });
          assert.equal(created.status, 201, JSON.stringify(created.body));
          jobId = created.body.job_id;
          st.addFault({ name: "f1.txt", kind: "status", status: 503, times: 2 });
          st.addFault({ name: "f2.bin", kind: "cut", afterBytes: MiB + 123, times: 1 });
          st.addFault({ name: "f3.bin", kind: "corrupt", at: 10, times: 1 });
          // Until removed: the part GET that covers byte 7 MiB gets it flipped.
          const healF6 = st.addFault({ name: "f6.bin", kind: "corrupt", at: 7 * MiB });
          await Deno.remove(by["f4.txt"].path);
          await st.seed([{ bucket: "flaky", name: "f5.txt", body: "the new version" }]);

          // A long backoff, so the corrupted reads wait for a later chunk.
          const first = await ok.post(`/jobs/${jobId}/run`, { ...RUN, retry_delay_seconds: 60 });
          assert.equal(first.status, 200, JSON.stringify(first.body));
          let s = await state(jobId);
          assert.equal(s["f1.txt"].state, "copied", "503 twice, retried within the chunk");
          assert.equal(s["f2.bin"].state, "copied", "cut connection resumed within the chunk");
          assert.ok(first.body.chunk.source_resumes >= 3);
          // Each part has its own ranged GET; the one that was cut resumed from the exact byte.
          const f2 = st.requests.filter((r) => r.name === "f2.bin").map((r) => r.range ?? "");
          const part = PART_MIB * MiB;
          const resumedAt = [0, 1, 2].map((k) =>
            `bytes=${k * part + MiB + 123}-${Math.min((k + 1) * part, 12 * MiB) - 1}`
          );
          assert.ok(resumedAt.some((r) => f2.includes(r)), f2.join(" "));
          assert.equal(f2.length, 4, "three part GETs and one resumption");
          for (const name of ["f3.bin", "f6.bin"]) {
            assert.equal(s[name].state, "pending", `${name}: corrupted read, waiting for a retry`);
            assert.equal(s[name].error_code, "source_checksum_mismatch");
          }
          const waiting = first.body.progress.failures.filter((f: Json) => !f.permanent);
          assert.deepEqual(waiting.map((f: Json) => f.name).sort(), ["f3.bin", "f6.bin"]);
          for (const f of waiting) {
            const wait = (Date.parse(f.next_attempt_at) - Date.now()) / 1000;
            assert.ok(wait > 30 && wait <= 90, `backoff ${wait} s`);
          }
          assert.equal(first.body.progress.objects.retrying, 2);
          assert.deepEqual(
            requests.log.filter((r) =>
              r.key === "flaky/f3.bin" || (r.key === "flaky/f6.bin" && /Complete/.test(r.command))
            ),
            [],
            "a corrupted read is never written (f3) or completed (f6)",
          );
          assert.equal(s["f4.txt"].state, "failed");
          assert.equal(s["f4.txt"].error_code, "source_not_found");
          assert.equal(s["f5.txt"].state, "failed");
          assert.equal(s["f5.txt"].error_code, "source_changed");

          healF6();
          const early = await ok.post(`/jobs/${jobId}/run`, RUN);
          assert.equal(early.body.chunk.objects_copied, 0, "the backoff is respected");
          // Let the backoff pass (the clock, not the code, is what the test shortens).
          await admin`update storage_to_s3.objects set next_attempt_at = now() where job_id = ${jobId}
                    and next_attempt_at is not null`;
          const second = await ok.post(`/jobs/${jobId}/run`, RUN);
          assert.equal(second.status, 200);
          s = await state(jobId);
          assert.equal(s["f3.bin"].state, "copied");
          assert.equal(s["f3.bin"].attempts, 2);
          assert.equal(s["f6.bin"].state, "copied");
          const f6Parts = requests.log.filter((r) =>
            r.key === "flaky/f6.bin" && r.command === "UploadPartCommand"
          );
          assert.equal(f6Parts.length, 3 + 1, "only the corrupted part was sent again");
          assert.equal(
            requests.log.filter((r) => r.key === "flaky/f3.bin" && r.command === "PutObjectCommand")
              .length,
            1,
          );
          const progress = second.body.progress;
          assert.equal(progress.job.status, "completed_with_failures");
          assert.deepEqual(
            progress.failures.map((f: Json) => [f.name, f.error, f.permanent]),
            [["f4.txt", "source_not_found", true], ["f5.txt", "source_changed", true]],
          );
          assert.match(progress.failures[1].message, /replaced/);
          assert.deepEqual(progress.multipart_uploads, {
            open: 0,
            orphaned: 0,
            completed: 2,
            aborted: 0,
          });
          assert.deepEqual(await openUploads(stack.s3!.dataDir, bucket), []);
          for (const name of ["f1.txt", "f2.bin", "f3.bin", "f6.bin"]) {
            assert.equal((await getObject(s3, bucket, `flaky/${name}`)).sha256, by[name].sha256);
          }
          const v = await ok.post(`/jobs/${jobId}/verify`, { download: true });
          assert.equal(v.body.verify.ok, 4);
          assert.equal(v.body.verify.mismatches, 0);
        },
      );

      await stack.step(t, "retry re-queues failed objects once their cause is fixed", async () => {
        await st.seed([{ bucket: "flaky", name: "f4.txt", body: "restored" }]);
        const r = await ok.post(`/jobs/${jobId}/retry`, {});
        assert.equal(r.status, 200);
        assert.equal(r.body.requeued, 2);
        const run = await ok.post(`/jobs/${jobId}/run`, RUN);
        const s = await state(jobId);
        // f4 was re-seeded (new version): it too now differs from the snapshot.
        assert.equal(s["f4.txt"].error_code, "source_changed");
        assert.equal(run.body.progress.objects.failed, 2);
      });

      const counts = async () =>
        JSON.stringify(
          await admin`
            select (select count(*) from storage_to_s3.jobs)::int as jobs,
                   (select count(*) from storage_to_s3.uploads)::int as uploads,
                   (select jsonb_object_agg(state, n) from (select state, count(*) as n
                      from storage_to_s3.objects group by state) x) as states`,
        );
      const dead = `http://127.0.0.1:${freePort()}`;
      const pending = await ok.post("/jobs", { buckets: ["flaky"], s3_prefix: "again/" });
      assert.equal(pending.status, 201);
      const pendingId = pending.body.job_id;

      await stack.step(
        t,
        "Storage down or rejecting the key: 503 with the reason, nothing changed",
        async () => {
          const before = await counts();
          for (
            const [env, reason] of [
              [{ SUPABASE_URL: dead }, "storage_unreachable"],
              [{ SUPABASE_SERVICE_ROLE_KEY: "not-the-key" }, "storage_rejected_key"],
            ] as [Env, string][]
          ) {
            const a = api(stack, env);
            const create = await a.post("/jobs", { buckets: ["flaky"] });
            assert.equal(create.status, 503, JSON.stringify(create.body));
            assert.equal(create.body.error, "storage_unavailable");
            assert.equal(create.body.details.reason, reason);
            const run = await a.post(`/jobs/${pendingId}/run`, RUN);
            assert.equal(run.status, 503);
            assert.equal(run.body.error, "storage_unavailable");
            assert.ok(run.ms < 20_000, `answered in ${run.ms} ms`);
            await a.app.close();
          }
          assert.equal(await counts(), before);
          const plan = await api(stack, { SUPABASE_URL: dead }).post("/jobs", {
            buckets: ["flaky"],
            dry_run: true,
          });
          assert.equal(plan.status, 201, "a dry run needs only the database");
        },
      );

      await stack.step(
        t,
        "S3 down or rejecting the credentials: 503 with the reason, nothing changed",
        async () => {
          const before = await counts();
          for (
            const [env, reason] of [
              [{ S3_ENDPOINT: dead }, "s3_unreachable"],
              [{ AWS_ACCESS_KEY_ID: "NOT-A-KEY" }, "s3_rejected"],
              [{ AWS_S3_BUCKET: "no-such-bucket" }, "s3_no_such_bucket"],
            ] as [Env, string][]
          ) {
            const a = api(stack, env);
            const create = await a.post("/jobs", { buckets: ["flaky"] });
            assert.equal(create.status, 503, JSON.stringify(create.body));
            assert.equal(create.body.error, "s3_unavailable");
            assert.equal(create.body.details.reason, reason);
            // A job keeps the bucket it was created with.
            if (env.AWS_S3_BUCKET) continue;
            const run = await a.post(`/jobs/${pendingId}/run`, RUN);
            assert.equal(run.status, 503);
            assert.equal(run.body.error, "s3_unavailable");
            assert.ok(run.ms < 20_000, `answered in ${run.ms} ms`);
            await a.app.close();
          }
          assert.equal(await counts(), before);
        },
      );

      await stack.step(t, "Postgres down: 503 database_unavailable, promptly", async () => {
        const a = api(stack, {
          SUPABASE_DB_URL: `postgresql://postgres:x@127.0.0.1:${freePort()}/postgres`,
        });
        for (const [method, path] of [["GET", "/jobs"], ["POST", "/jobs"], ["GET", "/jobs/1"]]) {
          const r = method === "GET" ? await a.get(path) : await a.post(path, { dry_run: true });
          assert.equal(r.status, 503, `${method} ${path}`);
          assert.equal(r.body.error, "database_unavailable");
          assert.ok(r.ms < 15_000);
        }
        await a.app.close();
      });

      await stack.step(
        t,
        "S3 going down mid-chunk: 503, objects in flight go back to the queue",
        async () => {
          await st.createBucket("slow");
          await st.seed(
            Array.from({ length: 40 }, (_, i) => ({ bucket: "slow", name: `s${i}`, size: 4096 })),
          );
          const created = await ok.post("/jobs", { buckets: ["slow"] });
          const id = created.body.job_id;
          st.addFault({ bucket: "slow", kind: "delay", ms: 150 });
          const running = ok.post(`/jobs/${id}/run`, { ...RUN, concurrency: 2 });
          await new Promise((r) => setTimeout(r, 900));
          await stack.s3!.stop();
          const r = await running;
          assert.equal(r.status, 503, JSON.stringify(r.body));
          assert.equal(r.body.error, "s3_unavailable");
          assert.equal(r.body.details.reason, "s3_unreachable");
          const [row] = await admin`
          select count(*) filter (where state = 'copied')::int as copied,
                 count(*) filter (where state = 'failed')::int as failed,
                 count(*) filter (where lease_owner is not null)::int as leased,
                 max(attempts)::int as attempts
          from storage_to_s3.objects where job_id = ${id}`;
          assert.ok(row.copied > 0 && row.copied < 40, `copied ${row.copied} before the outage`);
          assert.equal(row.failed, 0, "an outage is not the objects' fault");
          assert.equal(row.leased, 0, "leases were released");
          st.clearFaults();
          await stack.s3!.start();
          const rest = await ok.post(`/jobs/${id}/run`, RUN);
          assert.equal(rest.status, 200, JSON.stringify(rest.body));
          assert.equal(rest.body.progress.job.status, "completed");
          assert.equal(rest.body.progress.objects.copied, 40);
        },
      );

      await ok.app.close();
      s3.destroy();
    },
  );
});
