-- Storage to S3: creating a job and snapshotting storage.objects into its manifest.
--
--   * create_job() resolves the bucket selection against storage.buckets (only STANDARD buckets:
--     analytics and vector buckets hold no objects to copy) and refuses unknown names, so bad input
--     changes nothing;
--   * snapshot_source_page() is the keyset read: one bucket at a time, names compared COLLATE "C",
--     which is exactly the storage-api's index idx_objects_bucket_id_name (bucket_id, name COLLATE "C");
--   * add_snapshot_rows() stores a page (the caller derives keys and the metadata plan), marks rows
--     an earlier job already copied unchanged to the same destination as skipped, and moves the
--     cursor in the same transaction, so an interrupted snapshot resumes where it stopped;
--   * deletions in Storage are never propagated: a job only ever writes keys it snapshotted.

create or replace function storage_to_s3.create_job(
  p_buckets text[],
  p_prefix text,
  p_dry_run boolean,
  p_s3_bucket text,
  p_s3_prefix text,
  p_selection jsonb default null
)
returns storage_to_s3.jobs
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_buckets text[];
  v_unknown text[];
  v_job storage_to_s3.jobs;
begin
  if p_s3_bucket is null or length(p_s3_bucket) = 0 then
    raise exception 'A destination S3 bucket is required (AWS_S3_BUCKET)' using errcode = 'invalid_parameter_value';
  end if;
  if coalesce(p_prefix, '') ~ '^/' or coalesce(p_prefix, '') ~ '//' or coalesce(p_prefix, '') ~ '(^|/)\.\.?/'
     or coalesce(p_prefix, '') ~ '[\x01-\x1f\x7f]' then
    raise exception 'The prefix must not start with "/" or contain "//", "." or ".." segments or control characters'
      using errcode = 'invalid_parameter_value';
  end if;
  if coalesce(p_s3_prefix, '') <> '' and (p_s3_prefix !~ '^[^/].*/$' or p_s3_prefix ~ '//' or p_s3_prefix ~ '(^|/)\.\.(/|$)') then
    raise exception 'The S3 prefix must be empty or look like "path/to/"' using errcode = 'invalid_parameter_value';
  end if;
  if p_buckets is null then
    select coalesce(array_agg(b.id order by b.id collate "C"), '{}') into v_buckets
    from storage.buckets b
    where coalesce(to_jsonb(b) ->> 'type', 'STANDARD') = 'STANDARD';
  else
    if cardinality(p_buckets) = 0 then
      raise exception 'Name at least one bucket, or select all buckets' using errcode = 'invalid_parameter_value';
    end if;
    select coalesce(array_agg(x order by x collate "C"), '{}') into v_unknown
    from (select distinct unnest(p_buckets) as x) wanted
    where not exists (
      select from storage.buckets b
      where b.id = wanted.x and coalesce(to_jsonb(b) ->> 'type', 'STANDARD') = 'STANDARD'
    );
    if cardinality(v_unknown) > 0 then
      raise exception 'Unknown bucket(s): %', array_to_string(v_unknown, ', ')
        using errcode = 'invalid_parameter_value', detail = 'Only existing STANDARD buckets of storage.buckets can be migrated.';
    end if;
    select array_agg(x order by x collate "C") into v_buckets from (select distinct unnest(p_buckets) as x) wanted;
  end if;
  insert into storage_to_s3.jobs (selection, buckets, prefix, dry_run, s3_bucket, s3_prefix)
  values (
    coalesce(p_selection, jsonb_build_object('buckets', coalesce(to_jsonb(p_buckets), '"all"'::jsonb), 'prefix', coalesce(p_prefix, ''))),
    v_buckets, coalesce(p_prefix, ''), coalesce(p_dry_run, false), p_s3_bucket, coalesce(p_s3_prefix, '')
  )
  returning * into v_job;
  return v_job;
end;
$$;

-- One keyset page of a bucket's objects after p_after (exclusive), names in byte order.
create or replace function storage_to_s3.snapshot_source_page(
  p_bucket text,
  p_prefix text,
  p_after text,
  p_limit int
)
returns table (
  bucket_id text,
  name text,
  object_id uuid,
  version text,
  metadata jsonb,
  user_metadata jsonb,
  created_at timestamptz,
  updated_at timestamptz,
  owner_id text
)
language plpgsql
stable
security invoker
set search_path = ''
as $$
begin
  -- user_metadata and owner_id arrived in later storage-api migrations; read them through to_jsonb
  -- so older storage schemas work too.
  return query
    select o.bucket_id, o.name, o.id, o.version, o.metadata,
           to_jsonb(o) -> 'user_metadata',
           o.created_at, o.updated_at,
           coalesce(to_jsonb(o) ->> 'owner_id', o.owner::text)
    from storage.objects o
    where o.bucket_id = p_bucket
      and (p_after is null or (o.name collate "C") > (p_after collate "C"))
      and (coalesce(p_prefix, '') = '' or ((o.name collate "C") >= (p_prefix collate "C") and starts_with(o.name, p_prefix)))
    order by (o.name collate "C")
    limit p_limit;
