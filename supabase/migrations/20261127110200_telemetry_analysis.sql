-- Batch telemetry: reading it back. compare(), table_compare(), wait_summary(),
-- statement_compare(), window functions for any past window, and the upstream views.
--
-- What changed from the tool this replaces:
--   * windows use the nearest snapshots even when they lie inside the window, and say how far each
--     lies from the requested bound (start_offset_seconds / end_offset_seconds);
--   * every delta is reset-aware: a changed stats_reset or a counter that went down means the
--     section was reset, the delta becomes the since-reset value, and `resets` names the section;
--     a postmaster restart is reported as `restarted` (counters survive a clean restart on 15+);
--   * WAL volume comes from the LSN difference, which no reset can corrupt;
--   * waits are averaged over all samples (average active sessions), idle sessions and the idle
--     loops of background processes are left out, active-without-wait is CPU, and idle in
--     transaction is its own class;
--   * the recent_* views are the window functions over the last two hours.

create or replace function telemetry._pretty_bytes(p_bytes numeric)
returns text
language sql
immutable
security invoker
-- no SET clause, so the planner inlines it; it uses only pg_catalog operators and functions
as $$
  select case
    when p_bytes is null then null
    when p_bytes < 0 then '-' || pg_catalog.pg_size_pretty(-p_bytes)
    else pg_catalog.pg_size_pretty(p_bytes)
  end;
$$;

-- A counter's change between two snapshots: the since-reset value when the section was reset or
-- the counter went down (never negative).
create or replace function telemetry._delta(p_start numeric, p_end numeric, p_reset boolean)
returns numeric
language sql
immutable
security invoker
-- no SET clause, so the planner inlines it; it uses only pg_catalog operators and functions
as $$
  select case
    when p_end is null then null
    when p_start is null or p_reset or p_end < p_start then p_end
    else p_end - p_start
  end;
$$;

-- How a sampled session is classified: CPU (active, no wait event), IdleInTransaction (the
-- application holds a transaction open), otherwise the wait event type. Null: not counted.
create or replace function telemetry._wait_class(p_state text, p_wait_event_type text)
returns text
language sql
immutable
security invoker
-- no SET clause, so the planner inlines it; it uses only pg_catalog operators and functions
as $$
  select case
    when p_state = 'idle' then null
    when p_state like 'idle in transaction%' then 'IdleInTransaction'
    -- the main loops of background processes (checkpointer, walwriter, launchers, idle walsenders)
    when p_wait_event_type = 'Activity' then null
    -- extension background workers with no query (pg_cron launcher, pg_net) idle in Extension waits
    when p_state is null and p_wait_event_type = 'Extension' then null
    when p_wait_event_type is null or p_wait_event_type = '' then 'CPU'
    else p_wait_event_type
  end;
$$;

-- The two snapshots that bracket a window: the latest at or before the start (else the first
-- inside), and the earliest at or after the end (else the last inside). No row when fewer than two.
-- Bounds are widened by a millisecond: clients (JavaScript dates, ISO strings) often carry
-- millisecond precision while snapshot times carry microseconds.
create or replace function telemetry._window_snapshots(
  p_start timestamptz,
  p_end timestamptz,
  p_with_statements boolean default false
)
returns table (start_id bigint, end_id bigint)
rows 1
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  with b as (
    select p_start + interval '1 millisecond' as lo, p_end - interval '1 millisecond' as hi
  ), x as not materialized (
    select sn.id, sn.captured_at
    from telemetry.snapshots sn
    where not p_with_statements
       or exists (select 1 from telemetry.statement_snapshots ss where ss.snapshot_id = sn.id)
  ), s as (
    select coalesce(
      (select x.id from x, b where x.captured_at <= b.lo order by x.captured_at desc, x.id desc limit 1),
      (select x.id from x, b where x.captured_at > b.lo and x.captured_at < b.hi order by x.captured_at, x.id limit 1)
    ) as id
  ), e as (
    select coalesce(
      (select x.id from x, b where x.captured_at >= b.hi order by x.captured_at, x.id limit 1),
      (select x.id from x, b where x.captured_at < b.hi and x.captured_at > b.lo
       order by x.captured_at desc, x.id desc limit 1)
    ) as id
  )
  select s.id, e.id from s, e where s.id is not null and e.id is not null and s.id < e.id;
$$;

