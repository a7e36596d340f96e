/**
 * The migrator against the real stack (PostgreSQL 15 with storage.objects, the Storage stand-in,
 * s3rver): dry-run, chunked copy of the corpus, verification, byte-exactness and metadata,
 * idempotency, incremental jobs, overlapping invocations.
 */
import assert from "node:assert/strict";
import type { S3Client } from "@aws-sdk/client-s3";
import { createHash } from "node:crypto";
import { loadStorageConfig } from "../../../shared/config/mod.ts";
import { createStorageApp } from "../../../shared/storage/app.ts";
import * as jobs from "../../../shared/storage/jobs.ts";
import { decodeUserMetadata } from "../../../shared/storage/metadata.ts";
import { createS3Client } from "../../../shared/storage/s3.ts";
import { type Stack, withStack } from "../../harness/mod.ts";
import {
  CHUNK_BYTES,
  countRequests,
  dataDirState,
  getObject,
  listKeys,
  MiB,
  openUploads,
  PART_MIB,
  seedCorpus,
} from "./corpus.ts";

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

function client(stack: Stack, s3: S3Client) {
  const app = createStorageApp(loadStorageConfig(stack.env()), { s3, logSink: () => {} });
  const headers = {
    authorization: `Bearer ${stack.tokens.api}`,
    "content-type": "application/json",
  };
  const call = async (method: string, path: string, body?: unknown) => {
    const res = await app.request(`/storage-to-s3${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return { status: res.status, body: (await res.json()) as Json };
  };
  return {
    app,
    get: (path: string) => call("GET", path),
    post: (path: string, body: unknown = {}) => call("POST", path, body),
    /** Runs chunks until nothing is left; returns every chunk's result. */
    async runToEnd(jobId: number, body: Json = {}, max = 40): Promise<Json[]> {
      const chunks: Json[] = [];
      for (let i = 0; i < max; i++) {
        const r = await call("POST", `/jobs/${jobId}/run`, {
          max_bytes: CHUNK_BYTES,
          part_size_mib: PART_MIB,
          concurrency: 4,
          retry_delay_seconds: 0,
          ...body,
        });
        assert.equal(r.status, 200, JSON.stringify(r.body));
        chunks.push(r.body.chunk);
        if (r.body.progress.objects.remaining === 0) return chunks;
      }
      throw new Error(`job ${jobId} did not finish in ${max} chunks`);
    },
  };
}

Deno.test("storage to S3: plan, chunked copy, verify, idempotency, increments, overlap", async (t) => {
  await withStack(
    { name: "storage-migrate", primary: true, migrate: true, s3: true, storage: true },
    async (stack) => {
      const sql = stack.primary!.sql("postgres");
      const st = stack.storage!;
      const s3Server = stack.s3!;
      const bucket = s3Server.buckets[0];
      const corpus = await seedCorpus(st, stack.primary!.sql("supabase_admin"));
      const s3 = createS3Client(loadStorageConfig(stack.env()).s3);
      const requests = countRequests(s3);
      const api = client(stack, s3);
      const writes = () =>
        requests.log.filter((r) => /Put|Upload|Complete|Create|Abort|Delete|Copy/.test(r.command));
      const copyable = corpus.objects.filter((o) => o.bucket !== "lake");

      let firstJob = 0;
      await stack.step(t, "a dry run plans every object and sends nothing to S3", async () => {
        const before = await dataDirState(s3Server.dataDir);
        const r = await api.post("/jobs", { dry_run: true });
        assert.equal(r.status, 201, JSON.stringify(r.body));
        assert.equal(r.body.status, "planned");
        const plan = r.body.plan;
        assert.equal(plan.snapshot_complete, true);
        assert.equal(plan.objects, copyable.length + 2);
        assert.equal(plan.copy.objects, copyable.length);
        assert.equal(plan.copy.bytes, copyable.reduce((n, o) => n + o.size, 0));
        assert.deepEqual(plan.fail.reasons, { name_not_addressable: 1, source_incomplete: 1 });
        assert.equal(plan.skip.objects, 0);
        assert.equal(plan.placeholders, 2);
        assert.deepEqual(plan.user_metadata, { as_headers: 2, encoded: 2, manifest_only: 1 });
        assert.deepEqual(plan.buckets.map((b: Json) => b.bucket_id), ["docs", "media"]);
        assert.equal(plan.destination.bucket, bucket);
        assert.equal(plan.largest.name, "sizes/large.bin");
        assert.deepEqual(requests.log, [], "no S3 request at all");
        assert.equal(await dataDirState(s3Server.dataDir), before);
        const again = await api.post(`/jobs/${r.body.job_id}/run`);
        assert.equal(again.status, 409);
        assert.equal(again.body.error, "dry_run_job");
        assert.deepEqual(requests.log, []);
      });

      await stack.step(
        t,
        "a job copies the corpus in budgeted chunks; the big object spans several",
        async () => {
          const created = await api.post("/jobs", {});
          assert.equal(created.status, 201);
          firstJob = created.body.job_id;
          const chunks = await api.runToEnd(firstJob);
          assert.ok(chunks.length >= 3, `${chunks.length} chunks`);
          for (const c of chunks) {
            assert.ok(
              c.bytes_copied <= CHUNK_BYTES + PART_MIB * MiB,
              "a chunk stops near its budget",
            );
          }
          assert.ok(chunks.some((c) => c.objects_partial > 0), "an object was left part-way");
          const large = corpus.objects.find((o) => o.name === "sizes/large.bin")!;
          const ranges = st.requests.filter((r) => r.name === large.name && r.range).map((r) =>
            r.range
          );
          assert.ok(ranges.length >= 2, "later chunks resumed the big object with Range");
          for (const range of ranges) {
            const start = Number(/^bytes=(\d+)-/.exec(range!)![1]);
            assert.equal(start % (PART_MIB * MiB), 0, "resumed at a part boundary");
          }
          const p = (await api.get(`/jobs/${firstJob}`)).body;
          assert.equal(p.job.status, "completed_with_failures");
          assert.equal(p.objects.copied, copyable.length);
          assert.equal(p.objects.failed, 2);
          assert.equal(p.bytes.remaining, 0);
          assert.equal(p.eta_seconds, 0);
          assert.ok(p.rate.bytes_per_second > 0);
          assert.ok(p.rate.invocations >= 3);
          const reported = Object.fromEntries(
            p.failures.map((f: Json) => [f.name, f.error]),
          );
          assert.deepEqual(reported, corpus.reported);
          assert.ok(p.failures.every((f: Json) => f.permanent && f.message.length > 10));
          assert.deepEqual(p.multipart_uploads, { open: 0, orphaned: 0, completed: 2, aborted: 0 });
          assert.deepEqual(await openUploads(s3Server.dataDir, bucket), []);
        },
      );

      await stack.step(
        t,
        "verify finds every object present, with its size, checksum and metadata",
        async () => {
          const r = await api.post(`/jobs/${firstJob}/verify`, { download: true });
          assert.equal(r.status, 200, JSON.stringify(r.body));
          assert.equal(r.body.complete, true);
          assert.equal(r.body.verify.ok, copyable.length);
          assert.equal(r.body.verify.mismatches, 0);
          assert.equal(r.body.all_verified, false, "two rows could not be copied");
          assert.deepEqual(r.body.not_copied, { remaining: 0, failed: 2 });
        },
      );

      await stack.step(
        t,
        "every object is byte-exact with Content-Type, Cache-Control and metadata",
        async () => {
          const keys = await listKeys(s3, bucket);
          assert.deepEqual(keys, copyable.map((o) => `${o.bucket}/${o.name}`).sort());
          const rows = await sql`
          select name, bucket_id, sha256, md5, source_md5_checked, upload_id is not null as multipart,
                 user_metadata::text as um
          from storage_to_s3.objects where job_id = ${firstJob} and state = 'copied'`;
          const byName = new Map(rows.map((r) => [`${r.bucket_id}/${r.name}`, r]));
          for (const [i, o] of corpus.objects.entries()) {
            if (o.bucket === "lake") continue;
            const spec = corpus.specs[i];
            const key = `${o.bucket}/${o.name}`;
            const { out, sha256 } = await getObject(s3, bucket, key);
            assert.equal(sha256, o.sha256, `${key} bytes`);
            const row = byName.get(key)!;
            assert.equal(row.sha256, o.sha256, `${key} manifest sha256`);
            assert.equal(row.md5, o.md5, `${key} manifest md5`);
            assert.equal(row.source_md5_checked, spec.eTag === undefined, `${key} md5 cross-check`);
            if (spec.mimetype === null) {
              // No mimetype in Supabase: none is sent, the S3 server applies its default.
              assert.match(out.ContentType!, /^(application|binary)\/octet-stream$/);
            } else {
              assert.equal(out.ContentType, spec.mimetype ?? "application/octet-stream", key);
            }
            assert.equal(
              out.CacheControl,
              spec.cacheControl === undefined ? "no-cache" : spec.cacheControl ?? undefined,
              `${key} cache-control`,
            );
            const meta = out.Metadata ?? {};
            assert.equal(meta["supabase-id"], o.id);
            assert.equal(meta["supabase-version"], o.version);
            assert.equal(meta["supabase-etag"], (spec.eTag ?? o.md5).replaceAll('"', ""));
            assert.match(meta["supabase-created-at"], /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/);
            assert.equal(meta["supabase-sha256"], row.multipart ? undefined : o.sha256);
            const um = decodeUserMetadata(meta);
            if (o.name === "meta/huge.txt") assert.equal(um, "manifest");
            else if (spec.userMetadata === undefined) assert.equal(um, null);
            else assert.deepEqual(um, JSON.parse(row.um), `${key} user metadata`);
          }
          const html = await getObject(s3, bucket, "media/site/index.html");
          assert.equal(html.out.ContentType, "text/html; charset=utf-8");
          assert.equal(html.out.CacheControl, "max-age=3600");
        },
      );

      await stack.step(
        t,
        "running the finished job again copies 0 bytes and writes nothing",
        async () => {
          requests.log.length = 0;
          const r = await api.post(`/jobs/${firstJob}/run`);
          assert.equal(r.status, 200);
          assert.equal(r.body.chunk.objects_copied, 0);
          assert.equal(r.body.chunk.bytes_copied, 0);
          assert.deepEqual(writes(), []);
        },
      );

      let secondJob = 0;
      await stack.step(
        t,
        "a second job over unchanged buckets skips everything and copies 0 bytes",
        async () => {
          requests.log.length = 0;
          const before = await dataDirState(s3Server.dataDir);
          const created = await api.post("/jobs", {});
          secondJob = created.body.job_id;
          assert.equal(created.body.plan.copy.objects, 0);
          assert.equal(created.body.plan.skip.objects, copyable.length);
          assert.equal(
            created.body.plan.examples.skip[0].reason,
            `unchanged since job ${firstJob}`,
          );
          const chunks = await api.runToEnd(secondJob);
          assert.equal(chunks.reduce((n, c) => n + c.bytes_copied, 0), 0);
          assert.deepEqual(writes(), []);
          assert.equal(await dataDirState(s3Server.dataDir), before);
          const v = await api.post(`/jobs/${secondJob}/verify`);
          assert.equal(v.body.verify.ok, copyable.length, "skipped objects are verified too");
          assert.equal(v.body.verify.mismatches, 0);
        },
      );

      await stack.step(
        t,
        "after changes a new job copies only new or changed objects; deletions stay",
        async () => {
          await st.seed([
            { bucket: "docs", name: "readme.md", body: "# docs v2\n", mimetype: "text/markdown" },
            { bucket: "docs", name: "new.txt", body: "brand new" },
          ]);
          await st.remove("docs", "old.txt");
          requests.log.length = 0;
          const created = await api.post("/jobs", { buckets: ["docs"] });
          assert.equal(created.body.plan.copy.objects, 2);
          assert.equal(created.body.plan.skip.objects, 1);
          const chunks = await api.runToEnd(created.body.job_id);
          assert.equal(chunks.reduce((n, c) => n + c.objects_copied, 0), 2);
          assert.deepEqual(
            writes().map((w) => `${w.command} ${w.key}`).sort(),
            ["PutObjectCommand docs/new.txt", "PutObjectCommand docs/readme.md"],
          );
          const keys = await listKeys(s3, bucket, "docs/");
          assert.ok(keys.includes("docs/old.txt"), "a deletion in Storage is not propagated");
          const readme = await getObject(s3, bucket, "docs/readme.md");
          const v2 = new TextEncoder().encode("# docs v2\n");
          assert.equal(readme.sha256, createHash("sha256").update(v2).digest("hex"));
          assert.equal(
            readme.out.Metadata?.["supabase-etag"],
            createHash("md5").update(v2).digest("hex"),
          );
          const v = await api.post(`/jobs/${created.body.job_id}/verify`);
          assert.equal(v.body.all_verified, true);
        },
      );

      await stack.step(t, "overlapping invocations never copy the same object", async () => {
        await st.createBucket("many");
        await st.seed(
          Array.from({ length: 300 }, (_, i) => ({
            bucket: "many",
            name: `n/${String(i).padStart(4, "0")}.bin`,
            size: 1 + (i * 97) % 3000,
          })),
          { concurrency: 16 },
        );
        const created = await api.post("/jobs", { buckets: ["many"], s3_prefix: "overlap/" });
        requests.log.length = 0;
        const results = await Promise.all(
          Array.from(
            { length: 4 },
            () => api.post(`/jobs/${created.body.job_id}/run`, { concurrency: 4, max_seconds: 30 }),
          ),
        );
        for (const r of results) assert.equal(r.status, 200, JSON.stringify(r.body));
        const copied = results.reduce((n, r) => n + r.body.chunk.objects_copied, 0);
        assert.equal(copied, 300);
        assert.ok(
          results.filter((r) => r.body.chunk.objects_copied > 0).length >= 2,
          "they overlapped",
        );
        const puts = writes().filter((w) => w.command === "PutObjectCommand").map((w) => w.key!);
        assert.equal(puts.length, 300);
        assert.equal(new Set(puts).size, 300, "each key written exactly once");
        const p = (await api.get(`/jobs/${created.body.job_id}`)).body;
        assert.equal(p.job.status, "completed");
        assert.equal(p.objects.copied, 300);
      });

      await stack.step(
        t,
        "multipart objects run at most multipart_concurrency at a time while small ones go on",
        async () => {
          await st.createBucket("mixed");
          await st.seed([
            ...Array.from({ length: 3 }, (_, i) => ({
              bucket: "mixed",
              name: `big/${i}.bin`,
              size: 3 * PART_MIB * MiB + 1000 * i,
            })),
            ...Array.from({ length: 60 }, (_, i) => ({
              bucket: "mixed",
              name: `small/${String(i).padStart(3, "0")}.bin`,
              size: 500 + i * 37,
            })),
          ], { concurrency: 8 });
          const created = await api.post("/jobs", { buckets: ["mixed"], s3_prefix: "mixed/" });
          requests.log.length = 0;
          const r = await api.post(`/jobs/${created.body.job_id}/run`, {
            part_size_mib: PART_MIB,
            concurrency: 6,
            multipart_concurrency: 1,
            max_seconds: 60,
            max_bytes: 1024 * MiB,
            max_cpu_ms: 600_000,
          });
          assert.equal(r.status, 200, JSON.stringify(r.body));
          assert.equal(r.body.progress.objects.remaining, 0);
          assert.equal(r.body.chunk.objects_copied, 63);
          // In the order S3 saw them: never two uploads open at once, and small PUTs in between.
          let open: string | undefined;
          let putsWhileOpen = 0;
          for (const w of writes()) {
            if (w.command === "CreateMultipartUploadCommand") {
              assert.equal(open, undefined, `${w.key} opened while ${open} was still open`);
              open = w.key;
            } else if (w.command === "CompleteMultipartUploadCommand") {
              assert.equal(w.key, open);
              open = undefined;
            } else if (w.command === "PutObjectCommand" && open) {
              putsWhileOpen++;
            }
          }
          assert.equal(open, undefined);
          assert.equal(
            writes().filter((w) => w.command === "CompleteMultipartUploadCommand").length,
            3,
          );
          assert.ok(putsWhileOpen > 0, "small objects were copied while a large one was");
          const v = await api.post(`/jobs/${created.body.job_id}/verify`);
          assert.equal(v.body.all_verified, true, JSON.stringify(v.body));
        },
      );

      await stack.step(
        t,
        "a stored hash state that cannot be restored restarts the read from byte 0, not a failure",
        async () => {
          await st.createBucket("unrestorable");
          const [big] = await st.seed([
            { bucket: "unrestorable", name: "big.bin", size: 3 * PART_MIB * MiB + 7 },
          ]);
          const created = await api.post("/jobs", {
            buckets: ["unrestorable"],
            s3_prefix: "unrestorable/",
          });
          const id = created.body.job_id;
          const first = await api.post(`/jobs/${id}/run`, {
            max_bytes: PART_MIB * MiB,
            part_size_mib: PART_MIB,
            retry_delay_seconds: 0,
          });
          assert.equal(first.status, 200, JSON.stringify(first.body));
          const [mid] =
            await sql`select bytes_done::float8 as done, resume_state from storage_to_s3.objects
                                  where job_id = ${id}`;
          assert.ok(mid.done > 0 && mid.resume_state, "the first chunk stopped part-way");
          // Same engine tag, unusable bytes: as if hash-wasm changed its layout under one version.
          await sql`update storage_to_s3.objects
                    set resume_state = jsonb_set(resume_state, '{sha256,state}', '"AAAA"')
                    where job_id = ${id}`;
          const chunks = await api.runToEnd(id);
          assert.equal(chunks.reduce((n, c) => n + c.objects_failed, 0), 0);
          const [row] = await sql`select state, sha256, attempts from storage_to_s3.objects
                                  where job_id = ${id}`;
          assert.equal(row.state, "copied");
          assert.equal(row.sha256, big.sha256, "the whole-object SHA-256 of the bytes");
          const { sha256 } = await getObject(s3, bucket, "unrestorable/unrestorable/big.bin");
          assert.equal(sha256, big.sha256);
        },
      );

      await stack.step(
        t,
        "a dead invocation's leases block its objects until they expire; its late writes are fenced",
        async () => {
          await st.createBucket("leased");
          await st.seed(
            Array.from({ length: 20 }, (_, i) => ({ bucket: "leased", name: `l${i}`, size: 100 })),
          );
          const created = await api.post("/jobs", { buckets: ["leased"] });
          const id = created.body.job_id;
          // An invocation that leased 10 objects for 4 s and died.
          const dead = crypto.randomUUID();
          const held = await jobs.lease(sql, id, dead, 10, 4);
          const expires = Date.now() + 4000;
          assert.equal(held.length, 10);
          const first = await api.post(`/jobs/${id}/run`, { concurrency: 4 });
          assert.ok(Date.now() < expires, "the first run ended while the leases were valid");
          assert.equal(
            first.body.chunk.objects_copied,
            10,
            "the 10 leased objects were left alone",
          );
          assert.equal(first.body.progress.objects.in_flight, 10);
          await new Promise((r) => setTimeout(r, expires - Date.now() + 200));
          const second = await api.post(`/jobs/${id}/run`, { concurrency: 4 });
          assert.equal(second.body.chunk.objects_copied, 10, "taken over once the lease expired");
          assert.equal(second.body.progress.job.status, "completed");
          const late = await jobs.recordCopied(sql, dead, [{
            id: held[0].id,
            sha256: "0".repeat(64),
            md5: null,
            etag: "x",
            md5Checked: false,
          }]);
          assert.deepEqual(late, [], "the dead worker can no longer write the row");
          const [row] = await sql`select sha256 from storage_to_s3.objects where id = ${
            held[0].id
          }`;
          assert.notEqual(row.sha256, "0".repeat(64));
        },
      );

      await api.app.close();
      s3.destroy();
    },
  );
});
