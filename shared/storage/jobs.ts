/**
 * The manifest in Postgres: jobs, snapshot pages, leases and every state transition of a
 * manifest row. Writes made on behalf of a lease are fenced with `lease_owner = <worker>`, so an
 * invocation whose lease expired (and was taken over) can no longer change the row.
 * Sizes travel as float8 (exact up to 2^53 bytes); timestamps that go into S3 metadata as
 * microsecond ISO text, so they are the database's values to the digit.
 */
import type { Sql } from "../db/mod.ts";
import { isConnectionError } from "../db/errors.ts";
import type { SavedHash } from "./hashing.ts";
import { type ObjectFacts, type UserMetadataMode, userMetadataMode } from "./metadata.ts";
import { addressProblem } from "./source.ts";

/** Postgres could not be reached while a chunk was running. */
export class DatabaseUnavailable extends Error {
  constructor(cause: unknown) {
    super(`The database cannot be reached: ${cause instanceof Error ? cause.message : cause}`);
    this.name = "DatabaseUnavailable";
  }
}

/** Runs a statement; connection failures become DatabaseUnavailable. */
export async function db<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (isConnectionError(e)) throw new DatabaseUnavailable(e);
    throw e;
  }
}

export interface Job {
  id: number;
  status: string;
  dry_run: boolean;
  buckets: string[];
  prefix: string;
  s3_bucket: string;
  s3_prefix: string;
  snapshot_bucket: number;
  snapshot_after: string | null;
  snapshot_done: boolean;
  started: boolean;
}

export interface ManifestRow {
  id: number;
  bucket_id: string;
  name: string;
  object_id: string | null;
  version: string | null;
  size: number;
  source_etag: string | null;
  mimetype: string | null;
  cache_control: string | null;
  last_modified: string | null;
  created_iso: string | null;
  updated_iso: string | null;
  owner_id: string | null;
  user_metadata_text: string | null;
  dest_key: string;
  user_metadata_mode: UserMetadataMode;
  attempts: number;
  bytes_done: number;
  upload_id: string | null;
  part_size: number | null;
  resume_state: ResumeState | null;
}

export interface ResumeState {
  sha256: SavedHash;
  md5?: SavedHash;
}

export interface PartRow {
  partNumber: number;
  size: number;
  etag: string;
  md5: string;
  sha256: string;
}

const ISO = `'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'`;

export function factsOf(row: ManifestRow): ObjectFacts {
  return {
    objectId: row.object_id,
    version: row.version,
    createdAt: row.created_iso,
    updatedAt: row.updated_iso,
    lastModified: row.last_modified,
    sourceEtag: row.source_etag,
    ownerId: row.owner_id,
    userMetadataText: row.user_metadata_text,
  };
}

const JOB_COLUMNS = (sql: Sql) =>
  sql`j.id::float8 as id, j.status, j.dry_run, j.buckets, j.prefix, j.s3_bucket, j.s3_prefix,
      j.snapshot_bucket, j.snapshot_after, j.snapshot_done_at is not null as snapshot_done,
      j.started_at is not null as started`;

export async function getJob(sql: Sql, id: number): Promise<Job | undefined> {
  const rows = await sql<Job[]>`select ${
    JOB_COLUMNS(sql)
  } from storage_to_s3.jobs j where j.id = ${id}`;
  return rows[0];
}

export async function createJob(
  sql: Sql,
  input: {
    buckets: "all" | string[];
    prefix: string;
    dryRun: boolean;
    s3Bucket: string;
    s3Prefix: string;
  },
): Promise<Job> {
  const selection = { buckets: input.buckets, prefix: input.prefix };
  const [row] = await sql<{ id: number }[]>`
    select (storage_to_s3.create_job(
      ${input.buckets === "all" ? null : input.buckets}::text[], ${input.prefix}, ${input.dryRun},
      ${input.s3Bucket}, ${input.s3Prefix}, ${sql.json(selection)}
    )).id::float8 as id`;
  return (await getJob(sql, row.id))!;
}

interface SourceRow {
  bucket_id: string;
  name: string;
  object_id: string | null;
  version: string | null;
  metadata: Record<string, unknown> | null;
  user_metadata_text: string | null;
  created_iso: string | null;
  updated_iso: string | null;
  owner_id: string | null;
}

const utf8 = new TextEncoder();