-- Reset-aware deltas between two snapshots (the core of compare() and the deltas view).
create or replace function telemetry._snapshot_pair(p_start_id bigint, p_end_id bigint)
returns table (
  start_snapshot_at timestamptz,
  end_snapshot_at timestamptz,
  elapsed_seconds numeric,
  pg_version int,
  restarted boolean,
  resets text[],
  checkpoint_occurred boolean,
  ckpt_timed_delta numeric,
  ckpt_requested_delta numeric,
  ckpt_done_delta numeric,
  ckpt_write_time_ms numeric,
  ckpt_sync_time_ms numeric,
  ckpt_buffers_delta numeric,
  wal_bytes_delta numeric,
  wal_bytes_pretty text,
  wal_records_delta numeric,
  wal_fpi_delta numeric,
  wal_buffers_full_delta numeric,
  wal_write_time_ms numeric,
  wal_sync_time_ms numeric,
  bgw_buffers_clean_delta numeric,
  bgw_maxwritten_clean_delta numeric,
  bgw_buffers_alloc_delta numeric,
  bgw_buffers_backend_delta numeric,
  bgw_buffers_backend_fsync_delta numeric,
  autovacuum_workers_active int,
  slots_count int,
  slots_max_retained_wal bigint,
  slots_max_retained_pretty text,
  io_ckpt_writes_delta numeric,
  io_ckpt_write_time_ms numeric,
  io_ckpt_fsyncs_delta numeric,
  io_ckpt_fsync_time_ms numeric,
  io_autovacuum_writes_delta numeric,
  io_autovacuum_write_time_ms numeric,
  io_client_writes_delta numeric,
  io_client_write_time_ms numeric,
  io_client_reads_delta numeric,
  io_client_read_time_ms numeric,
  io_client_extends_delta numeric,
  io_client_evictions_delta numeric,
  io_bgwriter_writes_delta numeric,
  io_bgwriter_write_time_ms numeric,
  temp_files_delta numeric,
  temp_bytes_delta numeric,
  temp_bytes_pretty text,
  deadlocks_delta numeric,
  xact_commit_delta numeric,
  xact_rollback_delta numeric,
  blks_read_delta numeric,
  blks_hit_delta numeric,
  blk_read_time_ms numeric,
  blk_write_time_ms numeric,
  tup_inserted_delta numeric,
  tup_updated_delta numeric,
  tup_deleted_delta numeric
)
rows 1
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  with s as (select * from telemetry.snapshots where id = p_start_id),
  e as (select * from telemetry.snapshots where id = p_end_id),
  io as (
    select x.snapshot_id, split_part(u.key, '|', 1) as backend_type,
           sum(u.writes) as writes, sum(u.write_time) as write_time, sum(u.fsyncs) as fsyncs,
           sum(u.fsync_time) as fsync_time, sum(u.reads) as reads, sum(u.read_time) as read_time,
           sum(u.extends) as extends, sum(u.evictions) as evictions
    from telemetry.io_snapshots x
    cross join lateral unnest(x.keys, x.writes, x.write_time, x.fsyncs, x.fsync_time, x.reads, x.read_time,
                              x.extends, x.evictions)
      as u(key, writes, write_time, fsyncs, fsync_time, reads, read_time, extends, evictions)
    where x.snapshot_id in (p_start_id, p_end_id) and split_part(u.key, '|', 2) = 'relation'
    group by 1, 2
  ),
  f as (
    select s.postmaster_start is distinct from e.postmaster_start as restarted,
           (s.wal_stats_reset is distinct from e.wal_stats_reset or e.wal_records < s.wal_records) as wal_r,
           (s.checkpointer_stats_reset is distinct from e.checkpointer_stats_reset
             or e.ckpt_timed < s.ckpt_timed or e.ckpt_requested < s.ckpt_requested) as ckpt_r,
           (s.bgwriter_stats_reset is distinct from e.bgwriter_stats_reset or e.bgw_buffers_alloc < s.bgw_buffers_alloc) as bgw_r,
           (s.db_stats_reset is distinct from e.db_stats_reset or e.db_xact_commit < s.db_xact_commit
             or e.temp_files < s.temp_files) as db_r,
           (s.io_stats_reset is distinct from e.io_stats_reset
             or exists (select 1 from io a join io b on a.backend_type = b.backend_type
                        where a.snapshot_id = p_start_id and b.snapshot_id = p_end_id
                          and (b.writes < a.writes or b.reads < a.reads))) as io_r
    from s, e
  )
  select
    s.captured_at, e.captured_at,
    round(extract(epoch from e.captured_at - s.captured_at)::numeric, 3),
    e.pg_version,
    f.restarted,
    array_remove(array[
      case when f.wal_r then 'wal' end,
      case when f.ckpt_r then 'checkpointer' end,
      case when f.bgw_r then 'bgwriter' end,
      case when f.db_r then 'database' end,
      case when f.io_r then 'io' end
    ], null),
    s.checkpoint_time is distinct from e.checkpoint_time,
    telemetry._delta(s.ckpt_timed, e.ckpt_timed, f.ckpt_r),
    telemetry._delta(s.ckpt_requested, e.ckpt_requested, f.ckpt_r),
    telemetry._delta(s.ckpt_done, e.ckpt_done, f.ckpt_r),
    round(telemetry._delta(s.ckpt_write_time::numeric, e.ckpt_write_time::numeric, f.ckpt_r), 3),
    round(telemetry._delta(s.ckpt_sync_time::numeric, e.ckpt_sync_time::numeric, f.ckpt_r), 3),
    telemetry._delta(s.ckpt_buffers, e.ckpt_buffers, f.ckpt_r),
    pg_catalog.pg_wal_lsn_diff(e.wal_lsn, s.wal_lsn),
    telemetry._pretty_bytes(pg_catalog.pg_wal_lsn_diff(e.wal_lsn, s.wal_lsn)),
    telemetry._delta(s.wal_records, e.wal_records, f.wal_r),
    telemetry._delta(s.wal_fpi, e.wal_fpi, f.wal_r),
    telemetry._delta(s.wal_buffers_full, e.wal_buffers_full, f.wal_r),
    round(telemetry._delta(s.wal_write_time::numeric, e.wal_write_time::numeric, f.wal_r or (e.pg_version >= 18 and f.io_r)), 3),
    round(telemetry._delta(s.wal_sync_time::numeric, e.wal_sync_time::numeric, f.wal_r or (e.pg_version >= 18 and f.io_r)), 3),
    telemetry._delta(s.bgw_buffers_clean, e.bgw_buffers_clean, f.bgw_r),
    telemetry._delta(s.bgw_maxwritten_clean, e.bgw_maxwritten_clean, f.bgw_r),
    telemetry._delta(s.bgw_buffers_alloc, e.bgw_buffers_alloc, f.bgw_r),
    telemetry._delta(s.bgw_buffers_backend, e.bgw_buffers_backend, case when e.pg_version >= 17 then f.io_r else f.bgw_r end),
    telemetry._delta(s.bgw_buffers_backend_fsync, e.bgw_buffers_backend_fsync, case when e.pg_version >= 17 then f.io_r else f.bgw_r end),
    e.autovacuum_workers,
    e.slots_count,
    greatest(s.slots_max_retained_wal, e.slots_max_retained_wal),
    telemetry._pretty_bytes(greatest(s.slots_max_retained_wal, e.slots_max_retained_wal)),
    telemetry._delta(ia.ck_w, ib.ck_w, f.io_r), round(telemetry._delta(ia.ck_wt, ib.ck_wt, f.io_r), 3),
    telemetry._delta(ia.ck_f, ib.ck_f, f.io_r), round(telemetry._delta(ia.ck_ft, ib.ck_ft, f.io_r), 3),
    telemetry._delta(ia.av_w, ib.av_w, f.io_r), round(telemetry._delta(ia.av_wt, ib.av_wt, f.io_r), 3),
    telemetry._delta(ia.cl_w, ib.cl_w, f.io_r), round(telemetry._delta(ia.cl_wt, ib.cl_wt, f.io_r), 3),
    telemetry._delta(ia.cl_r, ib.cl_r, f.io_r), round(telemetry._delta(ia.cl_rt, ib.cl_rt, f.io_r), 3),
    telemetry._delta(ia.cl_x, ib.cl_x, f.io_r), telemetry._delta(ia.cl_e, ib.cl_e, f.io_r),
    telemetry._delta(ia.bg_w, ib.bg_w, f.io_r), round(telemetry._delta(ia.bg_wt, ib.bg_wt, f.io_r), 3),
    telemetry._delta(s.temp_files, e.temp_files, f.db_r),
    telemetry._delta(s.temp_bytes, e.temp_bytes, f.db_r),
    telemetry._pretty_bytes(telemetry._delta(s.temp_bytes, e.temp_bytes, f.db_r)),
    telemetry._delta(s.deadlocks, e.deadlocks, f.db_r),
    telemetry._delta(s.db_xact_commit, e.db_xact_commit, f.db_r),
    telemetry._delta(s.db_xact_rollback, e.db_xact_rollback, f.db_r),
    telemetry._delta(s.db_blks_read, e.db_blks_read, f.db_r),
    telemetry._delta(s.db_blks_hit, e.db_blks_hit, f.db_r),
    round(telemetry._delta(s.db_blk_read_time::numeric, e.db_blk_read_time::numeric, f.db_r), 3),
    round(telemetry._delta(s.db_blk_write_time::numeric, e.db_blk_write_time::numeric, f.db_r), 3),
    telemetry._delta(s.db_tup_inserted, e.db_tup_inserted, f.db_r),
    telemetry._delta(s.db_tup_updated, e.db_tup_updated, f.db_r),
    telemetry._delta(s.db_tup_deleted, e.db_tup_deleted, f.db_r)
  from s, e, f,
  lateral (
    select
      sum(writes) filter (where backend_type = 'checkpointer')::numeric as ck_w,
      sum(write_time) filter (where backend_type = 'checkpointer')::numeric as ck_wt,
      sum(fsyncs) filter (where backend_type = 'checkpointer')::numeric as ck_f,
      sum(fsync_time) filter (where backend_type = 'checkpointer')::numeric as ck_ft,
      sum(writes) filter (where backend_type = 'autovacuum worker')::numeric as av_w,
      sum(write_time) filter (where backend_type = 'autovacuum worker')::numeric as av_wt,
      sum(writes) filter (where backend_type = 'client backend')::numeric as cl_w,
      sum(write_time) filter (where backend_type = 'client backend')::numeric as cl_wt,
      sum(reads) filter (where backend_type = 'client backend')::numeric as cl_r,
      sum(read_time) filter (where backend_type = 'client backend')::numeric as cl_rt,
      sum(extends) filter (where backend_type = 'client backend')::numeric as cl_x,
      sum(evictions) filter (where backend_type = 'client backend')::numeric as cl_e,
      sum(writes) filter (where backend_type = 'background writer')::numeric as bg_w,
      sum(write_time) filter (where backend_type = 'background writer')::numeric as bg_wt
    from io where io.snapshot_id = p_start_id
  ) ia,
  lateral (
    select
      sum(writes) filter (where backend_type = 'checkpointer')::numeric as ck_w,
      sum(write_time) filter (where backend_type = 'checkpointer')::numeric as ck_wt,
      sum(fsyncs) filter (where backend_type = 'checkpointer')::numeric as ck_f,
      sum(fsync_time) filter (where backend_type = 'checkpointer')::numeric as ck_ft,
      sum(writes) filter (where backend_type = 'autovacuum worker')::numeric as av_w,
      sum(write_time) filter (where backend_type = 'autovacuum worker')::numeric as av_wt,
      sum(writes) filter (where backend_type = 'client backend')::numeric as cl_w,
      sum(write_time) filter (where backend_type = 'client backend')::numeric as cl_wt,
      sum(reads) filter (where backend_type = 'client backend')::numeric as cl_r,
      sum(read_time) filter (where backend_type = 'client backend')::numeric as cl_rt,
      sum(extends) filter (where backend_type = 'client backend')::numeric as cl_x,
      sum(evictions) filter (where backend_type = 'client backend')::numeric as cl_e,
      sum(writes) filter (where backend_type = 'background writer')::numeric as bg_w,
      sum(write_time) filter (where backend_type = 'background writer')::numeric as bg_wt
    from io where io.snapshot_id = p_end_id
  ) ib;