end;
$$;

-- Stores one page of derived manifest rows and moves the cursor; returns the rows added.
-- p_rows: [{bucket_id, name, object_id, version, size, source_etag, mimetype, cache_control,
--           last_modified, source_created_at, source_updated_at, owner_id, user_metadata, dest_key,
--           user_metadata_mode, problem_code, problem}]
create or replace function storage_to_s3.add_snapshot_rows(
  p_job_id bigint,
  p_rows jsonb,
  p_next_bucket int,
  p_next_after text,
  p_done boolean
)
returns int
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_job storage_to_s3.jobs;
  v_count int;
begin
  select * into v_job from storage_to_s3.jobs j where j.id = p_job_id for update;
  if not found then
    raise exception 'Job % does not exist', p_job_id using errcode = 'no_data_found';
  end if;
  if v_job.snapshot_done_at is not null then
    return 0;
  end if;
  insert into storage_to_s3.objects as o (
    job_id, bucket_id, name, object_id, version, size, source_etag, mimetype, cache_control,
    last_modified, source_created_at, source_updated_at, owner_id, user_metadata, dest_key,
    user_metadata_mode, state, skip_reason, skipped_from, sha256, md5, source_md5_checked, dest_etag,
    upload_id, error_code, last_error, error_permanent)
  select p_job_id, r.bucket_id, r.name, r.object_id, r.version, r.size, r.source_etag, r.mimetype,
         r.cache_control, r.last_modified, r.source_created_at, r.source_updated_at, r.owner_id,
         r.user_metadata, r.dest_key, r.user_metadata_mode,
         case when r.problem_code is not null then 'failed'
              when prev.id is not null then 'skipped'
              else 'pending' end,
         case when r.problem_code is null and prev.id is not null then format('unchanged since job %s', prev.job_id) end,
         case when r.problem_code is null then prev.id end,
         case when r.problem_code is null then prev.sha256 end,
         case when r.problem_code is null then prev.md5 end,
         case when r.problem_code is null then prev.source_md5_checked end,
         case when r.problem_code is null then prev.dest_etag end,
         case when r.problem_code is null then prev.upload_id end,
         r.problem_code, r.problem,
         case when r.problem_code is not null then true end
  from jsonb_to_recordset(p_rows) as r(
    bucket_id text, name text, object_id uuid, version text, size bigint, source_etag text,
    mimetype text, cache_control text, last_modified text, source_created_at timestamptz,
    source_updated_at timestamptz, owner_id text, user_metadata jsonb, dest_key text,
    user_metadata_mode text, problem_code text, problem text)
  left join lateral (
    -- The newest earlier copy of the very same object version, with the same facts, to the same key.
    select p.id, p.job_id, p.sha256, p.md5, p.source_md5_checked, p.dest_etag, p.upload_id
    from storage_to_s3.objects p
    join storage_to_s3.jobs pj on pj.id = p.job_id
    where p.bucket_id = r.bucket_id and p.name = r.name
      and p.job_id <> p_job_id and not pj.dry_run
      and pj.s3_bucket = v_job.s3_bucket and p.dest_key = r.dest_key
      and p.state in ('copied', 'skipped') and p.sha256 is not null
      and p.verify_status is distinct from 'mismatch'
      and p.object_id is not distinct from r.object_id
      and p.version is not distinct from r.version
      and p.size = r.size
      and p.source_etag is not distinct from r.source_etag
      and p.mimetype is not distinct from r.mimetype
      and p.cache_control is not distinct from r.cache_control
      and p.user_metadata is not distinct from r.user_metadata
      and p.source_updated_at is not distinct from r.source_updated_at
      and p.source_created_at is not distinct from r.source_created_at
      and p.last_modified is not distinct from r.last_modified
      and p.owner_id is not distinct from r.owner_id
      and p.user_metadata_mode = r.user_metadata_mode
    order by p.job_id desc
    limit 1
  ) prev on true
  on conflict (job_id, bucket_id, name) do nothing;
  get diagnostics v_count = row_count;
  update storage_to_s3.jobs j
  set snapshot_bucket = p_next_bucket,
      snapshot_after = p_next_after,
      snapshot_done_at = case when p_done then now() end,
      status = case when not p_done then 'snapshotting'
                    when j.dry_run then 'planned'
                    else 'pending' end
  where j.id = p_job_id;
  if p_done then
    update storage_to_s3.jobs j set plan = storage_to_s3.plan(p_job_id) where j.id = p_job_id;
    perform storage_to_s3.refresh_status(p_job_id);
  end if;
  return v_count;