/** The derived manifest row of one storage.objects row (keys, problems, metadata plan). */
export function deriveRow(job: Pick<Job, "s3_prefix">, r: SourceRow): Record<string, unknown> {
  const m = r.metadata ?? {};
  const rawSize = (m as Record<string, unknown>).size;
  const size = typeof rawSize === "number" ? rawSize : Number(rawSize);
  const destKey = `${job.s3_prefix}${r.bucket_id}/${r.name}`;
  const str = (v: unknown) => (v === undefined || v === null ? null : String(v));
  const row: Record<string, unknown> = {
    bucket_id: r.bucket_id,
    name: r.name,
    object_id: r.object_id,
    version: r.version,
    size: Number.isSafeInteger(size) && size >= 0 ? size : 0,
    source_etag: str(m.eTag),
    mimetype: str(m.mimetype),
    cache_control: str(m.cacheControl),
    last_modified: str(m.lastModified),
    source_created_at: r.created_iso,
    source_updated_at: r.updated_iso,
    owner_id: r.owner_id,
    user_metadata: r.user_metadata_text === null ? null : JSON.parse(r.user_metadata_text),
    dest_key: destKey,
    user_metadata_mode: "none",
    problem_code: null,
    problem: null,
  };
  const facts: ObjectFacts = {
    objectId: r.object_id,
    version: r.version,
    createdAt: r.created_iso,
    updatedAt: r.updated_iso,
    lastModified: str(m.lastModified),
    sourceEtag: str(m.eTag),
    ownerId: r.owner_id,
    userMetadataText: r.user_metadata_text,
  };
  row.user_metadata_mode = userMetadataMode(facts);
  const address = addressProblem(r.name);
  if (r.metadata === null || !Number.isSafeInteger(size) || size < 0) {
    row.problem_code = "source_incomplete";
    row.problem =
      "storage.objects has no usable metadata.size for this row (an upload in progress or a broken row).";
  } else if (address) {
    row.problem_code = "name_not_addressable";
    row.problem = address;
  } else if (utf8.encode(destKey).length > 1024) {
    row.problem_code = "key_too_long";
    row.problem = `The destination key is ${utf8.encode(destKey).length} bytes; S3 allows 1024.`;
  }
  return row;
}

/**
 * Snapshots pages of storage.objects into the manifest until done or `keepGoing()` says stop.
 * Each page is its own transaction (page insert + cursor move), so an interrupted snapshot
 * resumes exactly after the last stored name.
 */
export async function snapshot(
  sql: Sql,
  jobId: number,
  options: { pageSize?: number; keepGoing?: () => boolean } = {},
): Promise<{ done: boolean; added: number }> {
  const pageSize = options.pageSize ?? 5000;
  let added = 0;
  for (;;) {
    const job = await getJob(sql, jobId);
    if (!job) throw new Error(`Job ${jobId} disappeared during its snapshot.`);
    if (job.snapshot_done) return { done: true, added };
    if (options.keepGoing && !options.keepGoing()) return { done: false, added };
    const bucket = job.buckets[job.snapshot_bucket - 1];
    let rows: SourceRow[] = [];
    if (bucket !== undefined) {
      rows = await sql<SourceRow[]>`
        select p.bucket_id, p.name, p.object_id::text as object_id, p.version, p.metadata,
               p.user_metadata::text as user_metadata_text,
               to_char(p.created_at at time zone 'UTC', ${sql.unsafe(ISO)}) as created_iso,
               to_char(p.updated_at at time zone 'UTC', ${sql.unsafe(ISO)}) as updated_iso,
               p.owner_id
        from storage_to_s3.snapshot_source_page(${bucket}, ${job.prefix}, ${job.snapshot_after}, ${pageSize}) p`;
    }
    const derived = rows.map((r) => deriveRow(job, r));
    const full = rows.length === pageSize;
    const nextBucket = full ? job.snapshot_bucket : job.snapshot_bucket + 1;
    const nextAfter = full ? rows[rows.length - 1].name : null;
    const done = nextBucket > job.buckets.length;
    const [r] = await sql<{ n: number }[]>`
      select storage_to_s3.add_snapshot_rows(${jobId}, ${sql.json(derived as never)}, ${nextBucket},
                                             ${nextAfter}, ${done}) as n`;
    added += r.n;
  }
}

export async function plan(sql: Sql, jobId: number): Promise<Record<string, unknown>> {
  const [r] = await sql`select storage_to_s3.plan(${jobId}) as plan`;
  return r.plan;
}

