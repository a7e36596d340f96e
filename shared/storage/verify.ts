/**
 * Verification of a job's destination, one time-boxed chunk at a time: for every copied (or
 * skipped as unchanged) object, HeadObject must show it present with the manifest's size, an
 * ETag equal to what our hashes predict (the MD5 for a single PUT; md5-of-part-MD5s "-N" or, on
 * servers that store the whole-object MD5, that MD5 for a multipart upload), Content-Type and
 * Cache-Control as stored in Supabase, and exactly the x-amz-meta-* the copy wrote (facts, user
 * metadata, SHA-256). With `download` each object is also read back and its SHA-256 compared with
 * the one computed while reading the source. Results are stored per row, so a pass spans as many
 * calls as it needs and mismatches stay listed until fixed.
 */
import { createHash } from "node:crypto";
import type { Sql } from "../db/mod.ts";
import type { Logger } from "../http/logger.ts";
import { CopyError, errorText } from "./errors.ts";
import { multipartEtag } from "./hashing.ts";
import * as jobs from "./jobs.ts";
import { buildMetadata, systemHeader } from "./metadata.ts";
import type { S3Sink } from "./sink.ts";

export interface VerifyDeps {
  sql: Sql;
  sink: S3Sink;
  log: Logger;
  clock?: () => number;
}

export interface VerifyOptions {
  maxSeconds: number;
  concurrency: number;
  restart: boolean;
  download: boolean;
}

export interface Problem {
  check:
    | "presence"
    | "size"
    | "checksum"
    | "content_type"
    | "cache_control"
    | "metadata"
    | "content";
  expected?: unknown;
  actual?: unknown;
  message: string;
}

interface VerifyRow extends jobs.ManifestRow {
  sha256: string | null;
  md5: string | null;
  upload_id: string | null;
}

export interface VerifyChunkResult {
  complete: boolean;
  checked: number;
  ok: number;
  mismatched: number;
  elapsed_ms: number;
  unavailable?: { dependency: "s3" | "database"; code: string; message: string };
}

/** What is wrong with one destination object (empty: all good). */
export async function checkObject(
  sql: Sql,
  sink: S3Sink,
  row: VerifyRow,
  download: boolean,
): Promise<Problem[]> {
  const head = await sink.head(row.dest_key);
  if (!head) return [{ check: "presence", message: "The object is missing at the destination." }];
  const problems: Problem[] = [];
  if (head.size !== row.size) {
    problems.push({
      check: "size",
      expected: row.size,
      actual: head.size,
      message: "The size differs from storage.objects.",
    });
  }
  const expected = new Set<string>();
  if (row.md5) expected.add(row.md5);
  if (row.upload_id) {
    const parts = [...(await jobs.loadParts(sql, row.id, row.upload_id)).values()]
      .sort((a, b) => a.partNumber - b.partNumber);
    if (parts.length) expected.add(multipartEtag(parts.map((p) => p.md5)));
  }
  if (expected.size === 0) {
    if (!download) {
      problems.push({
        check: "checksum",
        actual: head.etag,
        message:
          "No MD5 is known for this object and its ETag cannot be predicted: verify with download=true.",
      });
    }
  } else if (!expected.has(head.etag)) {
    problems.push({
      check: "checksum",
      expected: [...expected],
      actual: head.etag,
      message: "The ETag does not match the checksums computed while copying.",
    });
  }
  const contentType = systemHeader(row.mimetype);
  if (contentType !== undefined && head.contentType !== contentType) {
    problems.push({
      check: "content_type",
      expected: contentType,
      actual: head.contentType ?? null,
      message: "Content-Type differs from metadata.mimetype.",
    });
  }
  const cacheControl = systemHeader(row.cache_control);
  if (cacheControl !== undefined && head.cacheControl !== cacheControl) {
    problems.push({
      check: "cache_control",
      expected: cacheControl,
      actual: head.cacheControl ?? null,
      message: "Cache-Control differs from metadata.cacheControl.",
    });
  }
  const wanted = buildMetadata(
    jobs.factsOf(row),
    row.user_metadata_mode,
    row.upload_id ? undefined : row.sha256 ?? undefined,
  );
  const actual = head.metadata;
  const keys = new Set([...Object.keys(wanted), ...Object.keys(actual)]);
  const diff: Record<string, { expected: string | null; actual: string | null }> = {};
  for (const k of keys) {
    if (wanted[k] !== actual[k]) {
      diff[k] = { expected: wanted[k] ?? null, actual: actual[k] ?? null };
    }
  }
  if (Object.keys(diff).length) {
    problems.push({
      check: "metadata",
      expected: null,
      actual: diff,
      message: "x-amz-meta-* differ from what the copy wrote.",
    });
  }
  if (download && row.sha256) {
    const body = await sink.body(row.dest_key);
    const h = createHash("sha256");
    let n = 0;
    for await (const chunk of body) {
      h.update(chunk);
      n += chunk.length;
    }
    const got = h.digest("hex");
    if (got !== row.sha256 || n !== row.size) {
      problems.push({
        check: "content",
        expected: row.sha256,
        actual: got,
        message: "The bytes at the destination do not hash to the SHA-256 of the source.",
      });
    }
  }
  return problems;
}

