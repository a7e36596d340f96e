-- Storage to S3: scheduling a job with pg_cron -> pg_net -> the storage-to-s3 function.
--
--   * schedule(job_id, function_url, every) creates (or updates, by name) one pg_cron job per
--     migration job. Its command is `select storage_to_s3.tick(<id>)`: no URL and no secret in
--     cron.job.command;
--   * tick() reads the function's bearer token from Vault at every tick, so rotating the secret
--     needs no rescheduling, and posts a small JSON body with pg_net. pg_net is asynchronous:
--     correctness never depends on its responses (progress lives in the manifest), and the
--     request timeout is the chunk's wall budget plus a margin;
--   * a finished job unschedules itself: refresh_status() calls unschedule() when the last object
--     is done, and tick() does too if it ever finds the job finished;
--   * run options of POST /jobs/{id}/run (concurrency, max_bytes, ...) can be stored with the
--     schedule (scheduling again without them keeps them); they are checked here with the
--     function's own bounds, so a bad value is refused when it is scheduled instead of failing
--     every tick with a 400;
--   * pg_cron, pg_net and Vault are optional at install time: without them this migration
--     applies with a NOTICE and schedule() raises a clear error (drive /run from any scheduler).

create table if not exists storage_to_s3.schedules (
  job_id bigint primary key references storage_to_s3.jobs (id) on delete cascade,
  cron_job_name text not null unique,
  function_url text not null,
  every text not null,
  cron_schedule text not null,
  secret_name text not null,
  max_seconds int not null,
  run_options jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  last_tick_at timestamptz,
  last_request_id bigint,
  ticks bigint not null default 0
);
revoke all on storage_to_s3.schedules from public, anon, authenticated;

-- '30 seconds' (pg_cron 1.5+), '5 minutes', 'minute', or a five-field cron expression.
create or replace function storage_to_s3.cron_schedule_for(p_every text)
returns text
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
  v text := lower(btrim(coalesce(p_every, '')));
  v_m text[];
  v_n int;
  v_cron numeric;
begin
  select (substring(e.extversion from '^(\d+\.\d+)'))::numeric into v_cron
  from pg_catalog.pg_extension e where e.extname = 'pg_cron';
  v_m := regexp_match(v, '^(\d{1,2})\s*(s|sec|secs|second|seconds)$');
  if v_m is not null then
    v_n := v_m[1]::int;
    if v_n < 1 or v_n > 59 then
      raise exception 'every: seconds must be 1 to 59 (use minutes or a cron expression above that)'
        using errcode = 'invalid_parameter_value';
    end if;
    if v_cron is not null and v_cron < 1.5 then
      raise exception 'every: pg_cron % has no seconds schedules (they need 1.5+); use ''1 minute'' or a cron expression', v_cron
        using errcode = 'invalid_parameter_value';
    end if;
    return format('%s seconds', v_n);
  end if;
  if v in ('minute', '1 minute', 'every minute') then
    return '* * * * *';
  end if;
  v_m := regexp_match(v, '^(\d{1,2})\s*(m|min|mins|minute|minutes)$');
  if v_m is not null then
    v_n := v_m[1]::int;
    if v_n < 1 or v_n > 59 then
      raise exception 'every: minutes must be 1 to 59' using errcode = 'invalid_parameter_value';
    end if;
    return case when v_n = 1 then '* * * * *' else format('*/%s * * * *', v_n) end;
  end if;
  if v ~ '^[0-9*/,-]+( +[0-9*/,a-z-]+){4}$' then
    return v;
  end if;
  raise exception 'every: "%" is neither "N seconds", "N minutes" nor a five-field cron expression', p_every
    using errcode = 'invalid_parameter_value';
end;
$$;

-- The options a schedule may carry, with their bounds (those of the function's RunBody).
create or replace function storage_to_s3.check_run_options(p_options jsonb)
returns jsonb
language plpgsql
immutable
set search_path = ''
as $$
declare
  v_key text;
  v_value jsonb;
  v_number numeric;
  v_bounds constant jsonb := '{
    "concurrency": [1, 64],
    "multipart_concurrency": [1, 16],
    "max_bytes": [1048576, 1099511627776],
    "max_cpu_ms": [50, 600000],
    "part_size_mib": [5, 5120],
    "lease_seconds": [5, 3600],
    "retry_delay_seconds": [0, 3600]
  }'::jsonb;