/** The plan stored when the snapshot completed (computed now while it is still running). */
export async function storedPlan(sql: Sql, jobId: number): Promise<Record<string, unknown>> {
  const [r] = await sql`
    select coalesce(j.plan, storage_to_s3.plan(j.id)) as plan
    from storage_to_s3.jobs j where j.id = ${jobId}`;
  return r?.plan;
}

export async function progress(sql: Sql, jobId: number): Promise<Record<string, unknown>> {
  const [r] = await sql`select storage_to_s3.progress(${jobId}) as p`;
  return r.p;
}

export async function listJobs(sql: Sql, limit: number): Promise<Record<string, unknown>[]> {
  const rows = await sql`
    select j.id::float8 as id, j.status, j.dry_run, j.buckets, j.prefix, j.created_at,
           j.finished_at, j.s3_bucket, j.s3_prefix,
           (select count(*)::float8 from storage_to_s3.objects o where o.job_id = j.id) as objects,
           (select count(*)::float8 from storage_to_s3.objects o where o.job_id = j.id and o.state in ('copied', 'skipped')) as done,
           (select count(*)::float8 from storage_to_s3.objects o where o.job_id = j.id and o.state = 'failed') as failed
    from storage_to_s3.jobs j order by j.id desc limit ${limit}`;
  return [...rows];
}

export async function refreshStatus(sql: Sql, jobId: number): Promise<string> {
  const [r] = await sql`select storage_to_s3.refresh_status(${jobId}) as s`;
  return r.s;
}

export async function markStarted(sql: Sql, jobId: number): Promise<void> {
  await sql`
    update storage_to_s3.jobs
    set started_at = coalesce(started_at, now()), last_run_at = now(),
        status = case when status in ('pending', 'running') then 'running' else status end
    where id = ${jobId}`;
}

export async function startRun(
  sql: Sql,
  jobId: number,
  kind: "copy" | "verify" | "snapshot",
  worker: string,
): Promise<number> {
  const [r] = await sql`
    insert into storage_to_s3.runs (job_id, kind, worker) values (${jobId}, ${kind}, ${worker})
    returning id::float8 as id`;
  return r.id;
}

export async function endRun(
  sql: Sql,
  runId: number,
  r: {
    objectsCopied: number;
    bytesCopied: number;
    objectsFailed: number;
    objectsRetrying: number;
    cpuMs: number;
    stopReason: string;
  },
): Promise<void> {
  await sql`
    update storage_to_s3.runs
    set ended_at = now(), objects_copied = ${r.objectsCopied}, bytes_copied = ${r.bytesCopied},
        objects_failed = ${r.objectsFailed}, objects_retrying = ${r.objectsRetrying},
        cpu_ms = ${Math.round(r.cpuMs)}, stop_reason = ${r.stopReason}
    where id = ${runId}`;
}

const ROW_COLUMNS = (sql: Sql) =>
  sql`o.id::float8 as id, o.bucket_id, o.name, o.object_id::text as object_id, o.version,
      o.size::float8 as size, o.source_etag, o.mimetype, o.cache_control, o.last_modified,
      to_char(o.source_created_at at time zone 'UTC', ${sql.unsafe(ISO)}) as created_iso,
      to_char(o.source_updated_at at time zone 'UTC', ${sql.unsafe(ISO)}) as updated_iso,
      o.owner_id, o.user_metadata::text as user_metadata_text, o.dest_key, o.user_metadata_mode,
      o.attempts, o.bytes_done::float8 as bytes_done, o.upload_id, o.part_size::float8 as part_size,
      o.resume_state`;

export async function lease(
  sql: Sql,
  jobId: number,
  worker: string,
  limit: number,
  leaseSeconds: number,
): Promise<ManifestRow[]> {
  const rows = await sql<ManifestRow[]>`
    select ${ROW_COLUMNS(sql)}
    from storage_to_s3.lease(${jobId}, ${worker}, ${limit}, ${leaseSeconds}) o
    order by o.id`;
  return [...rows];
}

export async function release(
  sql: Sql,
  worker: string,
  ids: number[],
  unstarted: boolean,
): Promise<void> {
  if (ids.length === 0) return;
  await sql`select storage_to_s3.release(${worker}, ${ids}::bigint[], ${unstarted})`;
}

