-- Batch telemetry: collectors (sample, snapshot) and table tracking.
--
-- Design rules, each fixing something the replaced tool got wrong:
--   * sample() is one SQL statement: pg_stat_activity is read once (MATERIALIZED) and feeds every
--     insert; pg_blocking_pids() runs only for sessions waiting on a Lock; no temp tables.
--   * Collectors never wait behind DDL: lock_timeout is 100 ms, and a tracked table held or
--     awaited in AccessExclusiveLock mode is not sized (pg_relation_size would queue behind it).
--   * snapshot() reads each statistics view in its own block, so a missing view or column on one
--     PostgreSQL version costs that section only, and the gap is written to `coverage`.
--   * Views and columns are probed (to_regclass, pg_attribute), not inferred from the version.
--   * statement_timeout cannot be armed from inside a function; the pg_cron commands set it.
--   * Everything is SECURITY INVOKER with an empty search_path; pg_cron runs it as `postgres`,
--     which reads every session through pg_read_all_stats.

-- The relation itself, or for a partitioned table its leaf partitions, found through pg_inherits
-- (pg_partition_tree() would lock the relation, and so wait behind DDL).
create or replace function telemetry._leaf_relids(p_relid oid)
returns setof oid
language sql
stable
security invoker
set search_path = ''
as $$
  with recursive tree(relid, relkind) as (
    select c.oid, c.relkind from pg_catalog.pg_class c where c.oid = p_relid
    union all
    select c.oid, c.relkind
    from tree t
    join pg_catalog.pg_inherits i on i.inhparent = t.relid
    join pg_catalog.pg_class c on c.oid = i.inhrelid
    where t.relkind = 'p'
  )
  select t.relid from tree t where t.relkind <> 'p';
$$;

-- Starts tracking a table (or a partitioned table: its leaves are summed). Returns a message.
create or replace function telemetry.track_table(p_table text, p_schema text default 'public')
returns text
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_oid oid;
  v_kind "char";
begin
  select c.oid, c.relkind into v_oid, v_kind
  from pg_catalog.pg_class c
  join pg_catalog.pg_namespace n on n.oid = c.relnamespace
  where n.nspname = p_schema and c.relname = p_table;
  if v_oid is null then
    raise exception 'Table %.% not found', p_schema, p_table
      using errcode = 'undefined_table', hint = 'Names are case-sensitive and not quoted: pass the name as stored.';
  end if;
  if v_kind not in ('r', 'p', 'm') then
    raise exception '%.% is not a table, partitioned table or materialized view', p_schema, p_table
      using errcode = 'wrong_object_type';
  end if;
  insert into telemetry.tracked_tables (relid, schemaname, relname)
  values (v_oid, p_schema, p_table)
  on conflict (relid) do update set schemaname = excluded.schemaname, relname = excluded.relname;
  -- A table dropped and re-created under the same name leaves a stale OID behind: drop it.
  delete from telemetry.tracked_tables t
  where t.schemaname = p_schema and t.relname = p_table and t.relid <> v_oid;
  -- A handful of rows autovacuum never analyzes: keep the planner's estimate true, so snapshot()
  -- drives its lookups from this list instead of scanning pg_class.
  analyze telemetry.tracked_tables;
  return format('Now tracking %I.%I', p_schema, p_table);
end;
$$;

-- Stops tracking a table; matches by the current OID and by the recorded name.
create or replace function telemetry.untrack_table(p_table text, p_schema text default 'public')
returns text
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_count int;
begin
  delete from telemetry.tracked_tables t
  where (t.schemaname = p_schema and t.relname = p_table)
     or t.relid = (
       select c.oid from pg_catalog.pg_class c
       join pg_catalog.pg_namespace n on n.oid = c.relnamespace
       where n.nspname = p_schema and c.relname = p_table
     );
  get diagnostics v_count = row_count;
  if v_count = 0 then
    return format('Table %I.%I was not being tracked', p_schema, p_table);
  end if;
  analyze telemetry.tracked_tables;
  return format('Stopped tracking %I.%I', p_schema, p_table);
end;
$$;

-- Tracked tables with their current names (a rename is followed through the OID).
create or replace function telemetry.list_tracked_tables()
returns table (schemaname text, relname text, added_at timestamptz, relid oid, exists_now boolean)
language sql
stable
security invoker
set search_path = ''
as $$
  select coalesce(n.nspname::text, t.schemaname), coalesce(c.relname::text, t.relname), t.added_at, t.relid, c.oid is not null
  from telemetry.tracked_tables t
  left join pg_catalog.pg_class c on c.oid = t.relid
  left join pg_catalog.pg_namespace n on n.oid = c.relnamespace
  order by t.added_at, t.relid;