export async function verifyChunk(
  deps: VerifyDeps,
  job: jobs.Job,
  options: VerifyOptions,
): Promise<VerifyChunkResult> {
  const { sql, sink, log } = deps;
  const clock = deps.clock ?? (() => performance.now());
  const started = clock();
  const worker = crypto.randomUUID();
  const result: VerifyChunkResult = {
    complete: false,
    checked: 0,
    ok: 0,
    mismatched: 0,
    elapsed_ms: 0,
  };
  await jobs.db(() => sql`select storage_to_s3.begin_verify(${job.id}, ${options.restart})`);
  const leaseSeconds = Math.ceil(options.maxSeconds) + 120;
  let stopped = false;
  for (;;) {
    if (clock() - started >= options.maxSeconds * 1000) break;
    const rows = await jobs.db(() =>
      sql<VerifyRow[]>`
        select o.id::float8 as id, o.bucket_id, o.name, o.object_id::text as object_id, o.version,
               o.size::float8 as size, o.source_etag, o.mimetype, o.cache_control, o.last_modified,
               to_char(o.source_created_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') as created_iso,
               to_char(o.source_updated_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') as updated_iso,
               o.owner_id, o.user_metadata::text as user_metadata_text, o.dest_key,
               o.user_metadata_mode, o.sha256, o.md5, o.upload_id
        from storage_to_s3.lease_verify(${job.id}, ${worker}, ${
        options.concurrency * 8
      }, ${leaseSeconds}) o
        order by o.id`
    );
    if (rows.length === 0) {
      result.complete = true;
      break;
    }
    const outcomes: { id: number; problems: Problem[] }[] = [];
    let next = 0;
    const work = async () => {
      while (next < rows.length && !stopped) {
        const row = rows[next++];
        try {
          outcomes.push({
            id: row.id,
            problems: await checkObject(sql, sink, row, options.download),
          });
        } catch (e) {
          const err = e instanceof CopyError ? e : new CopyError("unexpected", errorText(e), true);
          if (err.scope === "s3") {
            stopped = true;
            result.unavailable = { dependency: "s3", code: err.code, message: err.message };
          } else {
            log.warn("verify_check_failed", { object: row.id, error: err.message });
          }
        }
      }
    };
    await Promise.all(Array.from({ length: options.concurrency }, work));
    if (outcomes.length) {
      await jobs.db(() =>
        sql`
          update storage_to_s3.objects o
          set verified_at = now(),
              verify_status = case when jsonb_array_length(v.problems) = 0 then 'ok' else 'mismatch' end,
              verify_problems = case when jsonb_array_length(v.problems) = 0 then null else v.problems end,
              lease_owner = null, lease_expires_at = null
          from jsonb_to_recordset(${sql.json(outcomes as never)}) as v(id bigint, problems jsonb)
          where o.id = v.id and o.lease_owner = ${worker}`
      );
    }
    const unchecked = rows.filter((r) => !outcomes.some((o) => o.id === r.id)).map((r) => r.id);
    if (unchecked.length) {
      await jobs.db(() =>
        sql`update storage_to_s3.objects set lease_owner = null, lease_expires_at = null
            where id = any(${unchecked}::bigint[]) and lease_owner = ${worker}`
      );
    }
    result.checked += outcomes.length;
    result.ok += outcomes.filter((o) => o.problems.length === 0).length;
    result.mismatched += outcomes.filter((o) => o.problems.length > 0).length;
    if (stopped) break;
  }
  if (result.complete) {
    await jobs.db(() =>
      sql`update storage_to_s3.jobs set verify_finished_at = now()
          where id = ${job.id} and verify_finished_at is null`
    );
  }
  result.elapsed_ms = Math.round(clock() - started);
  log.info("verify_chunk_done", { job_id: job.id, ...result });
  return result;
}
