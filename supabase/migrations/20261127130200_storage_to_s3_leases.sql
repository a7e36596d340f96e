-- Storage to S3: leasing work, job status and progress.
--
--   * lease() hands a batch of unfinished rows to one invocation: FOR UPDATE SKIP LOCKED, so
--     overlapping invocations (two cron ticks, a manual run) never take the same object, and an
--     expiry, so the rows of an invocation that was killed become leasable again. Every write the
--     worker makes afterwards is fenced with `lease_owner = <its id>`;
--   * refresh_status() moves a job to completed / completed_with_failures once nothing is left,
--     and then removes its schedule;
--   * progress() is what GET /storage-to-s3/jobs/{id} shows: counts and bytes per state, rate, ETA,
--     failures with reasons, open or orphaned multipart uploads and the verification tally.

create or replace function storage_to_s3.lease(
  p_job_id bigint,
  p_worker uuid,
  p_limit int,
  p_lease_seconds int
)
returns setof storage_to_s3.objects
language plpgsql
security invoker
set search_path = ''
as $$
begin
  if p_limit < 1 or p_limit > 10000 or p_lease_seconds < 1 or p_lease_seconds > 3600 then
    raise exception 'lease: limit must be 1-10000 and lease 1-3600 seconds' using errcode = 'invalid_parameter_value';
  end if;
  return query
    with picked as (
      select o.id
      from storage_to_s3.objects o
      where o.job_id = p_job_id
        and o.state in ('pending', 'copying')
        and (o.lease_expires_at is null or o.lease_expires_at < now())
        and (o.next_attempt_at is null or o.next_attempt_at <= now())
      order by o.id
      limit p_limit
      for update skip locked
    )
    update storage_to_s3.objects o
    set state = 'copying',
        lease_owner = p_worker,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        attempts = o.attempts + 1
    from picked
    where o.id = picked.id
    returning o.*;
end;
$$;

-- Starts (or, with p_restart, restarts) a verification pass; returns its start time. Rows
-- verified before that time are checked again.
create or replace function storage_to_s3.begin_verify(p_job_id bigint, p_restart boolean)
returns timestamptz
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_started timestamptz;
begin
  update storage_to_s3.jobs j
  set verify_started_at = case when p_restart or j.verify_started_at is null then clock_timestamp() else j.verify_started_at end,
      verify_finished_at = case when p_restart or j.verify_started_at is null then null else j.verify_finished_at end
  where j.id = p_job_id
  returning j.verify_started_at into v_started;
  if not found then
    raise exception 'Job % does not exist', p_job_id using errcode = 'no_data_found';
  end if;
  return v_started;
end;
$$;

-- Leases copied/skipped rows not yet verified in the current pass (same SKIP LOCKED + expiry).
create or replace function storage_to_s3.lease_verify(
  p_job_id bigint,
  p_worker uuid,
  p_limit int,
  p_lease_seconds int
)
returns setof storage_to_s3.objects
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_since timestamptz;
begin
  select j.verify_started_at into v_since from storage_to_s3.jobs j where j.id = p_job_id;
  return query
    with picked as (
      select o.id
      from storage_to_s3.objects o
      where o.job_id = p_job_id
        and o.state in ('copied', 'skipped')
        and (o.verified_at is null or o.verified_at < v_since)
        and (o.lease_expires_at is null or o.lease_expires_at < now())
      order by o.id
      limit p_limit
      for update skip locked
    )
    update storage_to_s3.objects o
    set lease_owner = p_worker,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds)
    from picked
    where o.id = picked.id
    returning o.*;
end;
$$;

-- Returns leased rows this worker did not get to; `p_unstarted` rows do not count as an attempt.
create or replace function storage_to_s3.release(p_worker uuid, p_ids bigint[], p_unstarted boolean)
returns int
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_count int;
begin
  update storage_to_s3.objects o
  set state = 'pending',
      lease_owner = null,
      lease_expires_at = null,
      attempts = case when p_unstarted then greatest(o.attempts - 1, 0) else o.attempts end
  where o.id = any(p_ids) and o.lease_owner = p_worker and o.state = 'copying';
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;

-- Sets the job's status from its manifest; unschedules a finished job.
create or replace function storage_to_s3.refresh_status(p_job_id bigint)
returns text
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_job storage_to_s3.jobs;
  v_open boolean;
  v_failed boolean;
  v_status text;