end;
$$;

-- The plan: what the job will copy, skip and fail, per bucket, from its manifest.
create or replace function storage_to_s3.plan(p_job_id bigint)
returns jsonb
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
  v_job storage_to_s3.jobs;
  v_plan jsonb;
begin
  select * into v_job from storage_to_s3.jobs j where j.id = p_job_id;
  if not found then
    raise exception 'Job % does not exist', p_job_id using errcode = 'no_data_found';
  end if;
  with rows as (
    select o.*,
           case when o.state = 'skipped' then 'skip'
                when o.state = 'failed' and o.attempts = 0 then 'fail'
                else 'copy' end as action
    from storage_to_s3.objects o where o.job_id = p_job_id
  ),
  per_bucket as (
    select b.bucket_id,
           count(r.id) as objects,
           coalesce(sum(r.size), 0) as bytes,
           count(r.id) filter (where r.action = 'copy') as copy_objects,
           coalesce(sum(r.size) filter (where r.action = 'copy'), 0) as copy_bytes,
           count(r.id) filter (where r.action = 'skip') as skip_objects,
           coalesce(sum(r.size) filter (where r.action = 'skip'), 0) as skip_bytes,
           count(r.id) filter (where r.action = 'fail') as fail_objects,
           count(r.id) filter (where r.name = '.emptyFolderPlaceholder' or r.name like '%/.emptyFolderPlaceholder') as placeholders
    from unnest(v_job.buckets) as b(bucket_id)
    left join rows r on r.bucket_id = b.bucket_id
    group by b.bucket_id
  )
  select jsonb_build_object(
    'snapshot_complete', v_job.snapshot_done_at is not null,
    'snapshot_at', v_job.created_at,
    'objects', (select count(*) from rows),
    'bytes', (select coalesce(sum(size), 0) from rows),
    'copy', jsonb_build_object('objects', (select count(*) from rows where action = 'copy'),
                               'bytes', (select coalesce(sum(size), 0) from rows where action = 'copy')),
    'skip', jsonb_build_object('objects', (select count(*) from rows where action = 'skip'),
                               'bytes', (select coalesce(sum(size), 0) from rows where action = 'skip'),
                               'reason', 'unchanged since an earlier job copied it to the same key'),
    'fail', jsonb_build_object('objects', (select count(*) from rows where action = 'fail'),
                               'reasons', (select coalesce(jsonb_object_agg(c, n), '{}') from (
                                  select error_code as c, count(*) as n from rows where action = 'fail' group by error_code) x)),
    'placeholders', (select count(*) from rows where name = '.emptyFolderPlaceholder' or name like '%/.emptyFolderPlaceholder'),
    'user_metadata', jsonb_build_object(
       'as_headers', (select count(*) from rows where user_metadata_mode = 'headers'),
       'encoded', (select count(*) from rows where user_metadata_mode = 'encoded'),
       'manifest_only', (select count(*) from rows where user_metadata_mode = 'manifest')),
    'largest', (select jsonb_build_object('bucket', bucket_id, 'name', name, 'size', size)
                from rows order by size desc, id limit 1),
    'buckets', (select coalesce(jsonb_agg(to_jsonb(p) order by p.bucket_id collate "C"), '[]') from per_bucket p),
    'examples', jsonb_build_object(
       'skip', (select coalesce(jsonb_agg(jsonb_build_object('bucket', bucket_id, 'name', name, 'reason', skip_reason)), '[]')
                from (select * from rows where action = 'skip' order by id limit 20) s),
       'fail', (select coalesce(jsonb_agg(jsonb_build_object('bucket', bucket_id, 'name', name, 'error', error_code, 'message', last_error)), '[]')
                from (select * from rows where action = 'fail' order by id limit 20) f),
       'manifest_only_metadata', (select coalesce(jsonb_agg(jsonb_build_object('bucket', bucket_id, 'name', name)), '[]')
                from (select * from rows where user_metadata_mode = 'manifest' order by id limit 20) m)),
    'destination', jsonb_build_object(
       'bucket', v_job.s3_bucket, 'prefix', v_job.s3_prefix,
       'example_key', (select dest_key from rows order by id limit 1)),
    'deletions', 'not propagated: objects deleted from Storage are left in S3'
  ) into v_plan;
  return v_plan;
end;
$$;

revoke all on function storage_to_s3.create_job(text[], text, boolean, text, text, jsonb) from public;
revoke all on function storage_to_s3.snapshot_source_page(text, text, text, int) from public;
revoke all on function storage_to_s3.add_snapshot_rows(bigint, jsonb, int, text, boolean) from public;
revoke all on function storage_to_s3.plan(bigint) from public;
