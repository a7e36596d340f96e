/**
 * The storage-to-s3 use cases behind the routes: create a job (snapshot + plan), run one chunk,
 * verify one chunk, re-queue failures. Dependencies are explicit (sql, source, sink, clock, CPU
 * meter, hooks) so tests drive the same code the function runs.
 */
import type { Sql } from "../db/mod.ts";
import { HttpError } from "../http/errors.ts";
import type { Logger } from "../http/logger.ts";
import type { CpuMeter } from "./budget.ts";
import {
  type ChunkResult,
  copyChunk,
  type CopyHooks,
  DEFAULT_LIMITS,
  type RunLimits,
} from "./copier.ts";
import { CopyError } from "./errors.ts";
import * as jobs from "./jobs.ts";
import type { RunBody, VerifyBody } from "./schemas.ts";
import type { S3Sink } from "./sink.ts";
import type { StorageSource } from "./source.ts";
import { verifyChunk } from "./verify.ts";

const MiB = 1024 * 1024;

export interface RunnerDeps {
  sql: Sql;
  log: Logger;
  /** Storage (needed to copy, not to plan). */
  source?: () => StorageSource;
  /** The S3 destination of a job's bucket. */
  sink?: (bucket: string) => S3Sink;
  cpu: CpuMeter;
  clock?: () => number;
  hooks?: CopyHooks;
}

export function resolveLimits(body: RunBody): RunLimits {
  const maxSeconds = body.max_seconds ?? DEFAULT_LIMITS.maxSeconds;
  return {
    maxSeconds,
    maxBytes: body.max_bytes ?? DEFAULT_LIMITS.maxBytes,
    maxCpuMs: body.max_cpu_ms ?? DEFAULT_LIMITS.maxCpuMs,
    concurrency: body.concurrency ?? DEFAULT_LIMITS.concurrency,
    multipartConcurrency: body.multipart_concurrency ?? DEFAULT_LIMITS.multipartConcurrency,
    partSize: (body.part_size_mib ?? DEFAULT_LIMITS.partSize / MiB) * MiB,
    leaseSeconds: body.lease_seconds ?? Math.ceil(maxSeconds) + 120,
    retryDelaySeconds: body.retry_delay_seconds ?? DEFAULT_LIMITS.retryDelaySeconds,
    maxAttempts: DEFAULT_LIMITS.maxAttempts,
  };
}

function unavailable(err: CopyError): HttpError {
  const which = err.scope === "s3" ? "s3" : "storage";
  return new HttpError(
    503,
    `${which}_unavailable`,
    which === "s3"
      ? `The S3 destination cannot be used right now: ${err.message}`
      : `Supabase Storage cannot be used right now: ${err.message}`,
    { reason: err.code },
  );
}

/** Storage answers with our key and the S3 bucket accepts our credentials. */
export async function preflight(source: StorageSource, sink: S3Sink): Promise<void> {
  const signal = AbortSignal.timeout(15_000);
  try {
    await Promise.all([source.listBuckets(signal), sink.headBucket(signal)]);
  } catch (e) {
    if (e instanceof CopyError) throw unavailable(e);
    throw e;
  }
}

async function loadJob(sql: Sql, id: number): Promise<jobs.Job> {
  const job = await jobs.db(() => jobs.getJob(sql, id));
  if (!job) throw new HttpError(404, "job_not_found", `Job ${id} does not exist.`);
  return job;
}

export interface CreateInput {
  buckets: "all" | string[];
  prefix: string;
  dryRun: boolean;
  s3Bucket: string;
  s3Prefix: string;
}

export async function createJob(
  deps: RunnerDeps,
  input: CreateInput,
): Promise<{ job_id: number; status: string; dry_run: boolean; plan: Record<string, unknown> }> {
  const { sql } = deps;
  const clock = deps.clock ?? (() => performance.now());
  if (!input.dryRun && deps.source && deps.sink) {
    await preflight(deps.source(), deps.sink(input.s3Bucket));
  }
  let job: jobs.Job;
  try {
    job = await jobs.db(() => jobs.createJob(sql, input));
  } catch (e) {
    const code = (e as { code?: string })?.code;
    const message = e instanceof Error ? e.message : String(e);
    if (code === "22023") {
      throw new HttpError(
        400,
        message.startsWith("Unknown bucket") ? "unknown_bucket" : "invalid_input",
        `${message}.`,
      );
    }
    throw e;
  }
  // Snapshot as much as fits a request; a run continues a snapshot that did not finish.
  const t0 = clock();
  await jobs.db(() => jobs.snapshot(sql, job.id, { keepGoing: () => clock() - t0 < 20_000 }));
  const fresh = await loadJob(sql, job.id);
  return {
    job_id: job.id,
    status: fresh.status,
    dry_run: fresh.dry_run,
    plan: await jobs.db(() => jobs.plan(sql, job.id)),
  };
}