$$;

create or replace function telemetry._config(p_key text, p_default text)
returns text
language sql
stable
security invoker
set search_path = ''
as $$
  select coalesce((select nullif(c.value, '') from telemetry.config c where c.key = p_key), p_default);
$$;

-- The sampler. One statement: pg_stat_activity is read once and feeds the sample row, the query
-- texts and the progress rows. Returns the sample's id (null when another sampler holds the lock
-- and p_wait is false).
create or replace function telemetry._sample(p_wait boolean)
returns bigint
language plpgsql
security invoker
set search_path = ''
set lock_timeout = '100ms'
-- nothing here benefits from re-planning per call; reuse one plan per session
set plan_cache_mode = 'force_generic_plan'
as $$
declare
  v_at timestamptz := now();
  v_started timestamptz := pg_catalog.clock_timestamp();
  v_limit int := telemetry._config('sample_session_limit', '25')::int;
  v_threshold interval := telemetry._config('long_running_threshold', '1 second')::interval;
  v_text boolean := telemetry._config('capture_query_text', 'on') in ('on', 'true', '1', 'yes');
  v_privileged boolean := pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'usage');
  v_id bigint;
  v_ms double precision;
begin
  if p_wait then
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('sa_toolkit.telemetry.sample'));
  elsif not pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('sa_toolkit.telemetry.sample')) then
    insert into telemetry.collector_events (collector, event, detail)
    values ('sample', 'skipped', 'another sample() was running');
    return null;
  end if;

  with act as materialized (
    select a.pid, a.backend_type, a.state, a.wait_event_type, a.wait_event, a.usename::text as usename,
           a.application_name, a.xact_start, a.query_start, a.state_change, a.query_id, a.query,
           pg_catalog.age(a.backend_xmin) as xmin_age
    from pg_catalog.pg_stat_activity a
    where a.pid <> pg_catalog.pg_backend_pid()
  ),
  -- pg_blocking_pids() briefly locks the lock manager: call it only for sessions waiting on a Lock.
  lock_waiters as materialized (
    select a.pid, pg_catalog.pg_blocking_pids(a.pid) as blockers
    from act a
    where a.wait_event_type = 'Lock'
    order by a.pid
    limit 100
  ),
  lock_rows as materialized (
    select w.pid, w.blockers, lk.locktype, lk.mode, lk.database, lk.relation, lk.waitstart
    from lock_waiters w
    left join lateral (
      select pl.locktype, pl.mode, pl.database, pl.relation, pl.waitstart
      from pg_catalog.pg_locks pl
      where pl.pid = w.pid and not pl.granted
      limit 1
    ) lk on true
  ),
  blocker_pids as (
    select distinct b.pid from lock_waiters w cross join lateral unnest(w.blockers) as b(pid)
  ),
  -- Wait groups. The idle main loops of background processes (checkpointer, walwriter, launchers,
  -- idle walsenders and extension workers) carry no signal and are not stored; idle client
  -- connections are, as a count.
  waits as (
    select a.backend_type || '|' || coalesce(a.state, '') || '|' || coalesce(a.wait_event_type, '') || '|'
             || coalesce(a.wait_event, '') as k,
           count(*)::int as n
    from act a
    where a.backend_type = 'client backend'
       or not (coalesce(a.wait_event_type, '') = 'Activity'
               or coalesce(a.state, '') = 'idle'
               or (a.state is null and coalesce(a.wait_event_type, '') = 'Extension'))
    group by 1
  ),
  flagged as (
    select a.*,
           (a.wait_event_type = 'Lock' or a.pid in (select b.pid from blocker_pids b)) as in_lock_chain,
           (a.state like 'idle in transaction%') as idle_in_xact,
           (a.xact_start < v_at - v_threshold or (a.state = 'active' and a.query_start < v_at - v_threshold)) as long_running
    from act a
  ),
  ranked as (
    select f.*,
           row_number() over (partition by f.in_lock_chain
                              order by f.idle_in_xact desc, f.xact_start nulls last, f.pid) as rn_part
    from flagged f
    where f.in_lock_chain
       or (f.state is not null and f.state <> 'idle' and (f.idle_in_xact or f.long_running))
  ),
  -- Everything in a lock chain (up to 100) plus up to sample_session_limit other notable sessions.
  notable as materialized (
    select r.*,
           row_number() over (order by r.in_lock_chain desc, r.rn_part) as rn,
           case when v_text and coalesce(r.query, '') <> '' then pg_catalog.hashtextextended(left(r.query, 1000), 0) end
             as text_hash
    from ranked r
    where (r.in_lock_chain and r.rn_part <= 100) or (not r.in_lock_chain and r.rn_part <= v_limit)
  ),
  texts as (
    insert into telemetry.query_texts (hash, query)
    select distinct on (n.text_hash) n.text_hash, left(n.query, 1000)
    from notable n
    where n.text_hash is not null
    on conflict (hash) do nothing
  ),
  s as (
    insert into telemetry.samples (
      captured_at, privileged, backends, wal_lsn, checkpoint_time, wait_keys, wait_counts,
      s_pid, s_backend_type, s_state, s_wait, s_usename, s_application_name,
      s_xact_start, s_query_start, s_state_change, s_xmin_age, s_query_id, s_text_hash,
      l_pid, l_blockers, l_lock_type, l_mode, l_database, l_relation, l_wait_started
    )
    select v_at, v_privileged, (select count(*) from act)::int,
           case when pg_catalog.pg_is_in_recovery() then pg_catalog.pg_last_wal_replay_lsn()
                else pg_catalog.pg_current_wal_lsn() end,
           (pg_catalog.pg_control_checkpoint()).checkpoint_time,
           coalesce((select array_agg(w.k order by w.k) from waits w), '{}'),
           coalesce((select array_agg(w.n order by w.k) from waits w), '{}'),
           coalesce(array_agg(n.pid order by n.rn), '{}'),
           -- null stands for 'client backend' (a null element costs one bit)
           coalesce(array_agg(nullif(n.backend_type, 'client backend') order by n.rn), '{}'),
           coalesce(array_agg(n.state order by n.rn), '{}'),
           coalesce(array_agg(case when n.wait_event_type is not null then n.wait_event_type || ':' || n.wait_event end
                              order by n.rn), '{}'),
           coalesce(array_agg(n.usename order by n.rn), '{}'),
           coalesce(array_agg(n.application_name order by n.rn), '{}'),
           coalesce(array_agg(n.xact_start order by n.rn), '{}'),
           coalesce(array_agg(n.query_start order by n.rn), '{}'),
           coalesce(array_agg(n.state_change order by n.rn), '{}'),
           coalesce(array_agg(n.xmin_age order by n.rn), '{}'),
           coalesce(array_agg(n.query_id order by n.rn), '{}'),
           coalesce(array_agg(n.text_hash order by n.rn), '{}'),
           coalesce((select array_agg(l.pid order by l.pid) from lock_rows l), '{}'),
           coalesce((select array_agg(array_to_string(l.blockers, ',') order by l.pid) from lock_rows l), '{}'),
           coalesce((select array_agg(l.locktype order by l.pid) from lock_rows l), '{}'),
           coalesce((select array_agg(l.mode order by l.pid) from lock_rows l), '{}'),
           coalesce((select array_agg(l.database order by l.pid) from lock_rows l), '{}'),
           coalesce((select array_agg(l.relation order by l.pid) from lock_rows l), '{}'),
           coalesce((select array_agg(l.waitstart order by l.pid) from lock_rows l), '{}')
    from notable n
    returning id
  ),
  p as (
    insert into telemetry.progress_samples (sample_id, captured_at, progress_type, pid, database_oid, relation_oid, phase, details)
    select s.id, v_at, x.kind, (x.j ->> 'pid')::int, (x.j ->> 'datid')::oid, (x.j ->> 'relid')::oid,
           coalesce(x.j ->> 'phase', (x.j ->> 'command') || coalesce('/' || (x.j ->> 'type'), '')),
           x.j - 'pid' - 'datid' - 'datname' - 'relid' - 'phase'
    from s
    cross join (
      select 'vacuum' as kind, to_jsonb(v) as j from pg_catalog.pg_stat_progress_vacuum v
      union all select 'analyze', to_jsonb(v) from pg_catalog.pg_stat_progress_analyze v
      union all select 'copy', to_jsonb(v) from pg_catalog.pg_stat_progress_copy v
      union all select 'create_index', to_jsonb(v) from pg_catalog.pg_stat_progress_create_index v
      union all select 'cluster', to_jsonb(v) from pg_catalog.pg_stat_progress_cluster v
      union all select 'basebackup', to_jsonb(v) from pg_catalog.pg_stat_progress_basebackup v
    ) x
  )
  select s.id into v_id from s;

  v_ms := extract(epoch from pg_catalog.clock_timestamp() - v_started) * 1000;
  if v_ms > 500 then
    insert into telemetry.collector_events (collector, event, detail)
    values ('sample', 'slow', format('sample %s took %s ms', v_id, round(v_ms::numeric, 1)));
  end if;
  return v_id;
