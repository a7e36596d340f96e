/** The `storage-to-s3` function: plan, run, inspect and verify Storage → S3 migration jobs. */
import type { S3Client } from "@aws-sdk/client-s3";
import { z } from "zod";
import { requireConfigured, type StorageConfig } from "../config/mod.ts";
import { mapDbError } from "../db/errors.ts";
import { lazySql, type Sql } from "../db/mod.ts";
import { FunctionApp } from "../http/app.ts";
import { HttpError } from "../http/errors.ts";
import { addInfoRoute } from "../http/info.ts";
import type { LogSink } from "../http/logger.ts";
import { type CpuMeter, threadCpuMeter } from "./budget.ts";
import type { CopyHooks } from "./copier.ts";
import * as jobs from "./jobs.ts";
import { createJob, runJob, type RunnerDeps, verifyJob } from "./runner.ts";
import { createS3Client } from "./s3.ts";
import { CreateJobBody, JobParams, ListQuery, RetryBody, RunBody, VerifyBody } from "./schemas.ts";
import { S3Sink } from "./sink.ts";
import { StorageSource } from "./source.ts";

export interface StorageDeps {
  logSink?: LogSink;
  /** Overrides the database client (tests). */
  sql?: Sql;
  /** Overrides the S3 client (tests count requests through it). */
  s3?: S3Client;
  /** Overrides fetch for Storage requests. */
  fetch?: typeof fetch;
  cpu?: CpuMeter;
  clock?: () => number;
  hooks?: CopyHooks;
}

const Any = z.record(z.string(), z.unknown());
const STORAGE_VARS = ["SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"];
const S3_VARS = ["AWS_S3_BUCKET", "S3_ENDPOINT", "S3_FORCE_PATH_STYLE", "S3_PREFIX"];

