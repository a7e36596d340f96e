-- Multi-region HA/DR: the replicated heartbeat.
--
-- The primary stamps ha.heartbeat every few seconds (pg_cron). The row is published, and logical
-- apply keeps commit order, so on the standby the primary's latest stamp is a proven bound: every
-- transaction the primary committed before that moment has been applied here. That bound is the
-- emergency failover's RPO estimate and the standby probe's staleness when the primary cannot be
-- asked. Only a site whose control row says primary (and not fenced) writes a stamp.

create table if not exists ha.heartbeat (
  site text primary key,
  epoch bigint not null,
  beat_at timestamptz not null
);
revoke all on ha.heartbeat from public, anon, authenticated;

-- The heartbeat belongs in the publication's default scope.
create or replace function ha.default_scope(
  p_schemas text[] default '{public}',
  p_extra_tables text[] default '{auth.users,auth.identities}'
)
returns table (schemaname text, tablename text)
language sql
stable
security invoker
set search_path = ''
as $$
  select n.nspname::text, c.relname::text
  from pg_catalog.pg_class c
  join pg_catalog.pg_namespace n on n.oid = c.relnamespace
  where c.relkind in ('r', 'p')
    and c.relpersistence = 'p'
    and not c.relispartition
    and n.nspname not in ('ha', 'telemetry', 'storage_to_s3', 'pg_catalog', 'information_schema')
    and (n.nspname = any(p_schemas) or format('%s.%s', n.nspname, c.relname) = any(p_extra_tables))
  union
  select 'ha', 'markers'
  union
  select 'ha', 'heartbeat'
  order by 1, 2;
$$;

create or replace function ha.beat()
returns timestamptz
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_state ha.state;
  v_at timestamptz := clock_timestamp();
begin
  select * into v_state from ha.state where id;
  if not found or v_state.role <> 'primary' or v_state.fenced or pg_catalog.pg_is_in_recovery()
     or pg_catalog.current_setting('transaction_read_only') = 'on' then
    return null;
  end if;
  insert into ha.heartbeat (site, epoch, beat_at) values (v_state.site, v_state.epoch, v_at)
  on conflict (site) do update set epoch = excluded.epoch, beat_at = excluded.beat_at;
  -- pg_cron never trims its run log; keep an hour of ours.
  if to_regclass('cron.job_run_details') is not null and extract(second from v_at) < 5 then
    begin
      delete from cron.job_run_details d
      using cron.job j
      where d.jobid = j.jobid and j.jobname = 'ha_heartbeat' and d.end_time < now() - interval '1 hour';
    exception when insufficient_privilege then
      null;
    end;
  end if;
  return v_at;
end;
$$;

-- Schedules ha_heartbeat (every 5 s with pg_cron 1.5+, else every minute). Idempotent.
create or replace function ha.schedule_heartbeat()
returns text
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_version numeric;
  v_schedule text;
begin
  select (substring(e.extversion from '^(\d+\.\d+)'))::numeric into v_version
  from pg_catalog.pg_extension e where e.extname = 'pg_cron';
  if v_version is null or to_regnamespace('cron') is null then
    raise notice 'pg_cron is not installed: the HA heartbeat is not scheduled, so emergency failovers cannot '
      'bound their data loss. Enable pg_cron and run select ha.schedule_heartbeat();';
    return null;
  end if;
  v_schedule := case when v_version >= 1.5 then '5 seconds' else '* * * * *' end;
  perform cron.schedule('ha_heartbeat', v_schedule,
    'set statement_timeout = ''2s''; set synchronous_commit = local; select ha.beat()');
  return v_schedule;
end;
$$;

revoke all on function ha.beat() from public;
revoke all on function ha.schedule_heartbeat() from public;

select ha.schedule_heartbeat();