export interface CopiedRecord {
  id: number;
  sha256: string;
  md5: string | null;
  etag: string;
  md5Checked: boolean;
}

/** Marks rows copied (one statement for a batch); returns the ids that were still ours. */
export async function recordCopied(
  sql: Sql,
  worker: string,
  items: CopiedRecord[],
): Promise<number[]> {
  if (items.length === 0) return [];
  const rows = await sql<{ id: number }[]>`
    with done as (
      update storage_to_s3.objects o
      set state = 'copied', sha256 = v.sha256, md5 = v.md5, dest_etag = v.etag,
          source_md5_checked = v.md5_checked, copied_at = now(), bytes_done = o.size,
          resume_state = null, lease_owner = null, lease_expires_at = null,
          last_error = null, error_code = null, error_permanent = null, next_attempt_at = null,
          verified_at = null, verify_status = null, verify_problems = null
      from jsonb_to_recordset(${
    sql.json(items.map((i) => ({
      id: i.id,
      sha256: i.sha256,
      md5: i.md5,
      etag: i.etag,
      md5_checked: i.md5Checked,
    })))
  }) as v(id bigint, sha256 text, md5 text, etag text, md5_checked boolean)
      where o.id = v.id and o.lease_owner = ${worker}
      returning o.id, o.upload_id
    ), uploads as (
      update storage_to_s3.uploads u set state = 'completed', closed_at = now()
      from done where u.object_id = done.id and u.upload_id = done.upload_id and u.state = 'open'
    )
    select id::float8 as id from done`;
  return rows.map((r) => r.id);
}

export async function recordFailure(
  sql: Sql,
  worker: string,
  id: number,
  failure: { code: string; message: string; permanent: boolean; retryInSeconds: number },
): Promise<void> {
  await sql`
    update storage_to_s3.objects
    set state = case when ${failure.permanent} then 'failed' else 'pending' end,
        error_code = ${failure.code}, last_error = ${failure.message},
        error_permanent = ${failure.permanent},
        next_attempt_at = case when ${failure.permanent} then null
                               else now() + make_interval(secs => ${failure.retryInSeconds}) end,
        lease_owner = null, lease_expires_at = null
    where id = ${id} and lease_owner = ${worker}`;
}

/** Records the intent to create an upload (before the request); returns the intent's id. */
export async function recordUploadIntent(
  sql: Sql,
  worker: string,
  row: ManifestRow,
  s3Bucket: string,
): Promise<number | undefined> {
  const rows = await sql<{ id: number }[]>`
    insert into storage_to_s3.uploads (object_id, s3_bucket, dest_key, state)
    select o.id, ${s3Bucket}, o.dest_key, 'creating' from storage_to_s3.objects o
    where o.id = ${row.id} and o.lease_owner = ${worker}
    returning id::float8 as id`;
  return rows[0]?.id;
}

/** The created upload becomes the row's upload; false when the lease was lost meanwhile. */
export async function recordUploadStarted(
  sql: Sql,
  worker: string,
  rowId: number,
  intentId: number,
  uploadId: string,
  partSize: number,
  leaseSeconds: number,
): Promise<boolean> {
  const rows = await sql`
    with intent as (
      update storage_to_s3.uploads set upload_id = ${uploadId}, state = 'open'
      where id = ${intentId}
    )
    update storage_to_s3.objects
    set upload_id = ${uploadId}, part_size = ${partSize}, bytes_done = 0, resume_state = null,
        lease_expires_at = greatest(lease_expires_at, now() + make_interval(secs => ${leaseSeconds}))
    where id = ${rowId} and lease_owner = ${worker}
    returning id`;
  return rows.length === 1;
}

/** Intents of this row that never got an upload id (an invocation died mid-request). */
export async function strayIntents(sql: Sql, rowId: number): Promise<number[]> {
  const rows = await sql<{ id: number }[]>`
    select id::float8 as id from storage_to_s3.uploads
    where object_id = ${rowId} and state = 'creating'`;
  return rows.map((r) => r.id);
}

/** The upload ids among `ids` that the manifest knows (any state). */
export async function knownUploadIds(sql: Sql, ids: string[]): Promise<Set<string>> {
  if (ids.length === 0) return new Set();
  const rows = await sql<{ upload_id: string }[]>`
    select upload_id from storage_to_s3.uploads where upload_id = any(${ids}::text[])`;
  return new Set(rows.map((r) => r.upload_id));
}

