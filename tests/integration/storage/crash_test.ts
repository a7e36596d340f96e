/**
 * Crash safety: a worker process is SIGKILLed at seeded random points of a chunk (between any two
 * named steps of the copy: leases, each source chunk read, PUTs, multipart creates, part uploads
 * and their records, completes, manifest writes), sometimes twice, and the job is then resumed.
 * After each trial: every object is present and byte-exact (SHA-256 read back), no key is missing
 * or extra (nothing duplicated), verify passes, no upload is still marked open, and every
 * multipart upload left open on the S3 server is one the manifest reports as orphaned and holds no
 * data. (A kill while CreateMultipartUpload is in flight creates an upload whose id we never
 * learn: on S3 the next attempt finds it with ListMultipartUploads and aborts it; s3rver can
 * neither list nor abort uploads, so there it stays, empty, and is reported.)
 *
 * The kill points are seeded: STORAGE_CRASH_SEED / STORAGE_CRASH_TRIALS change them (the soak
 * task `deno task test:soak:storage` runs 120 trials); a failure prints the seed and trial.
 */
import assert from "node:assert/strict";
import { loadStorageConfig } from "../../../shared/config/mod.ts";
import { createStorageApp } from "../../../shared/storage/app.ts";
import { createS3Client } from "../../../shared/storage/s3.ts";
import { REPO_ROOT, type Stack, withStack } from "../../harness/mod.ts";
import type { SeedObject } from "../../harness/storage.ts";
import { listKeys, MiB, PART_MIB } from "./corpus.ts";

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

const TRIALS = Number(Deno.env.get("STORAGE_CRASH_TRIALS") ?? 24);
const SEED = Number(Deno.env.get("STORAGE_CRASH_SEED") ?? 20261127);
const RUN = {
  max_bytes: 16 * MiB,
  part_size_mib: PART_MIB,
  concurrency: 3,
  retry_delay_seconds: 0,
};
const WORKER = new URL("./crash_worker.ts", import.meta.url).pathname;

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const corpus: SeedObject[] = [
  { bucket: "crash", name: "s/a b.txt", size: 1000 },
  { bucket: "crash", name: "s/ü 東京.txt", size: 2000, mimetype: "text/plain; charset=utf-8" },
  { bucket: "crash", name: "s/q?&:'()!+.bin", size: 30_000 },
  { bucket: "crash", name: "s/zero", size: 0 },
  { bucket: "crash", name: "s/.emptyFolderPlaceholder", size: 0 },
  { bucket: "crash", name: "s/meta.json", size: 10_000, userMetadata: { k: "v", n: { x: [1] } } },
  ...Array.from(
    { length: 6 },
    (_, i) => ({ bucket: "crash", name: `s/n${i}`, size: 7000 * i + 1 }),
  ),
  { bucket: "crash", name: "m/5MiB+1", size: 5 * MiB + 1 },
  { bucket: "crash", name: "m/16MiB+7", size: 16 * MiB + 7, userMetadata: { big: "yes" } },
];

async function runWorker(
  stack: Stack,
  jobId: number,
  killAt: number,
): Promise<{ killed: boolean; points?: number; kinds?: string[]; status?: number }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", "--config", `${REPO_ROOT}/deno.json`, WORKER],
    cwd: REPO_ROOT,
    env: { CRASH_CONFIG: JSON.stringify({ env: stack.env(), jobId, killAt, run: RUN }) },
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (out.signal === "SIGKILL") return { killed: true };
  const text = new TextDecoder().decode(out.stdout).trim();
  if (!out.success) {
    throw new Error(`worker failed (${out.code}): ${new TextDecoder().decode(out.stderr)}`);
  }
  const line = JSON.parse(text.split("\n").pop()!);
  return { killed: false, points: line.points, kinds: line.kinds, status: line.status };
}

/** Open multipart uploads in s3rver's data dir, with the key each one is for. */
async function openUploadKeys(dataDir: string, bucket: string): Promise<Map<string, string>> {
  const open = new Map<string, string>();
  const dir = `${dataDir}/${bucket}/._S3rver_uploads`;
  try {
    for await (const e of Deno.readDir(dir)) {
      open.set(e.name, await Deno.readTextFile(`${dir}/${e.name}/key`).catch(() => "?"));
    }
  } catch {
    // no upload was ever opened
  }
  return open;
}