begin
  if p_options is null then
    return '{}'::jsonb;
  end if;
  if jsonb_typeof(p_options) <> 'object' then
    raise exception 'run_options must be a JSON object, e.g. {"concurrency": 8}'
      using errcode = 'invalid_parameter_value';
  end if;
  for v_key, v_value in select e.key, e.value from jsonb_each(p_options) e loop
    if not v_bounds ? v_key then
      raise exception 'run_options: unknown option "%" (known: %)', v_key,
        (select string_agg(k, ', ' order by k) from jsonb_object_keys(v_bounds) k)
        using errcode = 'invalid_parameter_value';
    end if;
    if jsonb_typeof(v_value) <> 'number' then
      raise exception 'run_options: % must be a number', v_key using errcode = 'invalid_parameter_value';
    end if;
    v_number := v_value::text::numeric;
    if v_number < (v_bounds -> v_key ->> 0)::numeric or v_number > (v_bounds -> v_key ->> 1)::numeric
       or (v_key <> 'retry_delay_seconds' and v_number <> trunc(v_number)) then
      raise exception 'run_options: % must be % from % to %', v_key,
        case when v_key = 'retry_delay_seconds' then 'a number' else 'an integer' end,
        v_bounds -> v_key ->> 0, v_bounds -> v_key ->> 1
        using errcode = 'invalid_parameter_value';
    end if;
  end loop;
  return p_options;
end;
$$;

create or replace function storage_to_s3.schedule(
  p_job_id bigint,
  p_function_url text,
  p_every text default '1 minute',
  p_secret_name text default 'toolkit_api_token',
  p_max_seconds int default 50,
  p_run_options jsonb default null
)
returns storage_to_s3.schedules
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_job storage_to_s3.jobs;
  v_url text := regexp_replace(btrim(coalesce(p_function_url, '')), '/+$', '');
  v_cron_schedule text;
  v_name text := format('storage_to_s3_job_%s', p_job_id);
  v_secret_found boolean;
  v_options jsonb;
  v_row storage_to_s3.schedules;
begin
  select * into v_job from storage_to_s3.jobs j where j.id = p_job_id;
  if not found then
    raise exception 'Job % does not exist', p_job_id using errcode = 'no_data_found';
  end if;
  if v_job.dry_run then
    raise exception 'Job % is a dry run: it never copies, so there is nothing to schedule', p_job_id
      using errcode = 'invalid_parameter_value';
  end if;
  if v_job.status in ('completed', 'completed_with_failures') then
    raise exception 'Job % is already %', p_job_id, v_job.status using errcode = 'object_not_in_prerequisite_state';
  end if;
  if v_url !~ '^https?://[^\s/?#''"]+(/[^\s?#''"]*)?$' then
    raise exception 'function_url must be the function''s http(s) URL, e.g. https://<ref>.supabase.co/functions/v1/storage-to-s3'
      using errcode = 'invalid_parameter_value';
  end if;
  if p_max_seconds is null or p_max_seconds < 5 or p_max_seconds > 300 then
    raise exception 'max_seconds must be 5 to 300' using errcode = 'invalid_parameter_value';
  end if;
  if p_secret_name is null or p_secret_name !~ '^[A-Za-z0-9_.-]{1,100}$' then
    raise exception 'secret_name must be 1-100 letters, digits, "_", "." or "-"' using errcode = 'invalid_parameter_value';
  end if;
  -- null (the default) keeps the options stored by an earlier schedule(); '{}' clears them.
  v_options := case when p_run_options is not null then storage_to_s3.check_run_options(p_run_options) end;
  v_cron_schedule := storage_to_s3.cron_schedule_for(p_every);
  if to_regnamespace('cron') is null then
    raise exception 'pg_cron is not installed: enable it (Database > Extensions > pg_cron), or call POST /storage-to-s3/jobs/%/run from another scheduler', p_job_id
      using errcode = 'feature_not_supported';
  end if;
  if to_regprocedure('net.http_post(text, jsonb, jsonb, jsonb, integer)') is null then
    raise exception 'pg_net is not installed: enable it (Database > Extensions > pg_net) so pg_cron can call the function'
      using errcode = 'feature_not_supported';
  end if;
  if to_regclass('vault.decrypted_secrets') is null then
    raise exception 'Supabase Vault is not available: the function''s token must be read from vault.decrypted_secrets'
      using errcode = 'feature_not_supported';
  end if;
  execute 'select exists (select from vault.decrypted_secrets s where s.name = $1)' into v_secret_found using p_secret_name;
  if not v_secret_found then
    raise exception 'Vault has no secret named %', p_secret_name
      using errcode = 'invalid_parameter_value',
            hint = format('Store the function''s TOOLKIT_API_TOKEN first: select vault.create_secret(''<token>'', %L);', p_secret_name);
  end if;
  perform cron.schedule(v_name, v_cron_schedule, format('select storage_to_s3.tick(%s)', p_job_id));
  insert into storage_to_s3.schedules as s
    (job_id, cron_job_name, function_url, every, cron_schedule, secret_name, max_seconds, run_options)
  values (p_job_id, v_name, v_url, p_every, v_cron_schedule, p_secret_name, p_max_seconds, coalesce(v_options, '{}'::jsonb))
  on conflict (job_id) do update
    set function_url = excluded.function_url, every = excluded.every, cron_schedule = excluded.cron_schedule,
        secret_name = excluded.secret_name, max_seconds = excluded.max_seconds,
        run_options = coalesce(v_options, s.run_options)
  returning * into v_row;
  return v_row;
