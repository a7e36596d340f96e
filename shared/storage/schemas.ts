/** Request schemas of the storage-to-s3 function (also the source of its OpenAPI document). */
import { z } from "zod";
import { s3Prefix } from "../config/mod.ts";

// deno-lint-ignore no-control-regex
const CONTROL = /[\u0000-\u001f\u007f]/;

/** A Supabase bucket id: 1-100 characters, no "/" and no control characters. */
export const BucketName = z
  .string()
  .min(1)
  .max(100)
  .refine((v) => !v.includes("/") && !CONTROL.test(v), "must not contain '/' or control characters")
  .describe("A bucket id of storage.buckets");

/**
 * An object-name prefix that selects what a job copies ("photos/2024/"). Names are compared as
 * plain strings, so "a/." matches "a/.hidden"; what is refused is what no object name can start
 * with: a leading "/", "//", a complete "." or ".." segment, control characters.
 */
export const ObjectPrefix = z
  .string()
  .max(1024)
  .refine((v) => !v.startsWith("/"), "must not start with '/'")
  .refine((v) => !v.includes("//"), "must not contain '//'")
  .refine((v) => !/(^|\/)\.\.?\//.test(v), "must not contain '.' or '..' segments")
  .refine((v) => !CONTROL.test(v), "must not contain control characters")
  .describe("Only objects whose name starts with this");

export const CreateJobBody = z
  .object({
    buckets: z
      .union([z.literal("all"), z.array(BucketName).min(1).max(1000)])
      .optional()
      .describe('"all", or bucket ids; default SUPABASE_BUCKETS'),
    prefix: ObjectPrefix.optional(),
    s3_prefix: s3Prefix
      .refine((v) => v.length <= 512, "must be at most 512 characters")
      .optional()
      .describe("Destination key prefix for this job; default S3_PREFIX"),
    dry_run: z.boolean().optional().describe("Plan only: no S3 request at all"),
  })
  .strict();
export type CreateJobBody = z.infer<typeof CreateJobBody>;

export const JobParams = z.object({
  id: z
    .string()
    .regex(/^[0-9]{1,15}$/, "must be a job id (a positive integer)")
    .transform(Number)
    .refine((n) => n > 0, "must be a job id (a positive integer)"),
});

const MiB = 1024 * 1024;

export const RunBody = z
  .object({
    max_seconds: z.number().min(1).max(300).optional()
      .describe("Wall-clock budget of this chunk (default 60)"),
    max_bytes: z.number().int().min(MiB).max(1024 * 1024 * MiB).optional()
      .describe("Bytes this chunk may copy (default 256 MiB)"),
    max_cpu_ms: z.number().int().min(50).max(600_000).optional()
      .describe("CPU budget of this chunk in ms (default 1500; the hosted limit is 2000)"),
    concurrency: z.number().int().min(1).max(64).optional()
      .describe("Objects copied at once (default 32)"),
    multipart_concurrency: z.number().int().min(1).max(16).optional()
      .describe("Of those, large objects copied part by part at once (default 4)"),
    part_size_mib: z.number().int().min(5).max(5120).optional()
      .describe("Multipart part size for uploads this chunk starts (default 8)"),
    lease_seconds: z.number().int().min(5).max(3600).optional()
      .describe("How long leased objects stay reserved (default max_seconds + 120)"),
    retry_delay_seconds: z.number().min(0).max(3600).optional()
      .describe("Base of the exponential backoff between attempts (default 30)"),
  })
  .strict();
export type RunBody = z.infer<typeof RunBody>;

export const VerifyBody = z
  .object({
    max_seconds: z.number().min(1).max(300).optional(),
    concurrency: z.number().int().min(1).max(64).optional(),
    restart: z.boolean().optional().describe("Check every object again from the start"),
    download: z.boolean().optional()
      .describe("Also download each object and compare its SHA-256 (reads everything back)"),
  })
  .strict();
export type VerifyBody = z.infer<typeof VerifyBody>;

export const RetryBody = z
  .object({
    failed: z.boolean().optional().describe("Re-queue objects that failed (default true)"),
    mismatched: z.boolean().optional()
      .describe("Re-queue objects verify found wrong at the destination (default true)"),
  })
  .strict();
export type RetryBody = z.infer<typeof RetryBody>;

export const ListQuery = z.object({
  limit: z.coerce.number().int().min(1).max(100).optional(),
});