begin
  select * into v_job from storage_to_s3.jobs j where j.id = p_job_id;
  if not found then
    raise exception 'Job % does not exist', p_job_id using errcode = 'no_data_found';
  end if;
  if v_job.snapshot_done_at is null then
    return v_job.status;
  end if;
  if v_job.dry_run then
    v_status := 'planned';
  else
    select exists (select from storage_to_s3.objects o where o.job_id = p_job_id and o.state in ('pending', 'copying')),
           exists (select from storage_to_s3.objects o where o.job_id = p_job_id and o.state = 'failed')
    into v_open, v_failed;
    v_status := case when v_open then (case when v_job.started_at is null then 'pending' else 'running' end)
                     when v_failed then 'completed_with_failures'
                     else 'completed' end;
  end if;
  if v_status is distinct from v_job.status then
    update storage_to_s3.jobs j
    set status = v_status,
        finished_at = case when v_status in ('completed', 'completed_with_failures') then now() end
    where j.id = p_job_id;
  end if;
  if v_status in ('completed', 'completed_with_failures')
     and to_regclass('storage_to_s3.schedules') is not null then
    -- A finished job needs no more ticks (its cron job would only find nothing to do).
    perform storage_to_s3.unschedule(p_job_id);
  end if;
  return v_status;
end;
$$;

create or replace function storage_to_s3.progress(p_job_id bigint)
returns jsonb
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
  v_job storage_to_s3.jobs;
  v_counts record;
  v_runs record;
  v_active_rate numeric;
  v_wall_rate numeric;
  v_rate numeric;
  v_obj_rate numeric;
  v_remaining_bytes numeric;
  v_failures jsonb;
  v_uploads record;
  v_mismatches jsonb;
  v_schedule jsonb;