export async function closeIntents(
  sql: Sql,
  ids: number[],
  state: "aborted" | "lost",
  note: string,
): Promise<void> {
  if (ids.length === 0) return;
  await sql`
    update storage_to_s3.uploads set state = ${state}, closed_at = now(), note = ${note}
    where id = any(${ids}::bigint[])`;
}

export async function loadParts(
  sql: Sql,
  rowId: number,
  uploadId: string,
): Promise<Map<number, PartRow>> {
  const rows = await sql<PartRow[]>`
    select part_number as "partNumber", size::float8 as size, etag, md5, sha256
    from storage_to_s3.parts where object_id = ${rowId} and upload_id = ${uploadId}`;
  return new Map(rows.map((r) => [r.partNumber, r]));
}

/**
 * Stores one uploaded part and, when it extends the contiguous prefix of an object copied across
 * invocations, the new offset and hash state. Renews the lease. False when the lease is gone.
 */
export async function recordPart(
  sql: Sql,
  worker: string,
  rowId: number,
  uploadId: string,
  part: PartRow,
  resume: { bytesDone: number; state: ResumeState } | undefined,
  leaseSeconds: number,
): Promise<boolean> {
  const rows = await sql`
    with owner as (
      update storage_to_s3.objects
      set lease_expires_at = greatest(lease_expires_at, now() + make_interval(secs => ${leaseSeconds})),
          bytes_done = coalesce(${resume?.bytesDone ?? null}::bigint, bytes_done),
          resume_state = case when ${resume !== undefined} then ${
    resume ? sql.json(resume.state as never) : null
  }::jsonb else resume_state end
      where id = ${rowId} and lease_owner = ${worker} and upload_id = ${uploadId}
      returning id
    )
    insert into storage_to_s3.parts (object_id, upload_id, part_number, size, etag, md5, sha256)
    select owner.id, ${uploadId}, ${part.partNumber}, ${part.size}, ${part.etag}, ${part.md5}, ${part.sha256}
    from owner
    on conflict (object_id, upload_id, part_number) do update
      set size = excluded.size, etag = excluded.etag, md5 = excluded.md5, sha256 = excluded.sha256,
          uploaded_at = now()
    returning object_id`;
  return rows.length === 1;
}

/** Keeps the upload but forgets the resume point: the next attempt re-reads from byte 0. */
export async function resetResume(sql: Sql, worker: string, rowId: number): Promise<void> {
  await sql`
    update storage_to_s3.objects set bytes_done = 0, resume_state = null
    where id = ${rowId} and lease_owner = ${worker}`;
}

/** Forgets the row's upload (after S3 lost it). */
export async function resetUpload(
  sql: Sql,
  worker: string,
  rowId: number,
  uploadId: string,
  outcome: "aborted" | "abort_failed" | "lost",
  note: string,
): Promise<void> {
  await sql`
    with u as (
      update storage_to_s3.uploads set state = ${outcome}, closed_at = now(), note = ${note}
      where upload_id = ${uploadId} and state in ('open', 'creating')
    ), p as (
      delete from storage_to_s3.parts where object_id = ${rowId} and upload_id = ${uploadId}
    )
    update storage_to_s3.objects
    set upload_id = null, part_size = null, bytes_done = 0, resume_state = null
    where id = ${rowId} and lease_owner = ${worker} and upload_id = ${uploadId}`;
}

/** Re-queues failed and/or verify-mismatched rows of a job; returns how many. */
export async function requeue(
  sql: Sql,
  jobId: number,
  which: { failed: boolean; mismatched: boolean },
): Promise<number> {
  const rows = await sql`
    update storage_to_s3.objects o
    set state = 'pending', attempts = 0, next_attempt_at = null, lease_owner = null,
        lease_expires_at = null, error_permanent = null,
        skip_reason = null, skipped_from = null,
        verified_at = null, verify_status = null, verify_problems = null
    where o.job_id = ${jobId}
      and ((${which.failed} and o.state = 'failed' and o.error_code not in ('name_not_addressable', 'key_too_long', 'source_incomplete'))
        or (${which.mismatched} and o.verify_status = 'mismatch' and o.state in ('copied', 'skipped')))
    returning o.id`;
  if (rows.length > 0) {
    await sql`update storage_to_s3.jobs set finished_at = null, verify_finished_at = null where id = ${jobId}`;
    await refreshStatus(sql, jobId);
  }
  return rows.length;
}