$$;

-- Counters between the snapshots nearest a window, reset-aware. Offsets say how far the chosen
-- snapshots lie from the requested bounds (negative: before). No row when fewer than two
-- snapshots exist around the window: take one with telemetry.snapshot() or use runs.
create or replace function telemetry.compare(p_start_time timestamptz, p_end_time timestamptz)
returns table (
  start_snapshot_at timestamptz,
  end_snapshot_at timestamptz,
  elapsed_seconds numeric,
  start_offset_seconds numeric,
  end_offset_seconds numeric,
  pg_version int,
  restarted boolean,
  resets text[],
  checkpoint_occurred boolean,
  ckpt_timed_delta numeric,
  ckpt_requested_delta numeric,
  ckpt_done_delta numeric,
  ckpt_write_time_ms numeric,
  ckpt_sync_time_ms numeric,
  ckpt_buffers_delta numeric,
  wal_bytes_delta numeric,
  wal_bytes_pretty text,
  wal_records_delta numeric,
  wal_fpi_delta numeric,
  wal_buffers_full_delta numeric,
  wal_write_time_ms numeric,
  wal_sync_time_ms numeric,
  bgw_buffers_clean_delta numeric,
  bgw_maxwritten_clean_delta numeric,
  bgw_buffers_alloc_delta numeric,
  bgw_buffers_backend_delta numeric,
  bgw_buffers_backend_fsync_delta numeric,
  autovacuum_workers_active int,
  slots_count int,
  slots_max_retained_wal bigint,
  slots_max_retained_pretty text,
  io_ckpt_writes_delta numeric,
  io_ckpt_write_time_ms numeric,
  io_ckpt_fsyncs_delta numeric,
  io_ckpt_fsync_time_ms numeric,
  io_autovacuum_writes_delta numeric,
  io_autovacuum_write_time_ms numeric,
  io_client_writes_delta numeric,
  io_client_write_time_ms numeric,
  io_client_reads_delta numeric,
  io_client_read_time_ms numeric,
  io_client_extends_delta numeric,
  io_client_evictions_delta numeric,
  io_bgwriter_writes_delta numeric,
  io_bgwriter_write_time_ms numeric,
  temp_files_delta numeric,
  temp_bytes_delta numeric,
  temp_bytes_pretty text,
  deadlocks_delta numeric,
  xact_commit_delta numeric,
  xact_rollback_delta numeric,
  blks_read_delta numeric,
  blks_hit_delta numeric,
  blk_read_time_ms numeric,
  blk_write_time_ms numeric,
  tup_inserted_delta numeric,
  tup_updated_delta numeric,
  tup_deleted_delta numeric
)
rows 1
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  select p.start_snapshot_at, p.end_snapshot_at, p.elapsed_seconds,
         round(extract(epoch from p.start_snapshot_at - p_start_time)::numeric, 3),
         round(extract(epoch from p.end_snapshot_at - p_end_time)::numeric, 3),
         p.pg_version, p.restarted, p.resets, p.checkpoint_occurred,
         p.ckpt_timed_delta, p.ckpt_requested_delta, p.ckpt_done_delta, p.ckpt_write_time_ms, p.ckpt_sync_time_ms,
         p.ckpt_buffers_delta, p.wal_bytes_delta, p.wal_bytes_pretty, p.wal_records_delta, p.wal_fpi_delta,
         p.wal_buffers_full_delta, p.wal_write_time_ms, p.wal_sync_time_ms, p.bgw_buffers_clean_delta,
         p.bgw_maxwritten_clean_delta, p.bgw_buffers_alloc_delta, p.bgw_buffers_backend_delta,
         p.bgw_buffers_backend_fsync_delta, p.autovacuum_workers_active, p.slots_count,
         (select max(x.slots_max_retained_wal) from telemetry.snapshots x
          where x.captured_at between p.start_snapshot_at and p.end_snapshot_at),
         telemetry._pretty_bytes((select max(x.slots_max_retained_wal) from telemetry.snapshots x
          where x.captured_at between p.start_snapshot_at and p.end_snapshot_at)),
         p.io_ckpt_writes_delta, p.io_ckpt_write_time_ms, p.io_ckpt_fsyncs_delta, p.io_ckpt_fsync_time_ms,
         p.io_autovacuum_writes_delta, p.io_autovacuum_write_time_ms, p.io_client_writes_delta,
         p.io_client_write_time_ms, p.io_client_reads_delta, p.io_client_read_time_ms, p.io_client_extends_delta,
         p.io_client_evictions_delta, p.io_bgwriter_writes_delta, p.io_bgwriter_write_time_ms,
         p.temp_files_delta, p.temp_bytes_delta, p.temp_bytes_pretty, p.deadlocks_delta, p.xact_commit_delta,
         p.xact_rollback_delta, p.blks_read_delta, p.blks_hit_delta, p.blk_read_time_ms, p.blk_write_time_ms,
         p.tup_inserted_delta, p.tup_updated_delta, p.tup_deleted_delta
  from telemetry._window_snapshots(p_start_time, p_end_time) w
  cross join lateral telemetry._snapshot_pair(w.start_id, w.end_id) p;
