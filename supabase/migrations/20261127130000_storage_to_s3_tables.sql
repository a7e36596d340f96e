-- Storage to S3: jobs, the manifest and multipart state.
--
-- The tool this replaces staged whole buckets on local disk, wrote keys under the wrong prefix,
-- lost Content-Type, Cache-Control and user metadata, and "verified" by counting objects. Here:
--   * a job is a snapshot of storage.objects rows (one manifest row per object, with the size,
--     eTag, mimetype, cacheControl and user metadata read from the row, never guessed);
--   * each manifest row is a small state machine (pending -> copying -> copied | failed), leased
--     by one invocation at a time (lease_owner + lease_expires_at, taken with SKIP LOCKED);
--   * a multipart upload's id, every part's number, ETag, MD5 and SHA-256, and (for objects that
--     span invocations) the hash state at the last committed part are stored, so the next
--     invocation continues the same upload and the same whole-object checksums;
--   * every upload id we ever opened is recorded, so an orphan can be aborted or reported even on
--     servers that cannot list uploads;
--   * runs record each invocation (bytes, objects, CPU, why it stopped) for rate and ETA.
-- Nothing here is reachable by anon/authenticated: the schema's usage is revoked.

create schema if not exists storage_to_s3;
revoke all on schema storage_to_s3 from public, anon, authenticated;

create table if not exists storage_to_s3.jobs (
  id bigint generated always as identity primary key,
  created_at timestamptz not null default now(),
  -- What was asked for (buckets "all" or names, prefix) and what it resolved to.
  selection jsonb not null,
  buckets text[] not null,
  prefix text not null default '',
  dry_run boolean not null default false,
  -- The destination is fixed when the job is created, so a configuration change never splits a job.
  s3_bucket text not null,
  s3_prefix text not null default '',
  status text not null default 'snapshotting'
    check (status in ('snapshotting', 'planned', 'pending', 'running', 'completed', 'completed_with_failures')),
  -- Keyset cursor of the snapshot: index into buckets, then the last name (compared COLLATE "C").
  snapshot_bucket int not null default 1,
  snapshot_after text,
  snapshot_done_at timestamptz,
  plan jsonb,
  started_at timestamptz,
  last_run_at timestamptz,
  finished_at timestamptz,
  verify_started_at timestamptz,
  verify_finished_at timestamptz
);

create table if not exists storage_to_s3.objects (
  id bigint generated always as identity primary key,
  job_id bigint not null references storage_to_s3.jobs (id) on delete cascade,
  -- Facts copied from storage.objects / its metadata jsonb at snapshot time.
  bucket_id text not null,
  name text not null,
  object_id uuid,
  version text,
  size bigint not null,
  source_etag text,
  mimetype text,
  cache_control text,
  last_modified text,
  source_created_at timestamptz,
  source_updated_at timestamptz,
  owner_id text,
  user_metadata jsonb,
  dest_key text not null,
  -- How the user metadata travels: 'none', 'headers' (plain ASCII pairs as x-amz-meta-*),
  -- 'encoded' (base64url JSON in x-amz-meta-supabase-user-metadata) or 'manifest' (too large for
  -- S3's 2 KB of metadata: kept here only, flagged in S3 by x-amz-meta-supabase-user-metadata=manifest).
  user_metadata_mode text not null default 'none'
    check (user_metadata_mode in ('none', 'headers', 'encoded', 'manifest')),
  state text not null default 'pending'
    check (state in ('pending', 'copying', 'copied', 'skipped', 'failed')),
  skip_reason text,
  skipped_from bigint,
  attempts int not null default 0,
  next_attempt_at timestamptz,
  last_error text,
  error_code text,
  error_permanent boolean,
  lease_owner uuid,
  lease_expires_at timestamptz,
  -- Multipart progress: bytes committed, the open upload, and the resumable hash state at that offset.
  bytes_done bigint not null default 0,
  upload_id text,
  part_size bigint,
  resume_state jsonb,
  restarts int not null default 0,
  -- Results: checksums computed while streaming, the destination's ETag.
  sha256 text,
  md5 text,
  source_md5_checked boolean,
  dest_etag text,
  copied_at timestamptz,
  -- Verification of this row's destination object.
  verified_at timestamptz,
  verify_status text check (verify_status in ('ok', 'mismatch')),
  verify_problems jsonb,
  unique (job_id, bucket_id, name)
);

-- Leasing scans a job's unfinished rows in id order.
create index if not exists objects_open_idx
  on storage_to_s3.objects (job_id, id) where state in ('pending', 'copying');
-- "Copied before?" lookups when a later job snapshots the same names.
create index if not exists objects_bucket_name_idx on storage_to_s3.objects (bucket_id, name);
create index if not exists objects_job_state_idx on storage_to_s3.objects (job_id, state);

create table if not exists storage_to_s3.parts (
  object_id bigint not null references storage_to_s3.objects (id) on delete cascade,
  upload_id text not null,
  part_number int not null check (part_number between 1 and 10000),
  size bigint not null,
  etag text not null,
  md5 text not null,
  sha256 text not null,
  uploaded_at timestamptz not null default now(),
  primary key (object_id, upload_id, part_number)
);

-- Every multipart upload we start. The row is written *before* CreateMultipartUpload ('creating'),
-- so an invocation killed while the request is in flight leaves a trace: the next attempt lists
-- the key's uploads and aborts the stray one where the server can list them, and reports it
-- ('lost') where it cannot.
create table if not exists storage_to_s3.uploads (
  id bigint generated always as identity primary key,
  upload_id text unique,
  object_id bigint references storage_to_s3.objects (id) on delete set null,
  s3_bucket text not null,
  dest_key text not null,
  state text not null default 'creating'
    check (state in ('creating', 'open', 'completed', 'aborted', 'abort_failed', 'lost')),
  created_at timestamptz not null default now(),
  closed_at timestamptz,
  note text
);
create index if not exists uploads_object_idx on storage_to_s3.uploads (object_id);

create table if not exists storage_to_s3.runs (
  id bigint generated always as identity primary key,
  job_id bigint not null references storage_to_s3.jobs (id) on delete cascade,
  kind text not null check (kind in ('copy', 'verify', 'snapshot')),
  worker uuid not null,
  started_at timestamptz not null default now(),
  ended_at timestamptz,
  objects_copied int not null default 0,
  bytes_copied bigint not null default 0,
  objects_failed int not null default 0,
  objects_retrying int not null default 0,
  cpu_ms int,
  stop_reason text
);
create index if not exists runs_job_idx on storage_to_s3.runs (job_id, started_at);

revoke all on all tables in schema storage_to_s3 from public, anon, authenticated;