export async function runJob(
  deps: RunnerDeps,
  jobId: number,
  body: RunBody,
): Promise<Record<string, unknown>> {
  const { sql } = deps;
  const clock = deps.clock ?? (() => performance.now());
  const limits = resolveLimits(body);
  let job = await loadJob(sql, jobId);
  let snapshotAdded = 0;
  if (!job.snapshot_done) {
    const t0 = clock();
    const share = job.dry_run ? 1 : 1 / 3;
    const r = await jobs.db(() =>
      jobs.snapshot(sql, jobId, {
        keepGoing: () => clock() - t0 < limits.maxSeconds * 1000 * share,
      })
    );
    snapshotAdded = r.added;
    job = await loadJob(sql, jobId);
  } else if (job.dry_run) {
    throw new HttpError(
      409,
      "dry_run_job",
      `Job ${jobId} is a dry run: it only plans. Create a job without dry_run to copy.`,
    );
  }
  if (job.dry_run || !job.snapshot_done) {
    return {
      job_id: jobId,
      status: job.status,
      snapshot: { complete: job.snapshot_done, objects_added: snapshotAdded },
      progress: await jobs.db(() => jobs.progress(sql, jobId)),
    };
  }
  if (!deps.source || !deps.sink) {
    throw new HttpError(503, "not_configured", "Storage and S3 must be configured to copy.");
  }
  const source = deps.source();
  const sink = deps.sink(job.s3_bucket);
  await preflight(source, sink);
  const chunk: ChunkResult = await copyChunk(
    { sql, source, sink, log: deps.log, cpu: deps.cpu, clock: deps.clock, hooks: deps.hooks },
    job,
    limits,
  );
  if (chunk.unavailable) {
    const { dependency, code, message } = chunk.unavailable;
    throw new HttpError(
      503,
      `${dependency}_unavailable`,
      dependency === "database"
        ? "The database cannot be reached right now; leased objects return to the queue when their lease expires."
        : message,
      { reason: code, chunk },
    );
  }
  const progress = await jobs.db(() => jobs.progress(sql, jobId));
  return {
    job_id: jobId,
    status: (progress.job as { status: string }).status,
    chunk,
    progress,
  };
}

export async function verifyJob(
  deps: RunnerDeps,
  jobId: number,
  body: VerifyBody,
): Promise<Record<string, unknown>> {
  const { sql } = deps;
  const job = await loadJob(sql, jobId);
  if (job.dry_run) {
    throw new HttpError(409, "dry_run_job", `Job ${jobId} is a dry run: nothing was copied.`);
  }
  if (!deps.sink) throw new HttpError(503, "not_configured", "S3 must be configured to verify.");
  const sink = deps.sink(job.s3_bucket);
  const chunk = await verifyChunk({ sql, sink, log: deps.log, clock: deps.clock }, job, {
    maxSeconds: body.max_seconds ?? 60,
    concurrency: body.concurrency ?? 16,
    restart: body.restart ?? false,
    download: body.download ?? false,
  });
  if (chunk.unavailable) {
    throw new HttpError(503, "s3_unavailable", chunk.unavailable.message, {
      reason: chunk.unavailable.code,
      chunk,
    });
  }
  const progress = await jobs.db(() => jobs.progress(sql, jobId));
  const objects = progress.objects as Record<string, number>;
  const verify = progress.verify as Record<string, unknown>;
  return {
    job_id: jobId,
    complete: chunk.complete,
    all_verified: chunk.complete && verify.mismatches === 0 && objects.remaining === 0 &&
      objects.failed === 0,
    chunk,
    verify,
    not_copied: { remaining: objects.remaining, failed: objects.failed },
  };
}