$$;

-- Every snapshot against the previous one.
create or replace view telemetry.deltas
with (security_invoker = true) as
select e.id, e.captured_at, p.pg_version, p.elapsed_seconds as interval_seconds, p.restarted, p.resets,
       p.checkpoint_occurred, p.ckpt_timed_delta, p.ckpt_requested_delta, p.ckpt_done_delta, p.ckpt_write_time_ms,
       p.ckpt_sync_time_ms, p.ckpt_buffers_delta, p.wal_bytes_delta, p.wal_bytes_pretty, p.wal_write_time_ms,
       p.wal_sync_time_ms, p.bgw_buffers_clean_delta, p.bgw_buffers_alloc_delta, p.bgw_buffers_backend_delta,
       p.bgw_buffers_backend_fsync_delta, p.autovacuum_workers_active, p.slots_count, p.slots_max_retained_wal,
       p.slots_max_retained_pretty, p.io_ckpt_writes_delta, p.io_ckpt_write_time_ms, p.io_ckpt_fsyncs_delta,
       p.io_ckpt_fsync_time_ms, p.io_autovacuum_writes_delta, p.io_autovacuum_write_time_ms, p.io_client_writes_delta,
       p.io_client_write_time_ms, p.io_bgwriter_writes_delta, p.io_bgwriter_write_time_ms, p.temp_files_delta,
       p.temp_bytes_delta, p.temp_bytes_pretty
from telemetry.snapshots e
cross join lateral (select x.id from telemetry.snapshots x where x.id < e.id order by x.id desc limit 1) prev
cross join lateral telemetry._snapshot_pair(prev.id, e.id) p;