end;
$$;

-- Takes a sample now; returns its time (null if another sample() was running).
create or replace function telemetry.sample()
returns timestamptz
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_id bigint := telemetry._sample(false);
begin
  return (select s.captured_at from telemetry.samples s where s.id = v_id);
end;
$$;

-- The snapshot collector; returns the snapshot id. pg_stat_statements is captured when
-- p_statements is true, or when it is null and the last capture is older than
-- config 'statements_interval' (reading and storing the top statements is the costliest part).
create or replace function telemetry._snapshot(p_wait boolean, p_statements boolean default null)
returns bigint
language plpgsql
security invoker
set search_path = ''
set lock_timeout = '100ms'
set plan_cache_mode = 'force_generic_plan'
as $$
declare
  v_at timestamptz := now();
  v_started timestamptz := pg_catalog.clock_timestamp();
  v_id bigint;
  v_cov jsonb := '{}';
  v_ver int := current_setting('server_version_num')::int / 10000;
  v_recovery boolean := pg_catalog.pg_is_in_recovery();
  v_dboid oid := (select d.oid from pg_catalog.pg_database d where d.datname = pg_catalog.current_database());
  v_lsn pg_lsn;
  v_has_io boolean := to_regclass('pg_catalog.pg_stat_io') is not null;
  v_io_bytes boolean;
  w record;
  c record;
  b record;
  d record;
  g record;
  st record;
  v_io_reset timestamptz;
  v_pgss_schema name;
  v_top int := telemetry._config('statements_top_n', '100')::int;
  v_locked oid[];
  v_read_col text;
  v_since text;
  v_ms double precision;