Deno.test(`storage to S3 survives SIGKILL at ${TRIALS} seeded points (seed ${SEED})`, async (t) => {
  await withStack(
    { name: "storage-crash", primary: true, migrate: true, s3: true, storage: true },
    async (stack) => {
      const st = stack.storage!;
      const admin = stack.primary!.sql("supabase_admin");
      const bucket = stack.s3!.buckets[0];
      await st.createBucket("crash");
      const seeded = await st.seed(corpus);
      const s3 = createS3Client(loadStorageConfig(stack.env()).s3);
      const app = createStorageApp(loadStorageConfig(stack.env()), { logSink: () => {} });
      const call = async (path: string, body: unknown = {}) => {
        const res = await app.request(`/storage-to-s3${path}`, {
          method: "POST",
          headers: {
            authorization: `Bearer ${stack.tokens.api}`,
            "content-type": "application/json",
          },
          body: JSON.stringify(body),
        });
        return { status: res.status, body: (await res.json()) as Json };
      };
      const newJob = async (prefix: string) => {
        const r = await call("/jobs", { buckets: ["crash"], s3_prefix: prefix });
        assert.equal(r.status, 201, JSON.stringify(r.body));
        return r.body.job_id as number;
      };
      /** What lease expiry does after a kill, without waiting the lease out. */
      const expireLeases = (jobId: number) =>
        admin`update storage_to_s3.objects set lease_expires_at = now() - interval '1 second'
              where job_id = ${jobId} and lease_owner is not null`;

      let points = 0;
      await stack.step(
        t,
        "a worker that is not killed reports its points and finishes",
        async () => {
          const jobId = await newJob("calibrate/");
          const first = await runWorker(stack, jobId, 0);
          assert.equal(first.killed, false);
          assert.equal(first.status, 200);
          points = first.points!;
          assert.ok(points > 50, `${points} points`);
          for (
            const kind of ["source_chunk", "before_put", "after_upload_part", "before_complete"]
          ) {
            assert.ok(first.kinds!.includes(kind), `a first chunk passes ${kind}`);
          }
        },
      );

      const rand = mulberry32(SEED);
      let kills = 0;
      let orphansReported = 0;
      let leftOpenTotal = 0;
      await stack.step(
        t,
        "killed at seeded points, every job still converges to an exact copy",
        async () => {
          for (let trial = 0; trial < TRIALS; trial++) {
            const where = `seed ${SEED}, trial ${trial}`;
            const prefix = `crash/${trial}/`;
            const jobId = await newJob(prefix);
            const openBefore = await openUploadKeys(stack.s3!.dataDir, bucket);
            const rounds = trial % 2 === 1 ? 2 : 1;
            const killPoints: number[] = [];
            for (let round = 0; round < rounds; round++) {
              const killAt = 1 + Math.floor(rand() * points);
              killPoints.push(killAt);
              const r = await runWorker(stack, jobId, killAt);
              if (r.killed) kills++;
              await expireLeases(jobId);
            }
            for (let i = 0; i < 30; i++) {
              const r = await call(`/jobs/${jobId}/run`, RUN);
              assert.equal(r.status, 200, `${where}: ${JSON.stringify(r.body)}`);
              if (r.body.progress.objects.remaining === 0) break;
            }
            const v = await call(`/jobs/${jobId}/verify`, { download: true });
            assert.equal(v.status, 200, where);
            const failed = await admin`
            select name, error_code, last_error, attempts from storage_to_s3.objects
            where job_id = ${jobId} and state = 'failed'`;
            assert.equal(
              v.body.all_verified,
              true,
              `${where} (kills at ${killPoints}): ${JSON.stringify(v.body)} ${
                JSON.stringify(failed)
              }`,
            );
            assert.equal(v.body.verify.ok, corpus.length, where);
            const rows = await admin`
            select name, sha256, state from storage_to_s3.objects where job_id = ${jobId}`;
            for (const o of seeded) {
              const row = rows.find((r) => r.name === o.name);
              assert.equal(row?.sha256, o.sha256, `${where}: ${o.name}`);
            }
            assert.deepEqual(
              await listKeys(s3, bucket, prefix),
              seeded.map((o) => `${prefix}crash/${o.name}`).sort(),
              `${where}: no key missing, none extra`,
            );
            // Uploads left open on the server: only ones the manifest reports as orphaned (a kill
            // while CreateMultipartUpload was in flight; s3rver can neither list nor abort them).
            const openAfter = await openUploadKeys(stack.s3!.dataDir, bucket);
            const leftOpen = [...openAfter].filter(([id]) => !openBefore.has(id));
            const reported = await admin`
            select u.dest_key, u.state from storage_to_s3.uploads u
            join storage_to_s3.objects o on o.id = u.object_id
            where o.job_id = ${jobId} and u.state in ('lost', 'abort_failed', 'open', 'creating')`;
            assert.ok(
              reported.every((u) => u.state === "lost" || u.state === "abort_failed"),
              `${where}: no upload still marked open`,
            );
            for (const [id, key] of leftOpen) {
              assert.ok(
                reported.some((u) => u.dest_key === key),
                `${where}: upload for ${key} left open and not reported`,
              );
              // Its id was never known to us, so no part can have been sent to it: it holds no data.
              const files: string[] = [];
              for await (
                const e of Deno.readDir(`${stack.s3!.dataDir}/${bucket}/._S3rver_uploads/${id}`)
              ) {
                files.push(e.name);
              }
              assert.deepEqual(files.sort(), ["key", "metadata"], `${where}: ${key} has parts`);
            }
            orphansReported += reported.length;
            leftOpenTotal += leftOpen.length;
            const res = await app.request(`/storage-to-s3/jobs/${jobId}`, {
              headers: { authorization: `Bearer ${stack.tokens.api}` },
            });
            const progress = (await res.json()) as Json;
            assert.equal(progress.multipart_uploads.open, 0, where);
            assert.equal(progress.multipart_uploads.orphaned, reported.length, where);
          }
          console.log(
            `crash trials: ${TRIALS}, kills: ${kills}, points per first chunk: ${points}, uploads reported orphaned: ${orphansReported}, left open on s3rver: ${leftOpenTotal}`,
          );
          assert.ok(kills >= 20, `${kills} kills`);
        },
      );

      await app.close();
      s3.destroy();
    },
  );
});