-- A tracked table between the snapshots nearest a window.
create or replace function telemetry.table_compare(
  p_table text,
  p_start_time timestamptz,
  p_end_time timestamptz,
  p_schema text default 'public'
)
returns table (
  table_name text,
  start_snapshot_at timestamptz,
  end_snapshot_at timestamptz,
  elapsed_seconds numeric,
  size_start text,
  size_end text,
  size_delta text,
  total_size_delta text,
  size_delta_bytes bigint,
  total_size_delta_bytes bigint,
  sizes_skipped boolean,
  n_live_tup_start bigint,
  n_live_tup_end bigint,
  n_dead_tup_end bigint,
  dead_tuple_ratio numeric,
  inserts_delta numeric,
  updates_delta numeric,
  deletes_delta numeric,
  hot_updates_delta numeric,
  seq_scan_delta numeric,
  idx_scan_delta numeric,
  heap_blks_read_delta numeric,
  autovacuum_ran boolean,
  autoanalyze_ran boolean,
  autovacuum_count_delta numeric,
  autoanalyze_count_delta numeric,
  vacuum_ran boolean,
  rewritten boolean,
  reset_detected boolean
)
rows 1
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  with rel as (
    select coalesce(
      (select c.oid from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
       where n.nspname = p_schema and c.relname = p_table),
      (select t.relid from telemetry.tracked_tables t where t.schemaname = p_schema and t.relname = p_table)
    ) as relid
  ),
  w as (
    select
      (select ts.snapshot_id from telemetry.table_snapshots ts join telemetry.snapshots s on s.id = ts.snapshot_id
       where ts.relid = rel.relid and s.captured_at <= p_start_time + interval '1 millisecond'
       order by ts.snapshot_id desc limit 1) as s_before,
      (select ts.snapshot_id from telemetry.table_snapshots ts join telemetry.snapshots s on s.id = ts.snapshot_id
       where ts.relid = rel.relid and s.captured_at > p_start_time and s.captured_at < p_end_time
       order by ts.snapshot_id limit 1) as s_inside,
      (select ts.snapshot_id from telemetry.table_snapshots ts join telemetry.snapshots s on s.id = ts.snapshot_id
       where ts.relid = rel.relid and s.captured_at >= p_end_time - interval '1 millisecond'
       order by ts.snapshot_id limit 1) as e_after,
      (select ts.snapshot_id from telemetry.table_snapshots ts join telemetry.snapshots s on s.id = ts.snapshot_id
       where ts.relid = rel.relid and s.captured_at < p_end_time and s.captured_at > p_start_time
       order by ts.snapshot_id desc limit 1) as e_inside,
      rel.relid
    from rel
  ),
  pair as (
    select coalesce(w.s_before, w.s_inside) as sid, coalesce(w.e_after, w.e_inside) as eid, w.relid from w
  )
  select
    format('%I.%I', e.schemaname, e.relname),
    ss.captured_at, se.captured_at,
    round(extract(epoch from se.captured_at - ss.captured_at)::numeric, 3),
    pg_catalog.pg_size_pretty(s.pg_relation_size), pg_catalog.pg_size_pretty(e.pg_relation_size),
    telemetry._pretty_bytes(e.pg_relation_size - s.pg_relation_size),
    telemetry._pretty_bytes(e.pg_total_relation_size - s.pg_total_relation_size),
    e.pg_relation_size - s.pg_relation_size,
    e.pg_total_relation_size - s.pg_total_relation_size,
    s.size_skipped or e.size_skipped,
    s.n_live_tup, e.n_live_tup, e.n_dead_tup,
    case when coalesce(e.n_live_tup, 0) > 0 then round(e.n_dead_tup::numeric / e.n_live_tup, 4) end,
    telemetry._delta(s.n_tup_ins, e.n_tup_ins, f.reset),
    telemetry._delta(s.n_tup_upd, e.n_tup_upd, f.reset),
    telemetry._delta(s.n_tup_del, e.n_tup_del, f.reset),
    telemetry._delta(s.n_tup_hot_upd, e.n_tup_hot_upd, f.reset),
    telemetry._delta(s.seq_scan, e.seq_scan, f.reset),
    telemetry._delta(s.idx_scan, e.idx_scan, f.reset),
    telemetry._delta(s.heap_blks_read, e.heap_blks_read, f.reset),
    (e.last_autovacuum is distinct from s.last_autovacuum and e.last_autovacuum is not null)
      or coalesce(e.autovacuum_count > s.autovacuum_count, false),
    (e.last_autoanalyze is distinct from s.last_autoanalyze and e.last_autoanalyze is not null)
      or coalesce(e.autoanalyze_count > s.autoanalyze_count, false),
    telemetry._delta(s.autovacuum_count, e.autovacuum_count, f.reset),
    telemetry._delta(s.autoanalyze_count, e.autoanalyze_count, f.reset),
    (e.last_vacuum is distinct from s.last_vacuum and e.last_vacuum is not null),
    s.relfilenode is distinct from e.relfilenode,
    f.reset
  from pair
  join telemetry.table_snapshots s on s.snapshot_id = pair.sid and s.relid = pair.relid
  join telemetry.table_snapshots e on e.snapshot_id = pair.eid and e.relid = pair.relid
  join telemetry.snapshots ss on ss.id = pair.sid
  join telemetry.snapshots se on se.id = pair.eid
  cross join lateral (
    select (ss.db_stats_reset is distinct from se.db_stats_reset
            or e.n_tup_ins < s.n_tup_ins or e.n_tup_upd < s.n_tup_upd or e.n_tup_del < s.n_tup_del
            or e.seq_scan < s.seq_scan) as reset
  ) f
  where pair.sid < pair.eid;
$$;

