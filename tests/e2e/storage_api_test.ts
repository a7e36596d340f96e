/**
 * The storage-to-s3 function over HTTP against the real stack: auth on every route, bad input
 * (which must answer 400/404 and change nothing, never 500), and a job from creation through its
 * chunks, progress (rate, ETA) and verification.
 */
import assert from "node:assert/strict";
import { withStack } from "../harness/mod.ts";
import {
  dataDirState,
  MiB,
  PART_MIB,
  serveStorageFunction,
} from "../integration/storage/corpus.ts";

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

async function json(res: Response): Promise<Json> {
  const text = await res.text();
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`not JSON (${res.status}): ${text.slice(0, 200)}`);
  }
}

Deno.test("the storage-to-s3 API: auth, validation, a job from plan to verification", async (t) => {
  await withStack(
    { name: "storage-api", primary: true, migrate: true, s3: true, storage: true },
    async (stack) => {
      const st = stack.storage!;
      const admin = stack.primary!.sql("supabase_admin");
      await st.createBucket("web");
      await st.createBucket({ id: "lake", type: "ANALYTICS" });
      await st.seed([
        { bucket: "web", name: "index.html", body: "<p>hi</p>", mimetype: "text/html" },
        { bucket: "web", name: "img/logo.png", size: 4000, mimetype: "image/png" },
        { bucket: "web", name: "video/intro.mp4", size: 12 * MiB + 9, mimetype: "video/mp4" },
        { bucket: "web", name: "docs/ü.txt", body: "ü", userMetadata: { lang: "de" } },
      ]);
      const fn = serveStorageFunction(stack.env());
      const headers = {
        authorization: `Bearer ${stack.tokens.api}`,
        "content-type": "application/json",
      };
      const post = (path: string, body: unknown = {}) =>
        fetch(`${fn.url}${path}`, {
          method: "POST",
          headers,
          body: typeof body === "string" ? body : JSON.stringify(body),
        });
      const get = (path: string) => fetch(`${fn.url}${path}`, { headers });

      await stack.step(
        t,
        "every route answers 401 without a token and with a wrong one",
        async () => {
          assert.ok(fn.app.routes.length >= 7);
          for (const r of fn.app.routes) {
            const path = r.path.replace(":id", "1");
            for (
              const h of [{}, { authorization: `Bearer ${stack.tokens.api}x` }, {
                authorization: "Basic x",
              }]
            ) {
              const res = await fetch(`${fn.url}${path}`, {
                method: r.method.toUpperCase(),
                headers: h,
              });
              assert.equal(res.status, 401, `${r.method} ${path}`);
              const body = await json(res);
              assert.equal(body.error, "unauthorized");
              assert.equal(typeof body.message, "string");
            }
          }
        },
      );

      await stack.step(
        t,
        "bad input answers 400 or 404 with the error shape and changes nothing",
        async () => {
          const counts = async () =>
            JSON.stringify(
              await admin`select
              (select count(*) from storage_to_s3.jobs)::int as jobs,
              (select count(*) from storage_to_s3.objects)::int as objects,
              (select count(*) from storage_to_s3.runs)::int as runs,
              (select count(*) from storage_to_s3.uploads)::int as uploads`,
            );
          const before = await counts();
          const s3Before = await dataDirState(stack.s3!.dataDir);
          const cases: [string, unknown, number, string][] = [
            ["/jobs", { buckets: 42 }, 400, "invalid_input"],
            ["/jobs", { buckets: [] }, 400, "invalid_input"],
            ["/jobs", { buckets: "web" }, 400, "invalid_input"],
            ["/jobs", { buckets: ["web", 3] }, 400, "invalid_input"],
            ["/jobs", { buckets: ["nope"] }, 400, "unknown_bucket"],
            ["/jobs", { buckets: ["web", "nope", "also-nope"] }, 400, "unknown_bucket"],
            ["/jobs", { buckets: ["lake"] }, 400, "unknown_bucket"],
            ["/jobs", { buckets: ["a/b"] }, 400, "invalid_input"],
            ["/jobs", { prefix: "/abs" }, 400, "invalid_input"],
            ["/jobs", { prefix: "a//b" }, 400, "invalid_input"],
            ["/jobs", { prefix: "../etc" }, 400, "invalid_input"],
            ["/jobs", { prefix: "x\u0000" }, 400, "invalid_input"],
            ["/jobs", { prefix: 7 }, 400, "invalid_input"],
            ["/jobs", { s3_prefix: "/root/" }, 400, "invalid_input"],
            ["/jobs", { s3_prefix: "../x/" }, 400, "invalid_input"],
            ["/jobs", { dry_run: "yes" }, 400, "invalid_input"],
            ["/jobs", { dryRun: true }, 400, "invalid_input"],
            ["/jobs", [], 400, "invalid_input"],
            ["/jobs", "{not json", 400, "invalid_json"],
            ["/jobs/abc/run", {}, 400, "invalid_input"],
            ["/jobs/0/run", {}, 400, "invalid_input"],
            ["/jobs/-1/run", {}, 400, "invalid_input"],
            ["/jobs/99999999999999999999/run", {}, 400, "invalid_input"],
            ["/jobs/999999/run", {}, 404, "job_not_found"],
            ["/jobs/999999/verify", {}, 404, "job_not_found"],
            ["/jobs/999999/retry", {}, 404, "job_not_found"],
            ["/jobs/1/run", { max_seconds: 0 }, 400, "invalid_input"],
            ["/jobs/1/run", { max_seconds: 1e9 }, 400, "invalid_input"],
            ["/jobs/1/run", { concurrency: 1000 }, 400, "invalid_input"],
            ["/jobs/1/run", { part_size_mib: 1 }, 400, "invalid_input"],
            ["/jobs/1/run", { max_bytes: -1 }, 400, "invalid_input"],
            ["/jobs/1/run", { max_cpu_ms: "lots" }, 400, "invalid_input"],
            ["/jobs/1/verify", { download: "yes" }, 400, "invalid_input"],
            ["/jobs/1/retry", { failed: 1 }, 400, "invalid_input"],
          ];
          for (const [path, body, status, code] of cases) {
            const res = await post(path, body);
            const b = await json(res);
            assert.equal(
              res.status,
              status,
              `${path} ${JSON.stringify(body)}: ${JSON.stringify(b)}`,
            );
            assert.equal(b.error, code, `${path} ${JSON.stringify(body)}`);
            assert.equal(typeof b.message, "string");
          }
          const unknown = await json(
            await post("/jobs", { buckets: ["web", "nope", "also-nope"] }),
          );
          assert.match(unknown.message, /also-nope, nope/);
          for (const path of ["/jobs?limit=0", "/jobs?limit=abc", "/jobs/abc", "/jobs/999999"]) {
            const res = await get(path);
            assert.ok(res.status === 400 || res.status === 404, path);
            await res.body?.cancel();
          }
          assert.equal(await counts(), before, "nothing was created or changed");
          assert.equal(
            await dataDirState(stack.s3!.dataDir),
            s3Before,
            "nothing was written to S3",
          );
        },
      );

      await stack.step(
        t,
        "a job is planned, copied chunk by chunk with progress, and verified",
        async () => {
          const created = await post("/jobs", { buckets: ["web"] });
          assert.equal(created.status, 201);
          const { job_id: id, plan, status } = await json(created);
          assert.equal(status, "pending");
          assert.equal(plan.copy.objects, 4);
          let p = await json(await get(`/jobs/${id}`));
          assert.equal(p.job.status, "pending");
          assert.equal(p.objects.remaining, 4);
          assert.equal(p.eta_seconds, null, "no rate yet, no ETA");
          assert.equal(p.plan.copy.objects, 4);

          const run = { max_bytes: 8 * MiB, part_size_mib: PART_MIB };
          const first = await json(await post(`/jobs/${id}/run`, run));
          assert.equal(first.chunk.stop_reason, "byte_budget");
          assert.ok(first.progress.objects.remaining > 0);
          assert.ok(first.progress.bytes.remaining > 0);
          assert.ok(first.progress.rate.bytes_per_second > 0);
          assert.ok(first.progress.eta_seconds > 0, "an ETA once something moved");
          assert.equal(first.progress.job.status, "running");
          for (let i = 0; i < 10 && p.job.status !== "completed"; i++) {
            const r = await post(`/jobs/${id}/run`, run);
            assert.equal(r.status, 200);
            p = (await json(r)).progress;
          }
          assert.equal(p.job.status, "completed");
          assert.deepEqual(
            [p.objects.copied, p.objects.failed, p.bytes.remaining, p.eta_seconds],
            [4, 0, 0, 0],
          );
          assert.ok(p.rate.invocations >= 2);
          const v = await json(await post(`/jobs/${id}/verify`, { download: true }));
          assert.equal(v.all_verified, true, JSON.stringify(v));
          const list = await json(await get("/jobs?limit=5"));
          const mine = list.jobs.find((j: Json) => j.id === id);
          assert.deepEqual([mine.status, mine.objects, mine.done, mine.failed], [
            "completed",
            4,
            4,
            0,
          ]);
          p = await json(await get(`/jobs/${id}`));
          assert.equal(p.verify.ok, 4);
          assert.ok(p.verify.finished_at);
        },
      );

      await stack.step(
        t,
        "the info route says the function is configured and lists its routes",
        async () => {
          const info = await json(await get("/"));
          assert.equal(info.function, "storage-to-s3");
          assert.equal(info.configured, true, JSON.stringify(info.missing));
          assert.ok(info.routes.includes("POST /storage-to-s3/jobs/:id/run"));
        },
      );

      await fn.stop();
    },
  );
});
