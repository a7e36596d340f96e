-- Batch telemetry: scheduling, retention and self-checks.
--
--   * pg_cron is optional: without it the migration applies and says so in a NOTICE, and the
--     collectors run when called (runs, an external scheduler, the HTTP API).
--   * pg_cron's version is read from extversion ('1.4-1' is 1.4): 30-second sampling needs 1.5+,
--     older versions sample every minute.
--   * cron.schedule() by job name updates the job in place, so re-running this migration or
--     telemetry.schedule_jobs() never duplicates jobs.
--   * statement_timeout cannot be armed from inside the collectors, so each cron command sets it,
--     and synchronous_commit = local: telemetry must keep recording while commits wait for a
--     synchronous standby (that is one of the things it diagnoses).
--   * cleanup() also trims our own rows in cron.job_run_details, which pg_cron never trims.

-- pg_cron's version as major.minor (null when pg_cron is not installed).
create or replace function telemetry.pg_cron_version()
returns numeric
language sql
stable
security invoker
set search_path = ''
as $$
  select (substring(e.extversion from '^(\d+\.\d+)'))::numeric
  from pg_catalog.pg_extension e
  where e.extname = 'pg_cron';
$$;

create or replace function telemetry.schedule_jobs()
returns table (jobname text, schedule text, command text)
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_version numeric := telemetry.pg_cron_version();
  v_sample_schedule text;
begin
  if v_version is null or to_regnamespace('cron') is null then
    raise notice 'pg_cron is not installed: telemetry jobs are not scheduled. Collectors still run when called '
      '(telemetry.start_run/end_run, the telemetry function, or an external scheduler calling telemetry.sample() '
      'and telemetry.snapshot()). Enable pg_cron and run select * from telemetry.schedule_jobs();';
    return;
  end if;
  v_sample_schedule := case when v_version >= 1.5 then '30 seconds' else '* * * * *' end;
  if v_version < 1.5 then
    raise notice 'pg_cron % has no seconds schedules (they need 1.5+): telemetry_sample runs every minute', v_version;
  end if;
  perform cron.schedule('telemetry_snapshot', '*/5 * * * *',
    'set statement_timeout = ''30s''; set synchronous_commit = local; select telemetry.snapshot()');
  perform cron.schedule('telemetry_sample', v_sample_schedule,
    'set statement_timeout = ''5s''; set synchronous_commit = local; select telemetry.sample()');
  perform cron.schedule('telemetry_cleanup', '17 3 * * *',
    'set statement_timeout = ''10min''; set synchronous_commit = local; select * from telemetry.cleanup()');
  return query
    select j.jobname::text, j.schedule::text, j.command::text
    from cron.job j
    where j.jobname in ('telemetry_snapshot', 'telemetry_sample', 'telemetry_cleanup') and j.username = current_user
    order by j.jobname;
end;
$$;

create or replace function telemetry.unschedule_jobs()
returns int
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_job record;
  v_count int := 0;
begin
  if to_regnamespace('cron') is null then
    return 0;
  end if;
  for v_job in
    select j.jobid from cron.job j
    where j.jobname in ('telemetry_snapshot', 'telemetry_sample', 'telemetry_cleanup') and j.username = current_user
  loop
    perform cron.unschedule(v_job.jobid);
    delete from cron.job_run_details d where d.jobid = v_job.jobid;
    v_count := v_count + 1;
  end loop;
  return v_count;
end;
$$;

-- Deletes everything older than the retention (config 'retention' unless given) and our pg_cron
-- run details older than config 'cron_log_retention'.
create or replace function telemetry.cleanup(p_retain_interval interval default null)
returns table (deleted_snapshots bigint, deleted_samples bigint, deleted_run_details bigint, deleted_other bigint)
language plpgsql
security invoker
set search_path = ''
set lock_timeout = '1s'
as $$
declare
  v_cutoff timestamptz := now() - coalesce(p_retain_interval, telemetry._config('retention', '7 days')::interval);
  v_cron_cutoff timestamptz := now() - telemetry._config('cron_log_retention', '1 day')::interval;
  v_snapshots bigint := 0;
  v_samples bigint := 0;
  v_details bigint := 0;
  v_other bigint := 0;
  v_n bigint;