begin
  select * into v_job from storage_to_s3.jobs j where j.id = p_job_id;
  if not found then
    raise exception 'Job % does not exist', p_job_id using errcode = 'no_data_found';
  end if;
  select count(*) as total,
         count(*) filter (where o.state = 'copied') as copied,
         count(*) filter (where o.state = 'skipped') as skipped,
         count(*) filter (where o.state in ('pending', 'copying')) as remaining,
         count(*) filter (where o.state = 'copying' and o.lease_expires_at > now()) as in_flight,
         count(*) filter (where o.state in ('pending', 'copying') and o.next_attempt_at > now()) as retrying,
         count(*) filter (where o.state = 'failed') as failed,
         coalesce(sum(o.size), 0) as bytes_total,
         coalesce(sum(o.size) filter (where o.state = 'copied'), 0)
           + coalesce(sum(o.bytes_done) filter (where o.state in ('pending', 'copying')), 0) as bytes_copied,
         coalesce(sum(o.size) filter (where o.state = 'skipped'), 0) as bytes_skipped,
         coalesce(sum(o.size - o.bytes_done) filter (where o.state in ('pending', 'copying')), 0) as bytes_remaining,
         coalesce(sum(o.size) filter (where o.state = 'failed'), 0) as bytes_failed,
         count(*) filter (where o.user_metadata_mode = 'manifest') as metadata_manifest_only,
         count(*) filter (where o.verify_status = 'ok') as verified_ok,
         count(*) filter (where o.verify_status = 'mismatch') as verified_mismatch,
         count(*) filter (where o.state in ('copied', 'skipped') and (o.verified_at is null
                          or (v_job.verify_started_at is not null and o.verified_at < v_job.verify_started_at))) as unverified
  into v_counts
  from storage_to_s3.objects o
  where o.job_id = p_job_id;

  select count(*) as invocations,
         coalesce(sum(r.bytes_copied), 0) as bytes,
         coalesce(sum(r.objects_copied), 0) as objects,
         coalesce(sum(extract(epoch from (r.ended_at - r.started_at))), 0) as active_seconds,
         min(r.started_at) as first_started,
         max(r.ended_at) as last_ended,
         coalesce(sum(r.cpu_ms), 0) as cpu_ms
  into v_runs
  from storage_to_s3.runs r
  where r.job_id = p_job_id and r.kind = 'copy' and r.ended_at is not null;

  v_active_rate := case when v_runs.active_seconds > 0 then v_runs.bytes / v_runs.active_seconds end;
  v_wall_rate := case when v_runs.invocations > 1 and v_runs.last_ended > v_runs.first_started
                      then v_runs.bytes / extract(epoch from (v_runs.last_ended - v_runs.first_started)) end;
  -- With cron gaps between invocations the wall-clock rate is what an ETA must use.
  v_rate := coalesce(v_wall_rate, v_active_rate);
  v_obj_rate := case when v_runs.active_seconds > 0 then v_runs.objects / v_runs.active_seconds end;
  v_remaining_bytes := v_counts.bytes_remaining;

  select coalesce(jsonb_agg(jsonb_build_object(
           'bucket', f.bucket_id, 'name', f.name, 'key', f.dest_key, 'error', f.error_code, 'message', f.last_error,
           'attempts', f.attempts, 'permanent', f.state = 'failed',
           'next_attempt_at', f.next_attempt_at) order by f.state = 'failed' desc, f.id), '[]')
  into v_failures
  from (
    select o.* from storage_to_s3.objects o
    where o.job_id = p_job_id
      and (o.state = 'failed' or (o.state in ('pending', 'copying') and o.last_error is not null))
    order by o.state = 'failed' desc, o.id
    limit 100
  ) f;

  select count(*) filter (where u.state in ('open', 'creating')) as open,
         count(*) filter (where u.state in ('abort_failed', 'lost')
                          or (u.state in ('open', 'creating') and o.state in ('copied', 'skipped', 'failed'))) as orphaned,
         count(*) filter (where u.state = 'completed') as completed,
         count(*) filter (where u.state = 'aborted') as aborted
  into v_uploads
  from storage_to_s3.uploads u
  join storage_to_s3.objects o on o.id = u.object_id
  where o.job_id = p_job_id;

  select coalesce(jsonb_agg(jsonb_build_object('bucket', m.bucket_id, 'name', m.name, 'key', m.dest_key,
                                               'problems', m.verify_problems) order by m.id), '[]')
  into v_mismatches
  from (select o.* from storage_to_s3.objects o
        where o.job_id = p_job_id and o.verify_status = 'mismatch' order by o.id limit 100) m;

  if to_regclass('storage_to_s3.schedules') is not null then
    execute 'select to_jsonb(s) - ''secret_name'' from storage_to_s3.schedules s where s.job_id = $1'
      into v_schedule using p_job_id;
  end if;

  return jsonb_build_object(
    'job', jsonb_build_object(
      'id', v_job.id, 'status', v_job.status, 'dry_run', v_job.dry_run,
      'created_at', v_job.created_at, 'snapshot_complete', v_job.snapshot_done_at is not null,
      'buckets', to_jsonb(v_job.buckets), 'prefix', v_job.prefix,
      'destination', jsonb_build_object('bucket', v_job.s3_bucket, 'prefix', v_job.s3_prefix),
      'started_at', v_job.started_at, 'last_run_at', v_job.last_run_at, 'finished_at', v_job.finished_at),
    'objects', jsonb_build_object(
      'total', v_counts.total, 'copied', v_counts.copied, 'skipped', v_counts.skipped,
      'done', v_counts.copied + v_counts.skipped, 'remaining', v_counts.remaining,
      'in_flight', v_counts.in_flight, 'retrying', v_counts.retrying, 'failed', v_counts.failed),
    'bytes', jsonb_build_object(
      'total', v_counts.bytes_total, 'copied', v_counts.bytes_copied, 'skipped', v_counts.bytes_skipped,
      'remaining', v_counts.bytes_remaining, 'failed', v_counts.bytes_failed),
    'rate', jsonb_build_object(
      'bytes_per_second', round(v_rate, 1),
      'active_bytes_per_second', round(v_active_rate, 1),
      'objects_per_second', round(v_obj_rate, 2),
      'invocations', v_runs.invocations,
      'active_seconds', round(v_runs.active_seconds::numeric, 3),
      'cpu_ms', v_runs.cpu_ms),
    'eta_seconds', case when v_remaining_bytes = 0 and v_counts.remaining = 0 then 0
                        when v_rate > 0 then ceil(v_remaining_bytes / v_rate)
                        when v_obj_rate > 0 then ceil(v_counts.remaining / v_obj_rate) end,
    'failures', v_failures,
    'multipart_uploads', jsonb_build_object(
      'open', v_uploads.open, 'orphaned', v_uploads.orphaned,
      'completed', v_uploads.completed, 'aborted', v_uploads.aborted),
    'metadata_manifest_only', v_counts.metadata_manifest_only,
    'verify', jsonb_build_object(
      'started_at', v_job.verify_started_at, 'finished_at', v_job.verify_finished_at,
      'ok', v_counts.verified_ok, 'mismatches', v_counts.verified_mismatch,
      'unverified', v_counts.unverified, 'mismatched', v_mismatches),
    'schedule', v_schedule
  );
end;
$$;

revoke all on function storage_to_s3.lease(bigint, uuid, int, int) from public;
revoke all on function storage_to_s3.begin_verify(bigint, boolean) from public;
revoke all on function storage_to_s3.lease_verify(bigint, uuid, int, int) from public;
revoke all on function storage_to_s3.release(uuid, bigint[], boolean) from public;
revoke all on function storage_to_s3.refresh_status(bigint) from public;
revoke all on function storage_to_s3.progress(bigint) from public;