begin
  if p_wait then
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('sa_toolkit.telemetry.snapshot'));
  elsif not pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('sa_toolkit.telemetry.snapshot')) then
    insert into telemetry.collector_events (collector, event, detail)
    values ('snapshot', 'skipped', 'another snapshot() was running');
    return null;
  end if;
  v_lsn := case when v_recovery then pg_catalog.pg_last_wal_replay_lsn() else pg_catalog.pg_current_wal_lsn() end;

  -- Every section below may fail on its own (and say why in `coverage`); its fields stay null.
  select null::bigint as wal_records, null::bigint as wal_fpi, null::numeric as wal_bytes, null::bigint as wal_buffers_full,
         null::bigint as wal_write, null::bigint as wal_sync, null::float8 as wal_write_time, null::float8 as wal_sync_time,
         null::timestamptz as stats_reset
  into w;
  select null::bigint as num_timed, null::bigint as num_requested, null::bigint as num_done, null::float8 as write_time,
         null::float8 as sync_time, null::bigint as buffers_written, null::timestamptz as stats_reset
  into c;
  select null::bigint as buffers_clean, null::bigint as maxwritten_clean, null::bigint as buffers_alloc,
         null::bigint as buffers_backend, null::bigint as buffers_backend_fsync, null::timestamptz as stats_reset
  into b;
  select null::bigint as xact_commit, null::bigint as xact_rollback, null::bigint as blks_read, null::bigint as blks_hit,
         null::bigint as tup_inserted, null::bigint as tup_updated, null::bigint as tup_deleted, null::bigint as temp_files,
         null::bigint as temp_bytes, null::bigint as deadlocks, null::float8 as blk_read_time, null::float8 as blk_write_time,
         null::timestamptz as stats_reset
  into d;
  select null::int as av, null::int as slots, null::bigint as retained, pg_catalog.pg_postmaster_start_time() as pm_start
  into g;
  select null::bigint as dealloc, null::timestamptz as stats_reset into st;

  -- WAL: pg_stat_wal; on 18+ the write/sync counters and times moved to pg_stat_io (object = wal).
  -- Statements in branches that do not run are never parsed against the catalog, so each branch
  -- may name columns that only its versions have.
  begin
    if exists (select 1 from pg_catalog.pg_attribute a
               where a.attrelid = 'pg_catalog.pg_stat_wal'::regclass and a.attname = 'wal_write_time' and not a.attisdropped) then
      select x.wal_records, x.wal_fpi, x.wal_bytes, x.wal_buffers_full, x.wal_write, x.wal_sync, x.wal_write_time,
             x.wal_sync_time, x.stats_reset
      into w from pg_catalog.pg_stat_wal x;
    else
      select s.wal_records, s.wal_fpi, s.wal_bytes, s.wal_buffers_full, io.writes as wal_write, io.fsyncs as wal_sync,
             io.write_time as wal_write_time, io.fsync_time as wal_sync_time, s.stats_reset
      into w
      from pg_catalog.pg_stat_wal s
      cross join (select sum(x.writes)::bigint as writes, sum(x.fsyncs)::bigint as fsyncs, sum(x.write_time) as write_time,
                         sum(x.fsync_time) as fsync_time
                  from pg_catalog.pg_stat_io x where x.object = 'wal') io;
      v_cov := v_cov || '{"wal_write_time": "from pg_stat_io (object=wal)"}';
    end if;
  exception when others then
    v_cov := v_cov || jsonb_build_object('pg_stat_wal', sqlerrm);
  end;

  -- Checkpoints: pg_stat_checkpointer on 17+ (num_done on 18+), pg_stat_bgwriter before.
  -- Background writer: buffers_backend(_fsync) were removed in 17 and are rebuilt from pg_stat_io.
  begin
    if to_regclass('pg_catalog.pg_stat_checkpointer') is not null then
      if v_ver >= 18 then
        select x.num_timed, x.num_requested, x.num_done, x.write_time, x.sync_time, x.buffers_written, x.stats_reset
        into c from pg_catalog.pg_stat_checkpointer x;
      else
        select x.num_timed, x.num_requested, null::bigint as num_done, x.write_time, x.sync_time, x.buffers_written,
               x.stats_reset
        into c from pg_catalog.pg_stat_checkpointer x;
      end if;
      select bw.buffers_clean, bw.maxwritten_clean, bw.buffers_alloc, io.writes as buffers_backend,
             io.fsyncs as buffers_backend_fsync, bw.stats_reset
      into b
      from pg_catalog.pg_stat_bgwriter bw
      cross join (select sum(x.writes)::bigint as writes, sum(x.fsyncs)::bigint as fsyncs
                  from pg_catalog.pg_stat_io x
                  where x.object = 'relation' and x.backend_type not in ('checkpointer', 'background writer')) io;
      v_cov := v_cov || '{"bgw_buffers_backend": "rebuilt from pg_stat_io writes by backends"}';
    else
      select x.checkpoints_timed as num_timed, x.checkpoints_req as num_requested, null::bigint as num_done,
             x.checkpoint_write_time as write_time, x.checkpoint_sync_time as sync_time,
             x.buffers_checkpoint as buffers_written, x.stats_reset,
             x.buffers_clean, x.maxwritten_clean, x.buffers_alloc, x.buffers_backend, x.buffers_backend_fsync
      into c from pg_catalog.pg_stat_bgwriter x;
      select c.buffers_clean, c.maxwritten_clean, c.buffers_alloc, c.buffers_backend, c.buffers_backend_fsync, c.stats_reset
      into b;
    end if;
  exception when others then
    v_cov := v_cov || jsonb_build_object('checkpointer', sqlerrm);
  end;

  begin
    select x.xact_commit, x.xact_rollback, x.blks_read, x.blks_hit, x.tup_inserted, x.tup_updated, x.tup_deleted,
           x.temp_files, x.temp_bytes, x.deadlocks, x.blk_read_time, x.blk_write_time, x.stats_reset
    into d
    from pg_catalog.pg_stat_database x
    where x.datid = v_dboid;
    select (select count(*) from pg_catalog.pg_stat_activity a where a.backend_type = 'autovacuum worker')::int as av,
           count(*)::int as slots,
           max(pg_catalog.pg_wal_lsn_diff(v_lsn, s.restart_lsn))::bigint as retained,
           pg_catalog.pg_postmaster_start_time() as pm_start
    into g
    from pg_catalog.pg_replication_slots s;
  exception when others then
    v_cov := v_cov || jsonb_build_object('pg_stat_database', sqlerrm);
  end;

  if v_has_io then
    begin
      select max(x.stats_reset) into v_io_reset from pg_catalog.pg_stat_io x;
    exception when others then
      v_cov := v_cov || jsonb_build_object('pg_stat_io', sqlerrm);
    end;
  else
    v_cov := v_cov || '{"pg_stat_io": "not available before PostgreSQL 16"}';
  end if;

  -- pg_stat_statements lives in whatever schema it was installed into (extensions on Supabase).
  select n.nspname into v_pgss_schema
  from pg_catalog.pg_extension e join pg_catalog.pg_namespace n on n.oid = e.extnamespace
  where e.extname = 'pg_stat_statements';
  -- Statements are captured at most every statements_interval (and at run boundaries).
  if v_pgss_schema is not null and not coalesce(p_statements, not exists (
       select 1 from telemetry.statement_snapshots ss
       join telemetry.snapshots x on x.id = ss.snapshot_id
       where x.captured_at > v_at - telemetry._config('statements_interval', '15 minutes')::interval)) then
    v_pgss_schema := null;
  elsif v_pgss_schema is not null then
    begin
      execute format('select dealloc, stats_reset from %I.pg_stat_statements_info', v_pgss_schema) into st;
    exception when others then
      v_cov := v_cov || jsonb_build_object('pg_stat_statements', sqlerrm);
      v_pgss_schema := null;
    end;
  else
    v_cov := v_cov || '{"pg_stat_statements": "not installed"}';
  end if;

  insert into telemetry.snapshots (
    captured_at, pg_version, postmaster_start, in_recovery, wal_lsn,
    wal_records, wal_fpi, wal_bytes, wal_buffers_full, wal_write, wal_sync, wal_write_time, wal_sync_time, wal_stats_reset,
    checkpoint_lsn, checkpoint_time, ckpt_timed, ckpt_requested, ckpt_done, ckpt_write_time, ckpt_sync_time, ckpt_buffers,
    checkpointer_stats_reset,
    bgw_buffers_clean, bgw_maxwritten_clean, bgw_buffers_alloc, bgw_buffers_backend, bgw_buffers_backend_fsync,
    bgwriter_stats_reset,
    db_xact_commit, db_xact_rollback, db_blks_read, db_blks_hit, db_tup_inserted, db_tup_updated, db_tup_deleted,
    temp_files, temp_bytes, deadlocks, db_blk_read_time, db_blk_write_time, db_stats_reset,
    io_stats_reset, autovacuum_workers, slots_count, slots_max_retained_wal,
    statements_stats_reset, statements_dealloc, coverage
  )
  select
    v_at, v_ver, coalesce(g.pm_start, pg_catalog.pg_postmaster_start_time()), v_recovery, v_lsn,
    w.wal_records, w.wal_fpi, w.wal_bytes, w.wal_buffers_full, w.wal_write, w.wal_sync, w.wal_write_time, w.wal_sync_time,
    w.stats_reset,
    k.redo_lsn, k.checkpoint_time, c.num_timed, c.num_requested, c.num_done, c.write_time, c.sync_time, c.buffers_written,
    c.stats_reset,
    b.buffers_clean, b.maxwritten_clean, b.buffers_alloc, b.buffers_backend, b.buffers_backend_fsync, b.stats_reset,
    d.xact_commit, d.xact_rollback, d.blks_read, d.blks_hit, d.tup_inserted, d.tup_updated, d.tup_deleted,
    d.temp_files, d.temp_bytes, d.deadlocks, d.blk_read_time, d.blk_write_time, d.stats_reset,
    v_io_reset, g.av, g.slots, g.retained,
    st.stats_reset, st.dealloc, v_cov
  from pg_catalog.pg_control_checkpoint() k
  returning id into v_id;

  -- pg_stat_io rows with any activity; 16/17 count operations of op_bytes, 18 reports bytes.
  if v_has_io then
    begin
      if v_ver >= 18 then
        insert into telemetry.io_snapshots
        select v_id, array_agg(x.backend_type || '|' || x.object || '|' || x.context), array_agg(coalesce(x.reads, 0)),
               array_agg(coalesce(x.read_bytes, 0)), array_agg(coalesce(x.read_time, 0)), array_agg(coalesce(x.writes, 0)),
               array_agg(coalesce(x.write_bytes, 0)), array_agg(coalesce(x.write_time, 0)),
               array_agg(coalesce(x.writebacks, 0)), array_agg(coalesce(x.extends, 0)),
               array_agg(coalesce(x.extend_bytes, 0)), array_agg(coalesce(x.hits, 0)), array_agg(coalesce(x.evictions, 0)),
               array_agg(coalesce(x.reuses, 0)), array_agg(coalesce(x.fsyncs, 0)), array_agg(coalesce(x.fsync_time, 0))
        from pg_catalog.pg_stat_io x
        where greatest(x.reads, x.writes, x.writebacks, x.extends, x.hits, x.evictions, x.reuses, x.fsyncs) > 0
        having count(*) > 0;
      else
        insert into telemetry.io_snapshots
        select v_id, array_agg(x.backend_type || '|' || x.object || '|' || x.context), array_agg(coalesce(x.reads, 0)),
               array_agg(coalesce(x.reads * x.op_bytes, 0)), array_agg(coalesce(x.read_time, 0)),
               array_agg(coalesce(x.writes, 0)), array_agg(coalesce(x.writes * x.op_bytes, 0)),
               array_agg(coalesce(x.write_time, 0)), array_agg(coalesce(x.writebacks, 0)), array_agg(coalesce(x.extends, 0)),
               array_agg(coalesce(x.extends * x.op_bytes, 0)), array_agg(coalesce(x.hits, 0)),
               array_agg(coalesce(x.evictions, 0)), array_agg(coalesce(x.reuses, 0)), array_agg(coalesce(x.fsyncs, 0)),
               array_agg(coalesce(x.fsync_time, 0))
        from pg_catalog.pg_stat_io x
        where greatest(x.reads, x.writes, x.writebacks, x.extends, x.hits, x.evictions, x.reuses, x.fsyncs) > 0
        having count(*) > 0;
      end if;
    exception when others then
      update telemetry.snapshots set coverage = coverage || jsonb_build_object('io_snapshots', sqlerrm) where id = v_id;
    end;
  end if;

  -- Tracked tables in one statement. Counters come straight from the pg_stat_get_* functions
  -- (the pg_stat views around them join half the catalog). A relation held or awaited in
  -- AccessExclusiveLock mode is not sized; if such a lock arrives between the check and the
  -- sizing, lock_timeout fires and the counters are stored without sizes.
  v_locked := array(
    select l.relation from pg_catalog.pg_locks l
    where l.locktype = 'relation' and l.mode = 'AccessExclusiveLock' and l.database = v_dboid
      and l.pid <> pg_catalog.pg_backend_pid()
  );
  for attempt in 1..2 loop
    begin
      insert into telemetry.table_snapshots (
        snapshot_id, relid, schemaname, relname, relkind, relfilenode,
        pg_relation_size, pg_total_relation_size, pg_indexes_size, size_skipped,
        n_live_tup, n_dead_tup, n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd, seq_scan, idx_scan,
        heap_blks_read, heap_blks_hit, last_vacuum, last_autovacuum, last_analyze, last_autoanalyze,
        vacuum_count, autovacuum_count, analyze_count, autoanalyze_count
      )
      select v_id, tt.relid, n.nspname, cl.relname, cl.relkind, cl.relfilenode,
             sz.heap, sz.total, sz.idx, lk.skip,
             cnt.live, cnt.dead, cnt.ins, cnt.upd, cnt.del, cnt.hot, cnt.seq, cnt.idx_scan, cnt.blks_read, cnt.blks_hit,
             cnt.last_vacuum, cnt.last_autovacuum, cnt.last_analyze, cnt.last_autoanalyze,
             cnt.vacuum_count, cnt.autovacuum_count, cnt.analyze_count, cnt.autoanalyze_count
      from telemetry.tracked_tables tt
      join pg_catalog.pg_class cl on cl.oid = tt.relid
      join pg_catalog.pg_namespace n on n.oid = cl.relnamespace
      cross join lateral (
        select case when cl.relkind = 'p'
                    then (select array_agg(x) from telemetry._leaf_relids(tt.relid) as x)
                    else array[tt.relid] end as leaves
      ) lv
      cross join lateral (
        select attempt = 2
            or (cardinality(v_locked) > 0
                and (tt.relid = any(v_locked)
                     or lv.leaves && v_locked
                     or exists (select 1 from pg_catalog.pg_index i
                                where i.indrelid = any(lv.leaves) and i.indexrelid = any(v_locked))))
          as skip
      ) lk
      cross join lateral (
        select sum(pg_catalog.pg_relation_size(r))::bigint as heap,
               sum(pg_catalog.pg_total_relation_size(r))::bigint as total,
               sum(pg_catalog.pg_indexes_size(r))::bigint as idx
        from unnest(lv.leaves) as r
        where not lk.skip
      ) sz
      cross join lateral (
        select sum(pg_catalog.pg_stat_get_live_tuples(r))::bigint as live,
               sum(pg_catalog.pg_stat_get_dead_tuples(r))::bigint as dead,
               sum(pg_catalog.pg_stat_get_tuples_inserted(r))::bigint as ins,
               sum(pg_catalog.pg_stat_get_tuples_updated(r))::bigint as upd,
               sum(pg_catalog.pg_stat_get_tuples_deleted(r))::bigint as del,
               sum(pg_catalog.pg_stat_get_tuples_hot_updated(r))::bigint as hot,
               sum(pg_catalog.pg_stat_get_numscans(r))::bigint as seq,
               case when cl.relkind = 'p'
                    then (select sum(pg_catalog.pg_stat_get_numscans(i.indexrelid))::bigint
                          from pg_catalog.pg_index i where i.indrelid = any(lv.leaves))
                    else (select sum(pg_catalog.pg_stat_get_numscans(i.indexrelid))::bigint
                          from pg_catalog.pg_index i where i.indrelid = tt.relid)
               end as idx_scan,
               sum(pg_catalog.pg_stat_get_blocks_fetched(r) - pg_catalog.pg_stat_get_blocks_hit(r))::bigint as blks_read,
               sum(pg_catalog.pg_stat_get_blocks_hit(r))::bigint as blks_hit,
               max(pg_catalog.pg_stat_get_last_vacuum_time(r)) as last_vacuum,
               max(pg_catalog.pg_stat_get_last_autovacuum_time(r)) as last_autovacuum,
               max(pg_catalog.pg_stat_get_last_analyze_time(r)) as last_analyze,
               max(pg_catalog.pg_stat_get_last_autoanalyze_time(r)) as last_autoanalyze,
               sum(pg_catalog.pg_stat_get_vacuum_count(r))::bigint as vacuum_count,
               sum(pg_catalog.pg_stat_get_autovacuum_count(r))::bigint as autovacuum_count,
               sum(pg_catalog.pg_stat_get_analyze_count(r))::bigint as analyze_count,
               sum(pg_catalog.pg_stat_get_autoanalyze_count(r))::bigint as autoanalyze_count
        from unnest(lv.leaves) as r
      ) cnt;
      exit;
    exception when lock_not_available then
      if attempt = 2 then
        insert into telemetry.collector_events (collector, event, detail)
        values ('snapshot', 'tables_failed', sqlerrm);
      end if;
    end;
  end loop;

  begin
    insert into telemetry.replication_snapshots
    select v_id, r.pid, r.client_addr, r.application_name, r.state, r.sync_state, v_lsn, r.sent_lsn, r.write_lsn,
           r.flush_lsn, r.replay_lsn, r.write_lag, r.flush_lag, r.replay_lag
    from pg_catalog.pg_stat_replication r;
  exception when others then
    update telemetry.snapshots set coverage = coverage || jsonb_build_object('pg_stat_replication', sqlerrm) where id = v_id;
  end;

  -- Top statements by total time in one row, without reading the query-text file; the text is
  -- fetched only for entries seen for the first time.
  if v_pgss_schema is not null then
    begin
      v_read_col := case when v_ver >= 17 then 'shared_blk_read_time' else 'blk_read_time' end;
      v_since := case when v_ver >= 17 then 's.stats_since' else 'null::timestamptz' end;
      execute format($q$
        insert into telemetry.statement_snapshots
        select $1, array_agg(s.queryid), array_agg(s.userid), array_agg(s.dbid), array_agg(s.toplevel), array_agg(s.calls),
               array_agg(s.total_exec_time + s.total_plan_time), array_agg(s.rows), array_agg(s.shared_blks_hit),
               array_agg(s.shared_blks_read), array_agg(s.shared_blks_written), array_agg(s.temp_blks_written),
               array_agg(s.%I), array_agg(s.wal_bytes), array_agg(%s)
        from (select * from %I.pg_stat_statements(false) x
              where x.queryid is not null
              order by x.total_exec_time + x.total_plan_time desc
              limit $2) s
        having count(*) > 0
      $q$, v_read_col, v_since, v_pgss_schema) using v_id, v_top;

      if exists (select 1 from telemetry.statement_snapshots ss cross join lateral unnest(ss.queryid) q(id)
                 where ss.snapshot_id = v_id
                   and not exists (select 1 from telemetry.statement_texts tx where tx.queryid = q.id)) then
        execute format($q$
          insert into telemetry.statement_texts (queryid, query)
          select distinct on (s.queryid) s.queryid, left(s.query, 2000)
          from %I.pg_stat_statements(true) s
          where s.queryid = any((select ss.queryid from telemetry.statement_snapshots ss where ss.snapshot_id = $1)::bigint[])
          on conflict (queryid) do nothing
        $q$, v_pgss_schema) using v_id;
      end if;
    exception when others then
      update telemetry.snapshots set coverage = coverage || jsonb_build_object('statement_snapshots', sqlerrm) where id = v_id;
    end;
  end if;

  v_ms := extract(epoch from pg_catalog.clock_timestamp() - v_started) * 1000;
  if v_ms > 2000 then
    insert into telemetry.collector_events (collector, event, detail)
    values ('snapshot', 'slow', format('snapshot %s took %s ms', v_id, round(v_ms::numeric, 1)));
  end if;
  return v_id;
end;
$$;

-- Takes a snapshot now; returns its time (null if another snapshot() was running).
create or replace function telemetry.snapshot()
returns timestamptz
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_id bigint := telemetry._snapshot(false);
begin
  return (select s.captured_at from telemetry.snapshots s where s.id = v_id);
end;
$$;

revoke all on function telemetry._leaf_relids(oid) from public;
revoke all on function telemetry.track_table(text, text) from public;
revoke all on function telemetry.untrack_table(text, text) from public;
revoke all on function telemetry.list_tracked_tables() from public;
revoke all on function telemetry._config(text, text) from public;
revoke all on function telemetry._sample(boolean) from public;
revoke all on function telemetry.sample() from public;
revoke all on function telemetry._snapshot(boolean, boolean) from public;
revoke all on function telemetry.snapshot() from public;