begin
  delete from telemetry.samples s where s.captured_at < v_cutoff;
  get diagnostics v_samples = row_count;
  delete from telemetry.snapshots s where s.captured_at < v_cutoff;
  get diagnostics v_snapshots = row_count;
  delete from telemetry.runs r where coalesce(r.ended_at, r.started_at) < v_cutoff;
  get diagnostics v_n = row_count;
  v_other := v_other + v_n;
  -- Texts no remaining sample or snapshot refers to.
  delete from telemetry.query_texts q
  where q.hash not in (select h from telemetry.samples s cross join lateral unnest(s.s_text_hash) h where h is not null);
  get diagnostics v_n = row_count;
  v_other := v_other + v_n;
  delete from telemetry.statement_texts q
  where q.queryid not in (select h from telemetry.statement_snapshots s cross join lateral unnest(s.queryid) h);
  get diagnostics v_n = row_count;
  v_other := v_other + v_n;
  delete from telemetry.collector_events e where e.at < v_cutoff;
  get diagnostics v_n = row_count;
  v_other := v_other + v_n;
  if to_regclass('cron.job_run_details') is not null then
    begin
      delete from cron.job_run_details d
      where d.jobid in (select j.jobid from cron.job j
                        where j.jobname in ('telemetry_snapshot', 'telemetry_sample', 'telemetry_cleanup'))
        and coalesce(d.end_time, d.start_time) < v_cron_cutoff;
      get diagnostics v_details = row_count;
    exception when insufficient_privilege then
      insert into telemetry.collector_events (collector, event, detail)
      values ('cleanup', 'skipped', 'no privilege to delete from cron.job_run_details');
    end;
  end if;
  return query select v_snapshots, v_samples, v_details, v_other;
end;
$$;

-- What the collectors can and cannot see here, and why.
create or replace function telemetry.preflight()
returns table (check_name text, status text, detail text)
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
  v_cron numeric := telemetry.pg_cron_version();
  v_pgss name;
  v_last_sample timestamptz;
begin
  return query select 'pg_read_all_stats',
    case when pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'usage') then 'ok' else 'fail' end,
    case when pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'usage')
      then format('%s can read every session', current_user)
      else format('%s lacks pg_read_all_stats: other users'' sessions are invisible (grant pg_monitor)', current_user) end;
  return query select 'pg_cron',
    case when v_cron is null then 'warn' when v_cron < 1.5 then 'ok' else 'ok' end,
    case when v_cron is null then 'not installed: nothing collects on a schedule'
         when v_cron < 1.5 then format('pg_cron %s: sampling every minute (30-second schedules need 1.5+)', v_cron)
         else format('pg_cron %s: sampling every 30 seconds', v_cron) end;
  if v_cron is not null and to_regnamespace('cron') is not null then
    -- (to_regclass() itself fails without USAGE on the schema, so check that first)
    if pg_catalog.has_schema_privilege('cron', 'usage') then
      return query execute $q$
        select 'jobs'::text,
               case when count(*) = 3 then 'ok' else 'warn' end,
               format('%s of 3 telemetry jobs scheduled', count(*))
        from cron.job j
        where j.jobname in ('telemetry_snapshot', 'telemetry_sample', 'telemetry_cleanup') and j.active
      $q$;
    else
      return query select 'jobs'::text, 'warn'::text, format('%s cannot read cron.job', current_user);
    end if;
  end if;
  select n.nspname into v_pgss
  from pg_catalog.pg_extension e join pg_catalog.pg_namespace n on n.oid = e.extnamespace
  where e.extname = 'pg_stat_statements';
  return query select 'pg_stat_statements',
    case when v_pgss is null then 'warn' else 'ok' end,
    case when v_pgss is null then 'not installed: statement_compare() has no data' else format('installed in schema %s', v_pgss) end;
  return query select s.name::text,
    case when s.setting = 'on' then 'ok' else 'warn' end,
    case when s.setting = 'on' then 'on'
         else 'off: I/O and WAL times are zero; diagnosis uses counts and waits only' end
  from pg_catalog.pg_settings s where s.name in ('track_io_timing', 'track_wal_io_timing');
  select max(x.captured_at) into v_last_sample from telemetry.samples x;
  return query select 'last_sample',
    case when v_last_sample > now() - interval '3 minutes' then 'ok' else 'warn' end,
    coalesce(format('%s ago', date_trunc('second', now() - v_last_sample)), 'no sample yet');
end;
$$;

revoke all on function telemetry.pg_cron_version() from public;
revoke all on function telemetry.schedule_jobs() from public;
revoke all on function telemetry.unschedule_jobs() from public;
revoke all on function telemetry.cleanup(interval) from public;
revoke all on function telemetry.preflight() from public;

-- Schedule the jobs now (a NOTICE instead when pg_cron is absent), then take a first snapshot and
-- sample so the first window has a starting point.
select * from telemetry.schedule_jobs();
select telemetry.snapshot();
select telemetry.sample();