export function createStorageApp(config: StorageConfig, deps: StorageDeps = {}): FunctionApp {
  const app = new FunctionApp({
    name: "storage-to-s3",
    auth: { variable: "TOOLKIT_API_TOKEN", token: config.apiToken },
    logSink: deps.logSink,
  });
  const client = lazySql(() => config.dbUrl!, {
    applicationName: "sa-toolkit/storage-to-s3",
    max: 4,
    statementTimeoutMs: 30_000,
  });
  app.onClose(client.close);
  let s3: S3Client | undefined = deps.s3;
  app.onClose(() => {
    if (!deps.s3) s3?.destroy();
  });
  const cpu = deps.cpu ?? threadCpuMeter();

  const runnerDeps = (sql: Sql, copying: boolean): RunnerDeps => {
    if (copying) requireConfigured(config, [...STORAGE_VARS, ...S3_VARS]);
    return {
      sql,
      log: app.log,
      cpu,
      clock: deps.clock,
      hooks: deps.hooks,
      source: () =>
        new StorageSource({
          baseUrl: config.supabaseUrl!,
          key: config.serviceRoleKey!,
          fetch: deps.fetch,
        }),
      sink: (bucket: string) => new S3Sink(s3 ??= createS3Client(config.s3), bucket),
    };
  };

  /** Runs `fn` with the database, mapping database failures to the error shape. */
  const withDb = async <T>(fn: (sql: Sql) => Promise<T>): Promise<T> => {
    if (!deps.sql) requireConfigured(config, ["SUPABASE_DB_URL"]);
    try {
      return await fn(deps.sql ?? client.get());
    } catch (e) {
      if (e instanceof jobs.DatabaseUnavailable) {
        throw new HttpError(
          503,
          "database_unavailable",
          "The migration database cannot be reached right now.",
        );
      }
      mapDbError(e, "The migration database");
    }
  };

  addInfoRoute(app, config.problems);

  app.route(
    {
      method: "post",
      path: "/jobs",
      summary: "Create a job: snapshot the selected buckets into a manifest and return the plan",
      body: CreateJobBody,
      responses: {
        201: { description: "The job and its plan", schema: Any },
        400: { description: "Invalid input or unknown bucket (nothing is created)" },
        503: { description: "Storage, S3 or the database cannot be reached" },
      },
    },
    ({ body }, c) =>
      withDb(async (sql) => {
        requireConfigured(config, ["AWS_S3_BUCKET", "SUPABASE_BUCKETS", "S3_PREFIX"]);
        const dryRun = body.dry_run ?? false;
        const created = await createJob(runnerDeps(sql, !dryRun), {
          buckets: body.buckets ?? config.buckets,
          prefix: body.prefix ?? "",
          dryRun,
          s3Bucket: config.s3.bucket!,
          s3Prefix: body.s3_prefix ?? config.s3.prefix,
        });
        return c.json(created, 201);
      }),
  );

  app.route(
    {
      method: "get",
      path: "/jobs",
      summary: "Jobs, newest first",
      query: ListQuery,
      responses: { 200: { description: "Jobs", schema: Any } },
    },
    ({ query }, c) =>
      withDb(async (sql) => c.json({ jobs: await jobs.listJobs(sql, query.limit ?? 20) })),
  );

  app.route(
    {
      method: "get",
      path: "/jobs/:id",
      summary:
        "Progress: objects and bytes done and remaining, rate, ETA, failures, uploads, verification",
      params: JobParams,
      responses: {
        200: { description: "The job's progress and plan", schema: Any },
        404: { description: "No such job" },
      },
    },
    ({ params }, c) =>
      withDb(async (sql) => {
        const job = await jobs.getJob(sql, params.id);
        if (!job) throw new HttpError(404, "job_not_found", `Job ${params.id} does not exist.`);
        const [progress, plan] = await Promise.all([
          jobs.progress(sql, params.id),
          jobs.storedPlan(sql, params.id),
        ]);
        return c.json({ ...progress, plan });
      }),
  );

  app.route(
    {
      method: "post",
      path: "/jobs/:id/run",
      summary: "Copy one time-boxed chunk of the job and return its progress",
      params: JobParams,
      body: RunBody,
      responses: {
        200: { description: "What this chunk did and the job's progress", schema: Any },
        404: { description: "No such job" },
        409: { description: "A dry-run job never copies" },
        503: { description: "Storage, S3 or the database cannot be reached (with the reason)" },
      },
    },
    ({ params, body }, c) =>
      withDb(async (sql) => c.json(await runJob(runnerDeps(sql, true), params.id, body))),
  );

  app.route(
    {
      method: "post",
      path: "/jobs/:id/verify",
      summary:
        "Check the destination of every copied object (presence, size, checksum, metadata); lists mismatches",
      params: JobParams,
      body: VerifyBody,
      responses: {
        200: { description: "Verification tally and mismatches", schema: Any },
        404: { description: "No such job" },
        409: { description: "A dry-run job has nothing to verify" },
        503: { description: "S3 or the database cannot be reached" },
      },
    },
    ({ params, body }, c) =>
      withDb(async (sql) => {
        requireConfigured(config, S3_VARS);
        return c.json(await verifyJob(runnerDeps(sql, false), params.id, body));
      }),
  );

  app.route(
    {
      method: "post",
      path: "/jobs/:id/retry",
      summary: "Re-queue objects that failed or that verify found wrong, then run the job again",
      params: JobParams,
      body: RetryBody,
      responses: {
        200: { description: "How many objects were re-queued", schema: Any },
        404: { description: "No such job" },
      },
    },
    ({ params, body }, c) =>
      withDb(async (sql) => {
        const job = await jobs.getJob(sql, params.id);
        if (!job) throw new HttpError(404, "job_not_found", `Job ${params.id} does not exist.`);
        if (job.dry_run) {
          throw new HttpError(409, "dry_run_job", `Job ${params.id} is a dry run.`);
        }
        const requeued = await jobs.requeue(sql, params.id, {
          failed: body.failed ?? true,
          mismatched: body.mismatched ?? true,
        });
        return c.json({
          job_id: params.id,
          requeued,
          progress: await jobs.progress(sql, params.id),
        });
      }),
  );

  return app;
}