end;
$$;

-- Removes the job's cron job and schedule row; true when there was something to remove.
create or replace function storage_to_s3.unschedule(p_job_id bigint)
returns boolean
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_name text := format('storage_to_s3_job_%s', p_job_id);
  v_removed boolean := false;
  v_exists boolean;
begin
  if to_regnamespace('cron') is not null and pg_catalog.has_schema_privilege('cron', 'usage') then
    execute 'select exists (select from cron.job j where j.jobname = $1 and j.username = current_user)'
      into v_exists using v_name;
    if v_exists then
      perform cron.unschedule(v_name);
      v_removed := true;
    end if;
  end if;
  delete from storage_to_s3.schedules s where s.job_id = p_job_id;
  if found then
    v_removed := true;
  end if;
  return v_removed;
end;
$$;

-- What the cron job runs: one pg_net POST to /jobs/{id}/run, or unschedule when the job is done.
-- Returns pg_net's request id (null when nothing was sent).
create or replace function storage_to_s3.tick(p_job_id bigint)
returns bigint
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_schedule storage_to_s3.schedules;
  v_status text;
  v_token text;
  v_request bigint;
begin
  select * into v_schedule from storage_to_s3.schedules s where s.job_id = p_job_id;
  select j.status into v_status from storage_to_s3.jobs j where j.id = p_job_id;
  if v_schedule.job_id is null or v_status is null or v_status in ('completed', 'completed_with_failures') then
    perform storage_to_s3.unschedule(p_job_id);
    return null;
  end if;
  execute 'select s.decrypted_secret from vault.decrypted_secrets s where s.name = $1 limit 1'
    into v_token using v_schedule.secret_name;
  if v_token is null or v_token = '' then
    raise exception 'Vault has no secret named %: the scheduled run of job % cannot authenticate', v_schedule.secret_name, p_job_id
      using errcode = 'invalid_parameter_value';
  end if;
  v_request := net.http_post(
    url := v_schedule.function_url || '/jobs/' || p_job_id || '/run',
    body := v_schedule.run_options || jsonb_build_object('max_seconds', v_schedule.max_seconds),
    params := '{}'::jsonb,
    headers := jsonb_build_object('Content-Type', 'application/json', 'Authorization', 'Bearer ' || v_token),
    timeout_milliseconds := (v_schedule.max_seconds + 30) * 1000
  );
  update storage_to_s3.schedules s
  set last_tick_at = now(), last_request_id = v_request, ticks = s.ticks + 1
  where s.job_id = p_job_id;
  return v_request;
end;
$$;

revoke all on function storage_to_s3.cron_schedule_for(text) from public;
revoke all on function storage_to_s3.check_run_options(jsonb) from public;
revoke all on function storage_to_s3.schedule(bigint, text, text, text, int, jsonb) from public;
revoke all on function storage_to_s3.unschedule(bigint) from public;
revoke all on function storage_to_s3.tick(bigint) from public;

do $$
declare
  v_missing text[] := '{}';
begin
  if to_regnamespace('cron') is null then
    v_missing := v_missing || 'pg_cron'::text;
  end if;
  if to_regprocedure('net.http_post(text, jsonb, jsonb, jsonb, integer)') is null then
    v_missing := v_missing || 'pg_net'::text;
  end if;
  if to_regclass('vault.decrypted_secrets') is null then
    v_missing := v_missing || 'Supabase Vault'::text;
  end if;
  if cardinality(v_missing) > 0 then
    raise notice 'storage_to_s3: % not available here, so storage_to_s3.schedule() will raise an error until enabled. Jobs still run when POST /storage-to-s3/jobs/{id}/run is called by any scheduler.',
      array_to_string(v_missing, ', ');
  end if;
end
$$;
