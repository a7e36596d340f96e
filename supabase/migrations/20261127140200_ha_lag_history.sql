-- Multi-region HA/DR: replication lag history for the dashboard.
--
-- At every heartbeat the acting primary also records how far its subscriber's slot is behind
-- (bytes, and the walsender's replay lag). The table is local to each site (not published) and
-- keeps a day; GET /health/dashboard charts its last hour.

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
revoke all on function ha.beat() from public;
