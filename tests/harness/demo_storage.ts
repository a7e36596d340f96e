/**
 * The Storage → S3 part of `deno task demo`: a small bucket with awkward keys, a large object
 * and user metadata is planned (dry run), copied chunk by chunk over HTTP through the real
 * storage-to-s3 function, verified by reading every object back, and re-run to show that a
 * finished job copies nothing again.
 */
import type { Stack } from "./stack.ts";

const MiB = 1024 * 1024;

export interface DemoPrinter {
  say: (s?: string) => void;
  step: (s: string) => void;
  proved: (s: string) => void;
  bold: (s: string) => string;
}

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

export async function storageDemo(stack: Stack, out: DemoPrinter): Promise<void> {
  const { say, step, proved, bold } = out;
  say(bold("\n3/3  Storage → S3: copy a bucket byte-exact, and prove it"));
  const st = stack.storage!;
  await st.createBucket("demo-assets");
  await st.seed([
    { bucket: "demo-assets", name: "index.html", body: "<h1>hello</h1>", mimetype: "text/html" },
    {
      bucket: "demo-assets",
      name: "reports/2026 Q3 (final) & notes+ü.pdf",
      size: 300_000,
      mimetype: "application/pdf",
      userMetadata: { author: "Zoë", tags: ["q3", "final"] },
    },
    { bucket: "demo-assets", name: "videos/launch.mp4", size: 12 * MiB + 7, mimetype: "video/mp4" },
    { bucket: "demo-assets", name: "empty/.emptyFolderPlaceholder", body: "" },
  ]);
  const base = stack.functions!.url("storage-to-s3");
  const headers = {
    authorization: `Bearer ${stack.tokens.api}`,
    "content-type": "application/json",
  };
  const post = async (path: string, body: unknown = {}): Promise<Json> => {
    const res = await fetch(`${base}${path}`, {
      method: "POST",
      headers,
      body: JSON.stringify(body),
    });
    const json = await res.json();
    if (res.status >= 300) throw new Error(`POST ${path}: ${res.status} ${JSON.stringify(json)}`);
    return json;
  };

  step("POST /storage-to-s3/jobs {dry_run: true} — the plan, without a single S3 request ...");
  const dry = await post("/jobs", { buckets: ["demo-assets"], dry_run: true });
  const plan = dry.plan?.copy ?? {};
  step(`plan: ${plan.objects} objects, ${plan.bytes} bytes to copy`);

  step("POST /storage-to-s3/jobs {buckets: [demo-assets]} ...");
  const job = await post("/jobs", { buckets: ["demo-assets"] });
  const id = job.job_id;
  // A small byte budget so the 12 MiB video spans several invocations, as a large object
  // does on the Edge: pg_cron (or you, with curl) calls /run until the job completes.
  let progress: Json = {};
  for (let i = 1; i <= 20 && progress.job?.status !== "completed"; i++) {
    const r = await post(`/jobs/${id}/run`, { max_bytes: 5 * MiB, part_size_mib: 5 });
    progress = r.progress;
    step(
      `chunk ${i}: stopped on ${r.chunk.stop_reason}; ${progress.objects.copied}/${progress.objects.total} objects, ${progress.bytes.remaining} bytes remaining`,
    );
  }
  if (progress.job?.status !== "completed") {
    throw new Error(`the storage job did not complete: ${JSON.stringify(progress.job)}`);
  }
  step("POST /storage-to-s3/jobs/:id/verify {download: true} — read every object back ...");
  const v = await post(`/jobs/${id}/verify`, { download: true });
  if (v.all_verified !== true) throw new Error(`verify: ${JSON.stringify(v)}`);
  proved(
    "every object is in S3 with the same SHA-256, size, Content-Type, Cache-Control and metadata",
  );
  const again = await post("/jobs", { buckets: ["demo-assets"] });
  const r = await post(`/jobs/${again.job_id}/run`, {});
  proved(
    `a second job over the same bucket: ${r.progress.objects.skipped} objects skipped as unchanged, ${r.progress.bytes.copied} bytes copied`,
  );
}