-- Every tracked table's change between consecutive snapshots.
create or replace view telemetry.table_deltas
with (security_invoker = true) as
select e.snapshot_id, se.captured_at, e.schemaname, e.relname,
       round(extract(epoch from se.captured_at - ss.captured_at)::numeric, 3) as interval_seconds,
       e.pg_relation_size - s.pg_relation_size as size_delta_bytes,
       telemetry._pretty_bytes(e.pg_relation_size - s.pg_relation_size) as size_delta_pretty,
       e.pg_total_relation_size - s.pg_total_relation_size as total_size_delta_bytes,
       e.n_live_tup, e.n_dead_tup,
       case when coalesce(e.n_live_tup, 0) > 0 then round(e.n_dead_tup::numeric / e.n_live_tup, 4) end as dead_tuple_ratio,
       telemetry._delta(s.n_tup_ins, e.n_tup_ins, r.reset) as inserts_delta,
       telemetry._delta(s.n_tup_upd, e.n_tup_upd, r.reset) as updates_delta,
       telemetry._delta(s.n_tup_del, e.n_tup_del, r.reset) as deletes_delta,
       telemetry._delta(s.n_tup_hot_upd, e.n_tup_hot_upd, r.reset) as hot_updates_delta,
       (e.last_autovacuum is distinct from s.last_autovacuum and e.last_autovacuum is not null)
         or coalesce(e.autovacuum_count > s.autovacuum_count, false) as autovacuum_ran,
       (e.last_autoanalyze is distinct from s.last_autoanalyze and e.last_autoanalyze is not null)
         or coalesce(e.autoanalyze_count > s.autoanalyze_count, false) as autoanalyze_ran,
       telemetry._delta(s.autovacuum_count, e.autovacuum_count, r.reset) as autovacuum_count_delta,
       telemetry._delta(s.autoanalyze_count, e.autoanalyze_count, r.reset) as autoanalyze_count_delta,
       e.last_autovacuum, e.last_autoanalyze,
       r.reset as reset_detected
from telemetry.table_snapshots e
join telemetry.snapshots se on se.id = e.snapshot_id
cross join lateral (
  select x.* from telemetry.table_snapshots x
  where x.relid = e.relid and x.snapshot_id < e.snapshot_id
  order by x.snapshot_id desc limit 1
) s
join telemetry.snapshots ss on ss.id = s.snapshot_id
cross join lateral (
  select (ss.db_stats_reset is distinct from se.db_stats_reset or e.n_tup_ins < s.n_tup_ins
          or e.n_tup_upd < s.n_tup_upd or e.n_tup_del < s.n_tup_del) as reset
) r;

-- Raw wait groups of every sample in a window (what recent_waits shows for the last 2 hours).
create or replace function telemetry.waits(p_start_time timestamptz, p_end_time timestamptz)
returns table (
  captured_at timestamptz,
  backend_type text,
  wait_event_type text,
  wait_event text,
  state text,
  count int,
  wait_class text
)
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  select s.captured_at, split_part(k.key, '|', 1), nullif(split_part(k.key, '|', 3), ''),
         nullif(split_part(k.key, '|', 4), ''), nullif(split_part(k.key, '|', 2), ''), k.n,
         telemetry._wait_class(nullif(split_part(k.key, '|', 2), ''), nullif(split_part(k.key, '|', 3), ''))
  from telemetry.samples s
  cross join lateral unnest(s.wait_keys, s.wait_counts) as k(key, n)
  where s.captured_at between p_start_time and p_end_time;
$$;

-- Average active sessions per wait event over a window. Idle sessions and background idle loops
-- (wait type Activity) are left out; active with no wait event is CPU; idle in transaction is its
-- own class. avg_waiters is averaged over every sample of the window (not only those where the
-- event appeared); max_waiters is the peak in one sample.
create or replace function telemetry.wait_summary(p_start_time timestamptz, p_end_time timestamptz)
returns table (
  backend_type text,
  wait_event_type text,
  wait_event text,
  wait_class text,
  sample_count bigint,
  total_waiters bigint,
  avg_waiters numeric,
  max_waiters int,
  pct_of_samples numeric,
  pct_of_active numeric,
  session_seconds numeric
)
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  with n as (
    select count(*) as samples from telemetry.samples s where s.captured_at between p_start_time and p_end_time
  ),
  per_sample as (
    select w.captured_at, w.backend_type, w.wait_event_type, w.wait_event, w.wait_class, sum(w.count)::int as c
    from telemetry.waits(p_start_time, p_end_time) w
    where w.wait_class is not null
    group by 1, 2, 3, 4, 5
  ),
  g as (
    select p.backend_type, p.wait_event_type, p.wait_event, p.wait_class,
           count(*) as sample_count, sum(p.c) as total_waiters, max(p.c) as max_waiters
    from per_sample p
    group by 1, 2, 3, 4
  )
  select g.backend_type, g.wait_event_type, g.wait_event, g.wait_class, g.sample_count, g.total_waiters,
         round(g.total_waiters::numeric / nullif(n.samples, 0), 3),
         g.max_waiters,
         round(100.0 * g.sample_count / nullif(n.samples, 0), 1),
         round(100.0 * g.total_waiters / nullif(sum(g.total_waiters) over (), 0), 1),
         round(g.total_waiters::numeric / nullif(n.samples, 0) * extract(epoch from p_end_time - p_start_time)::numeric, 1)
  from g, n
  order by g.total_waiters desc, g.sample_count desc, 1, 2, 3;
$$;

