-- Multi-region HA/DR: the primary's write lease, renewed by the other region.
--
-- Fencing a site the failover can reach does not help when the primary region is cut off from
-- the failover function and the standby but still serves its own Data API. Design rules (after
-- Patroni's leader key TTL, with the other region as the witness):
--
--   * The writable primary accepts writes only until ha.state.lease_until (its own clock); the
--     write guard refuses after it, and checks each writing transaction again at COMMIT.
--   * Every few seconds the primary's pg_cron job runs ha.lease_tick(), which asks the failover
--     function deployed in the OTHER region (pg_net, token from Vault) to renew. That function
--     first records the grant on its own site (ha.lease_grants, in the granter's clock:
--     granted_until = now + TTL + the longest delay it allows before the primary's update), then
--     extends lease_until on the primary. It grants only while the requester is the primary at the
--     granter's epoch and no emergency failover is running or failed closed on the granter.
--   * An emergency failover locks the granter's control row (so no grant is in flight), reads the
--     last granted_until for the old primary, and promotes only after that instant plus a margin
--     has passed on the granter's clock. Each clock only ever measures its own durations, so the
--     margin covers clock-rate drift and commit latency, not an offset between the clocks.
--   * After an emergency the new primary has no standby to grant it a lease: it holds an infinite
--     one until the old site is rejoined, when grants resume.
--   * With the lease off (ha.state.lease_ttl_seconds is null) ha.lease_tick() still checks in, so
--     the other region can fence a stale primary that came back.

alter table ha.state add column if not exists lease_url text;
alter table ha.state add column if not exists lease_renewed_at timestamptz;
-- How setup was told to renew (kept when setup runs again without saying).
alter table ha.state add column if not exists lease_renew_seconds int;
alter table ha.state add column if not exists lease_renewal text;
do $$
begin
  if not exists (select 1 from pg_catalog.pg_constraint where conname = 'state_lease_renewal_check'
                   and conrelid = 'ha.state'::regclass) then
    alter table ha.state add constraint state_lease_renewal_check
      check (lease_renewal is null or lease_renewal in ('cron', 'external'));
  end if;
end
$$;

-- Grants this site made to the other one (normally one row: the acting primary).
create table if not exists ha.lease_grants (
  grantee text primary key,
  epoch bigint not null,
  granted_until timestamptz not null,
  granted_at timestamptz not null default now(),
  grants bigint not null default 1
);
revoke all on ha.lease_grants from public, anon, authenticated;

-- On the granting site: records a grant to p_grantee at p_epoch for p_seconds from now, or raises
-- (SQLSTATE 55000) saying why not. The control row lock serializes it with an emergency's wait.
create or replace function ha.record_lease_grant(p_grantee text, p_epoch bigint, p_seconds numeric)
returns timestamptz
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v ha.state;
  v_until timestamptz;
begin
  select * into v from ha.state where id for update;
  if not found then
    raise exception 'this site has no HA control row' using errcode = '55000';
  end if;
  if v.role <> 'standby' or v.fenced then
    raise exception 'site % is % (not the standby): it grants no lease', v.site,
      case when v.fenced then 'fenced' else v.role end using errcode = '55000';
  end if;
  if v.epoch <> p_epoch then
    raise exception 'site % is at epoch %, the request is for epoch %', v.site, v.epoch, p_epoch
      using errcode = '55000';
  end if;
  -- An emergency that replaces the grantee at this epoch (running, or failed closed and so
  -- resumable) stops the grants; one that is over, or about another epoch, does not.
  if exists (select 1 from ha.operations o
             where o.kind = 'emergency' and o.state in ('running', 'failed_closed')
               and o.source_site = p_grantee and o.epoch_from = p_epoch) then
    raise exception 'an emergency failover is replacing site % on site %: no more leases for it', p_grantee, v.site
      using errcode = '55000';
  end if;
  v_until := pg_catalog.clock_timestamp() + make_interval(secs => p_seconds::float8);
  insert into ha.lease_grants as g (grantee, epoch, granted_until, granted_at)
  values (p_grantee, p_epoch, v_until, pg_catalog.clock_timestamp())
  on conflict (grantee) do update
    set epoch = excluded.epoch,
        granted_until = greatest(g.granted_until, excluded.granted_until),
        granted_at = excluded.granted_at,
        grants = g.grants + 1
  returning granted_until into v_until;
  return v_until;
end;
$$;

-- On the granting site, for an emergency failover: waits for any grant in flight (row lock) and
-- returns the last instant a lease granted to p_grantee can last, in this site's clock.
create or replace function ha.last_lease_granted(p_grantee text)
returns timestamptz
language sql
volatile
security invoker
set search_path = ''
as $$
  select (select g.granted_until from ha.lease_grants g where g.grantee = p_grantee)
  from (select 1 from ha.state where id for update) s;
$$;

-- On the primary: extends the lease to now + p_ttl_seconds (never shortens it) while this site is
-- the primary at p_epoch with a finite lease. Returns the new lease_until, or null.
create or replace function ha.extend_lease(p_epoch bigint, p_ttl_seconds numeric)
returns timestamptz
language sql
volatile
security invoker
set search_path = ''
as $$
  update ha.state s
     set lease_until = greatest(coalesce(s.lease_until, '-infinity'),
                                pg_catalog.clock_timestamp() + make_interval(secs => p_ttl_seconds::float8)),
         lease_renewed_at = pg_catalog.clock_timestamp()
   where s.id and s.role = 'primary' and not s.fenced and s.epoch = p_epoch
     and s.lease_ttl_seconds is not null and s.lease_until is distinct from 'infinity'
  returning s.lease_until;
$$;

-- Once this site's lease has run out, ends every session (of any backend type) that still holds
-- a transaction id: the guard already refuses new writes, and this closes what the check at
-- COMMIT cannot (a transaction that ran its check early or keeps working after it). Returns how
-- many it ended. An emergency failover waits one tick interval longer for this.
create or replace function ha.end_writers_after_lease()
returns int
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v ha.state;
  n int;
begin
  select * into v from ha.state where id;
  if v.id is null or v.role <> 'primary' or v.lease_ttl_seconds is null
     or v.lease_until is null or v.lease_until = 'infinity'
     or v.lease_until > pg_catalog.clock_timestamp() then
    return 0;
  end if;
  select count(pg_catalog.pg_terminate_backend(a.pid)) into n
  from pg_catalog.pg_stat_activity a
  where a.backend_xid is not null and a.pid <> pg_catalog.pg_backend_pid()
    and a.datname = pg_catalog.current_database()
    -- vacuum and replication write no application rows (and restart on their own)
    and a.backend_type !~ '^(autovacuum|logical replication|walsender)'
    and (not coalesce((select r.rolsuper from pg_catalog.pg_roles r where r.oid = a.usesysid), false)
         or (select r.rolsuper from pg_catalog.pg_roles r where r.rolname = current_user));
  if n > 0 then
    raise warning 'ha: the write lease ran out at %: ended % session(s) still holding a transaction', v.lease_until, n;
  end if;
  return n;
end;
$$;

-- The pg_cron job: the acting primary ends what still writes after its lease ran out, then asks
-- the other region's failover function to renew its lease (or, with the lease off, checks in).
-- Asynchronous (pg_net); returns the request id or null.
create or replace function ha.lease_tick()
returns bigint
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v ha.state;
  v_token text;
begin
  perform ha.end_writers_after_lease();
  select * into v from ha.state where id;
  if not found or v.role <> 'primary' or v.fenced or v.lease_url is null then
    return null;
  end if;
  if to_regprocedure('net.http_post(text, jsonb, jsonb, jsonb, integer)') is null
     or to_regclass('vault.decrypted_secrets') is null then
    raise warning 'ha.lease_tick: pg_net and Vault are needed to renew the write lease';
    return null;
  end if;
  execute 'select s.decrypted_secret from vault.decrypted_secrets s where s.name = $1 limit 1'
    into v_token using 'ha_lease_token';
  if v_token is null then
    raise warning 'ha.lease_tick: Vault has no secret named ha_lease_token (run POST /failover/setup again)';
    return null;
  end if;
  return net.http_post(
    url := v.lease_url,
    body := jsonb_build_object('site', v.site, 'epoch', v.epoch),
    headers := jsonb_build_object('Content-Type', 'application/json', 'Authorization', 'Bearer ' || v_token),
    timeout_milliseconds := 4000
  );
end;
$$;

-- Schedules ha_lease_tick every p_every with pg_cron 1.5+ (seconds schedules). Returns the
-- schedule, or null (with a notice) when pg_cron cannot run it that often.
create or replace function ha.schedule_lease_tick(p_seconds int default 5)
returns text
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_version numeric;
begin
  if p_seconds < 1 or p_seconds > 59 then
    raise exception 'the lease tick runs every 1 to 59 seconds' using errcode = '22023';
  end if;
  select (substring(e.extversion from '^(\d+\.\d+)'))::numeric into v_version
  from pg_catalog.pg_extension e where e.extname = 'pg_cron';
  if v_version is null or to_regnamespace('cron') is null or v_version < 1.5 then
    raise notice 'pg_cron 1.5+ is needed to renew the write lease every % seconds (have: %)', p_seconds,
      coalesce(v_version::text, 'none');
    return null;
  end if;
  -- The session lifts the read-only default for itself: a stale primary whose database was made
  -- read-only still has to check in (and be fenced), and the request is only queued for pg_net.
  perform cron.schedule('ha_lease_tick', format('%s seconds', p_seconds),
    'set statement_timeout = ''2s''; set default_transaction_read_only = off; select ha.lease_tick()');
  return format('%s seconds', p_seconds);
end;
$$;

-- Only a writable primary stamps the heartbeat: a site whose lease expired or whose fence was
-- raised must not make the standby believe it is still current.
create or replace function ha.beat()
returns timestamptz
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_state ha.state;
  v_token bigint;
  v_at timestamptz := clock_timestamp();
begin
  select * into v_state from ha.state where id;
  select w.last_value into v_token from ha.write_token w;
  if v_state.id is null or pg_catalog.pg_is_in_recovery()
     or ha.fence_reason(v_state, v_token) is not null then
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
        where d.jobid = j.jobid and j.jobname in ('ha_heartbeat', 'ha_lease_tick') and d.end_time < now() - interval '1 hour';
      exception when insufficient_privilege then
        null;
      end;
    end if;
  end if;
  return v_at;
end;
$$;

revoke all on function ha.record_lease_grant(text, bigint, numeric) from public;
revoke all on function ha.last_lease_granted(text) from public;
revoke all on function ha.extend_lease(bigint, numeric) from public;
revoke all on function ha.end_writers_after_lease() from public;
revoke all on function ha.lease_tick() from public;
revoke all on function ha.schedule_lease_tick(int) from public;
revoke all on function ha.beat() from public;
