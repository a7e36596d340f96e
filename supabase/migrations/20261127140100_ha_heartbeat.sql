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

-- At every heartbeat the acting primary also records how far its subscriber's slot is behind
-- (bytes, and the walsender's replay lag) in ha.lag_history: local to each site (not published),
-- a day kept; GET /health/dashboard charts its last hour.
create table if not exists ha.lag_history (
  at timestamptz not null,
  site text not null,
  lag_bytes bigint,
  replay_lag_seconds double precision,
  slot_active boolean
);
create index if not exists lag_history_at_idx on ha.lag_history (at);
revoke all on ha.lag_history from public, anon, authenticated;

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
  insert into ha.lag_history (at, site, lag_bytes, replay_lag_seconds, slot_active)
  select v_at, v_state.site,
         greatest(0, pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.confirmed_flush_lsn))::bigint,
         (select extract(epoch from r.replay_lag)::float8 from pg_catalog.pg_stat_replication r where r.pid = s.active_pid),
         s.active
  from pg_catalog.pg_replication_slots s
  where s.slot_name = 'dr_subscription' and s.database = pg_catalog.current_database();
  -- Housekeeping about once a minute: a day of lag history, an hour of our pg_cron run log.
  if extract(second from v_at) < 5 then
    delete from ha.lag_history where at < v_at - interval '1 day';
    if to_regclass('cron.job_run_details') is not null then
      begin
        delete from cron.job_run_details d
        using cron.job j
        where d.jobid = j.jobid and j.jobname = 'ha_heartbeat' and d.end_time < now() - interval '1 hour';
      exception when insufficient_privilege then
        null;
      end;
    end if;
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