-- Lock waits in a window: who waited, in which mode, for how long, behind whom (and what the
-- blocker was doing). blocked_duration is the lock wait so far, from pg_locks.waitstart.
create or replace function telemetry.locks(p_start_time timestamptz, p_end_time timestamptz)
returns table (
  captured_at timestamptz,
  blocked_pid int,
  blocked_user text,
  blocked_app text,
  blocked_duration interval,
  blocking_pid int,
  blocking_user text,
  blocking_app text,
  lock_type text,
  locked_relation text,
  blocked_query_preview text,
  blocking_query_preview text,
  lock_mode text,
  wait_started timestamptz,
  blocked_state text,
  blocking_state text,
  blocking_wait text,
  blocking_xact_age interval,
  blocking_pids int[]
)
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  with db as (
    select d.oid from pg_catalog.pg_database d where d.datname = pg_catalog.current_database()
  )
  select s.captured_at, l.pid, bd.usename, bd.app, s.captured_at - l.wait_started,
         bk.pid, bk.usename, bk.app, l.lock_type,
         case
           when l.relation is null then null
           when l.database = (select db.oid from db) then l.relation::regclass::text
           else l.relation::text
         end,
         left(qb.query, 200), left(qk.query, 200), l.mode, l.wait_started, bd.state, bk.state, bk.wait,
         s.captured_at - bk.xact_start, l.blockers
  from telemetry.samples s
  cross join lateral (
    select u.pid, string_to_array(u.blockers, ',')::int[] as blockers, u.lock_type, u.mode, u.database, u.relation,
           u.wait_started
    from unnest(s.l_pid, s.l_blockers, s.l_lock_type, s.l_mode, s.l_database, s.l_relation, s.l_wait_started)
      as u(pid, blockers, lock_type, mode, database, relation, wait_started)
  ) l
  left join lateral (
    select x.*
    from unnest(s.s_pid, s.s_usename, s.s_application_name, s.s_state, s.s_wait, s.s_xact_start, s.s_text_hash)
      as x(pid, usename, app, state, wait, xact_start, text_hash)
    where x.pid = l.pid
    limit 1
  ) bd on true
  left join lateral (
    select x.*
    from unnest(s.s_pid, s.s_usename, s.s_application_name, s.s_state, s.s_wait, s.s_xact_start, s.s_text_hash)
      as x(pid, usename, app, state, wait, xact_start, text_hash)
    where x.pid = l.blockers[1]
    limit 1
  ) bk on true
  left join telemetry.query_texts qb on qb.hash = bd.text_hash
  left join telemetry.query_texts qk on qk.hash = bk.text_hash
  where s.captured_at between p_start_time and p_end_time
    and cardinality(s.l_pid) > 0;
$$;

-- Notable sessions in a window: waiting on or holding a lock, idle in transaction, long-running.
create or replace function telemetry.activity(p_start_time timestamptz, p_end_time timestamptz)
returns table (
  captured_at timestamptz,
  pid int,
  usename text,
  application_name text,
  backend_type text,
  state text,
  wait_event_type text,
  wait_event text,
  xact_start timestamptz,
  query_start timestamptz,
  running_for interval,
  xact_age interval,
  idle_for interval,
  xmin_age int,
  query_id bigint,
  query_preview text
)
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  select s.captured_at, x.pid, x.usename, x.app, coalesce(x.backend_type, 'client backend'), x.state,
         split_part(x.wait, ':', 1), nullif(split_part(x.wait, ':', 2), ''),
         x.xact_start, x.query_start, s.captured_at - x.query_start, s.captured_at - x.xact_start,
         case when x.state <> 'active' then s.captured_at - x.state_change end,
         x.xmin_age, x.query_id, left(q.query, 200)
  from telemetry.samples s
  cross join lateral unnest(s.s_pid, s.s_usename, s.s_application_name, s.s_backend_type, s.s_state, s.s_wait,
                            s.s_xact_start, s.s_query_start, s.s_state_change, s.s_xmin_age, s.s_query_id, s.s_text_hash)
    as x(pid, usename, app, backend_type, state, wait, xact_start, query_start, state_change, xmin_age, query_id, text_hash)
  left join telemetry.query_texts q on q.hash = x.text_hash
  where s.captured_at between p_start_time and p_end_time;
$$;

-- Progress of VACUUM, ANALYZE, COPY, CREATE INDEX, CLUSTER and base backups in a window.
create or replace function telemetry.progress(p_start_time timestamptz, p_end_time timestamptz)
returns table (
  captured_at timestamptz,
  progress_type text,
  pid int,
  relname text,
  phase text,
  blocks_done bigint,
  blocks_total bigint,
  blocks_pct numeric,
  tuples_done bigint,
  tuples_total bigint,
  bytes_done bigint,
  bytes_total bigint,
  bytes_done_pretty text,
  details jsonb
)
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  select p.captured_at, p.progress_type, p.pid,
         case
           when p.relation_oid is null or p.relation_oid = 0 then null
           when p.database_oid = (select d.oid from pg_catalog.pg_database d where d.datname = pg_catalog.current_database())
             then p.relation_oid::regclass::text
           else p.relation_oid::text
         end,
         p.phase, b.done, b.total,
         case when b.total > 0 then round(100.0 * b.done / b.total, 1) end,
         t.done, t.total, y.done, y.total, pg_catalog.pg_size_pretty(y.done), p.details
  from telemetry.progress_samples p
  cross join lateral (
    select coalesce((p.details ->> 'heap_blks_vacuumed'), (p.details ->> 'sample_blks_scanned'),
                    (p.details ->> 'blocks_done'), (p.details ->> 'heap_blks_scanned'))::bigint as done,
           coalesce((p.details ->> 'heap_blks_total'), (p.details ->> 'sample_blks_total'),
                    (p.details ->> 'blocks_total'))::bigint as total
  ) b
  cross join lateral (
    select coalesce((p.details ->> 'num_dead_item_ids'), (p.details ->> 'num_dead_tuples'),
                    (p.details ->> 'tuples_processed'), (p.details ->> 'tuples_done'),
                    (p.details ->> 'heap_tuples_scanned'))::bigint as done,
           coalesce((p.details ->> 'max_dead_tuples'), (p.details ->> 'tuples_total'))::bigint as total
  ) t
  cross join lateral (
    select coalesce((p.details ->> 'bytes_processed'), (p.details ->> 'backup_streamed'))::bigint as done,
           coalesce((p.details ->> 'bytes_total'), (p.details ->> 'backup_total'))::bigint as total
  ) y
  where p.captured_at between p_start_time and p_end_time;
$$;

-- Replication as seen by the snapshots in a window. replay_lag_bytes is measured from the
-- primary's WAL position at snapshot time (so WAL not yet sent counts too).
create or replace function telemetry.replication(p_start_time timestamptz, p_end_time timestamptz)
returns table (
  captured_at timestamptz,
  pid int,
  client_addr inet,
  application_name text,
  state text,
  sync_state text,
  sent_lsn pg_lsn,
  write_lsn pg_lsn,
  flush_lsn pg_lsn,
  replay_lsn pg_lsn,
  replay_lag_bytes numeric,
  replay_lag_pretty text,
  write_lag interval,
  flush_lag interval,
  replay_lag interval
)
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  select s.captured_at, r.pid, r.client_addr, r.application_name, r.state, r.sync_state, r.sent_lsn, r.write_lsn,
         r.flush_lsn, r.replay_lsn,
         pg_catalog.pg_wal_lsn_diff(coalesce(r.current_lsn, r.sent_lsn), r.replay_lsn),
         telemetry._pretty_bytes(pg_catalog.pg_wal_lsn_diff(coalesce(r.current_lsn, r.sent_lsn), r.replay_lsn)),
         r.write_lag, r.flush_lag, r.replay_lag
  from telemetry.replication_snapshots r
  join telemetry.snapshots s on s.id = r.snapshot_id
  where s.captured_at between p_start_time and p_end_time;
$$;

-- Statements that took the most time in a window (pg_stat_statements deltas between snapshots).
-- `approximate` marks entries absent from the start snapshot that could not be proven new.
create or replace function telemetry.statement_compare(
  p_start_time timestamptz,
  p_end_time timestamptz,
  p_limit int default 20
)
returns table (
  queryid bigint,
  query text,
  calls_delta numeric,
  total_time_ms numeric,
  mean_time_ms numeric,
  rows_delta numeric,
  shared_blks_read_delta numeric,
  shared_blks_hit_delta numeric,
  temp_blks_written_delta numeric,
  blk_read_time_ms numeric,
  wal_bytes_delta numeric,
  pct_of_total numeric,
  approximate boolean
)
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  with w as (select * from telemetry._window_snapshots(p_start_time, p_end_time, true)),
  pair as (
    select w.*, ss.captured_at as s_at, ss.statements_stats_reset is distinct from se.statements_stats_reset as reset
    from w join telemetry.snapshots ss on ss.id = w.start_id join telemetry.snapshots se on se.id = w.end_id
  ),
  entries as (
    select x.snapshot_id, u.*
    from telemetry.statement_snapshots x
    cross join lateral unnest(x.queryid, x.userid, x.dbid, x.toplevel, x.calls, x.total_time, x.rows,
                              x.shared_blks_hit, x.shared_blks_read, x.temp_blks_written, x.blk_read_time,
                              x.wal_bytes, x.stats_since)
      as u(queryid, userid, dbid, toplevel, calls, total_time, rows, shared_blks_hit, shared_blks_read,
           temp_blks_written, blk_read_time, wal_bytes, stats_since)
    where x.snapshot_id in (select start_id from pair union all select end_id from pair)
  ),
  d as (
    select e.queryid,
           sum(telemetry._delta(s.calls, e.calls, pair.reset)) as calls,
           sum(telemetry._delta(s.total_time::numeric, e.total_time::numeric, pair.reset)) as t,
           sum(telemetry._delta(s.rows, e.rows, pair.reset)) as rws,
           sum(telemetry._delta(s.shared_blks_read, e.shared_blks_read, pair.reset)) as blks_read,
           sum(telemetry._delta(s.shared_blks_hit, e.shared_blks_hit, pair.reset)) as blks_hit,
           sum(telemetry._delta(s.temp_blks_written, e.temp_blks_written, pair.reset)) as temp_w,
           sum(telemetry._delta(s.blk_read_time::numeric, e.blk_read_time::numeric, pair.reset)) as rt,
           sum(telemetry._delta(s.wal_bytes, e.wal_bytes, pair.reset)) as wal,
           bool_or(s.queryid is null and not pair.reset and coalesce(e.stats_since <= pair.s_at, true)) as approx
    from pair
    join entries e on e.snapshot_id = pair.end_id
    left join entries s
      on s.snapshot_id = pair.start_id and s.queryid = e.queryid and s.userid = e.userid and s.dbid = e.dbid
     and s.toplevel = e.toplevel
    group by e.queryid
  )
  select d.queryid, t.query, d.calls, round(d.t, 3), round(d.t / nullif(d.calls, 0), 3), d.rws, d.blks_read,
         d.blks_hit, d.temp_w, round(d.rt, 3), d.wal, round(100 * d.t / nullif(sum(d.t) over (), 0), 1), d.approx
  from d
  left join telemetry.statement_texts t on t.queryid = d.queryid
  where d.calls > 0
  order by d.t desc nulls last
  limit p_limit;
$$;

create or replace view telemetry.recent_waits with (security_invoker = true) as
  select w.captured_at, w.backend_type, w.wait_event_type, w.wait_event, w.state, w.count, w.wait_class
  from telemetry.waits(now() - interval '2 hours', now()) w;

create or replace view telemetry.recent_locks with (security_invoker = true) as
  select * from telemetry.locks(now() - interval '2 hours', now());

create or replace view telemetry.recent_activity with (security_invoker = true) as
  select * from telemetry.activity(now() - interval '2 hours', now());

create or replace view telemetry.recent_progress with (security_invoker = true) as
  select * from telemetry.progress(now() - interval '2 hours', now());

create or replace view telemetry.recent_replication with (security_invoker = true) as
  select * from telemetry.replication(now() - interval '2 hours', now());

revoke all on all functions in schema telemetry from public;
revoke all on all tables in schema telemetry from public, anon, authenticated;
