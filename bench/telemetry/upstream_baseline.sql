-- A minimal re-creation of the replaced batch-telemetry collector, written from its documented
-- behaviour (../shared/reference/upstream.md §1.1-1.2), used only as the benchmark baseline:
--   sample():   one samples row (SERIAL), wait groups from pg_stat_activity as separate rows,
--               the 25 oldest non-idle sessions as rows with a 200-character query preview,
--               the four progress views as rows, blocked/blocking pairs from a pg_locks self-join;
--   snapshot(): one wide row from pg_stat_wal, pg_stat_bgwriter (or pg_stat_checkpointer),
--               pg_control_checkpoint(), four separate pg_stat_io aggregates, temp files, slots,
--               tracked-table sizes joined to pg_stat_user_tables, and pg_stat_replication rows.
-- It is not the upstream code and is never installed by the toolkit.
create schema if not exists upstream_baseline;

create table if not exists upstream_baseline.samples (
  id serial primary key,
  captured_at timestamptz not null default now()
);
create index if not exists samples_captured_at_idx on upstream_baseline.samples (captured_at);

create table if not exists upstream_baseline.wait_samples (
  sample_id int references upstream_baseline.samples (id) on delete cascade,
  backend_type text not null,
  wait_event_type text not null,
  wait_event text not null,
  state text not null,
  count int not null,
  primary key (sample_id, backend_type, wait_event_type, wait_event, state)
);

create table if not exists upstream_baseline.activity_samples (
  sample_id int references upstream_baseline.samples (id) on delete cascade,
  pid int not null,
  usename text,
  application_name text,
  backend_type text,
  state text,
  wait_event_type text,
  wait_event text,
  query_start timestamptz,
  state_change timestamptz,
  query_preview text,
  primary key (sample_id, pid)
);

create table if not exists upstream_baseline.progress_samples (
  sample_id int references upstream_baseline.samples (id) on delete cascade,
  progress_type text not null,
  pid int not null,
  relid oid,
  relname text,
  phase text,
  blocks_total bigint,
  blocks_done bigint,
  tuples_total bigint,
  tuples_done bigint,
  bytes_total bigint,
  bytes_done bigint,
  details jsonb,
  primary key (sample_id, progress_type, pid)
);

create table if not exists upstream_baseline.lock_samples (
  sample_id int references upstream_baseline.samples (id) on delete cascade,
  blocked_pid int not null,
  blocked_user text,
  blocked_app text,
  blocked_query_preview text,
  blocked_duration interval,
  blocking_pid int not null,
  blocking_user text,
  blocking_app text,
  blocking_query_preview text,
  lock_type text,
  locked_relation text,
  primary key (sample_id, blocked_pid, blocking_pid)
);

create or replace function upstream_baseline.sample() returns timestamptz
language plpgsql as $$
declare
  v_at timestamptz := now();
  v_id int;
begin
  insert into upstream_baseline.samples (captured_at) values (v_at) returning id into v_id;

  insert into upstream_baseline.wait_samples
  select v_id, coalesce(backend_type, 'unknown'), coalesce(wait_event_type, 'Running'), coalesce(wait_event, 'CPU'),
         coalesce(state, 'unknown'), count(*)
  from pg_stat_activity where pid <> pg_backend_pid()
  group by 2, 3, 4, 5;

  insert into upstream_baseline.activity_samples
  select v_id, pid, usename, application_name, backend_type, state, wait_event_type, wait_event, query_start,
         state_change, left(query, 200)
  from pg_stat_activity
  where state != 'idle' and pid != pg_backend_pid()
  order by query_start asc nulls last
  limit 25;

  if current_setting('server_version_num')::int >= 170000 then
    execute 'insert into upstream_baseline.progress_samples
      select $1, ''vacuum'', p.pid, p.relid, p.relid::regclass::text, p.phase, p.heap_blks_total, p.heap_blks_vacuumed,
             p.max_dead_tuple_bytes, p.dead_tuple_bytes, null, null,
             jsonb_build_object(''heap_blks_scanned'', p.heap_blks_scanned, ''index_vacuum_count'', p.index_vacuum_count)
      from pg_stat_progress_vacuum p' using v_id;
  else
    execute 'insert into upstream_baseline.progress_samples
      select $1, ''vacuum'', p.pid, p.relid, p.relid::regclass::text, p.phase, p.heap_blks_total, p.heap_blks_vacuumed,
             p.max_dead_tuples, p.num_dead_tuples, null, null,
             jsonb_build_object(''heap_blks_scanned'', p.heap_blks_scanned, ''index_vacuum_count'', p.index_vacuum_count)
      from pg_stat_progress_vacuum p' using v_id;
  end if;
  insert into upstream_baseline.progress_samples
  select v_id, 'copy', p.pid, p.relid, p.relid::regclass::text, p.command || '/' || p.type, null, null, null,
         p.tuples_processed, p.bytes_total, p.bytes_processed, jsonb_build_object('tuples_excluded', p.tuples_excluded)
  from pg_stat_progress_copy p;
  insert into upstream_baseline.progress_samples
  select v_id, 'analyze', p.pid, p.relid, p.relid::regclass::text, p.phase, p.sample_blks_total, p.sample_blks_scanned,
         null, null, null, null,
         jsonb_build_object('ext_stats_total', p.ext_stats_total, 'ext_stats_computed', p.ext_stats_computed,
                            'child_tables_total', p.child_tables_total, 'child_tables_done', p.child_tables_done)
  from pg_stat_progress_analyze p;
  insert into upstream_baseline.progress_samples
  select v_id, 'create_index', p.pid, p.relid, p.relid::regclass::text, p.phase, p.blocks_total, p.blocks_done,
         p.tuples_total, p.tuples_done, null, null,
         jsonb_build_object('index_relid', p.index_relid, 'command', p.command, 'lockers_total', p.lockers_total,
                            'lockers_done', p.lockers_done, 'partitions_total', p.partitions_total,
                            'partitions_done', p.partitions_done)
  from pg_stat_progress_create_index p;

  insert into upstream_baseline.lock_samples
  select distinct on (blocked.pid, blocking.pid)
         v_id, blocked.pid, blocked_act.usename, blocked_act.application_name, left(blocked_act.query, 200),
         v_at - blocked_act.query_start, blocking.pid, blocking_act.usename, blocking_act.application_name,
         left(blocking_act.query, 200), blocked.locktype, blocked.relation::regclass::text
  from pg_locks blocked
  join pg_stat_activity blocked_act on blocked_act.pid = blocked.pid
  join pg_locks blocking
    on blocking.locktype = blocked.locktype
   and blocking.database is not distinct from blocked.database
   and blocking.relation is not distinct from blocked.relation
   and blocking.page is not distinct from blocked.page
   and blocking.tuple is not distinct from blocked.tuple
   and blocking.virtualxid is not distinct from blocked.virtualxid
   and blocking.transactionid is not distinct from blocked.transactionid
   and blocking.classid is not distinct from blocked.classid
   and blocking.objid is not distinct from blocked.objid
   and blocking.objsubid is not distinct from blocked.objsubid
   and blocking.pid != blocked.pid
   and blocking.granted
  join pg_stat_activity blocking_act on blocking_act.pid = blocking.pid
  where not blocked.granted;

  return v_at;
end;
$$;

create table if not exists upstream_baseline.tracked_tables (relid oid primary key, schemaname text, relname text);

create table if not exists upstream_baseline.snapshots (
  id serial primary key,
  captured_at timestamptz not null default now(),
  pg_version int not null,
  wal_records bigint, wal_fpi bigint, wal_bytes numeric, wal_write_time double precision, wal_sync_time double precision,
  checkpoint_lsn pg_lsn, checkpoint_time timestamptz,
  ckpt_timed bigint, ckpt_requested bigint, ckpt_write_time double precision, ckpt_sync_time double precision,
  ckpt_buffers bigint,
  bgw_buffers_clean bigint, bgw_maxwritten_clean bigint, bgw_buffers_alloc bigint, bgw_buffers_backend bigint,
  bgw_buffers_backend_fsync bigint,
  autovacuum_workers int, slots_count int, slots_max_retained_wal bigint,
  io_checkpointer_writes bigint, io_checkpointer_write_time double precision, io_checkpointer_fsyncs bigint,
  io_checkpointer_fsync_time double precision, io_autovacuum_writes bigint, io_autovacuum_write_time double precision,
  io_client_writes bigint, io_client_write_time double precision, io_bgwriter_writes bigint,
  io_bgwriter_write_time double precision,
  temp_files bigint, temp_bytes bigint
);
create index if not exists snapshots_captured_at_idx on upstream_baseline.snapshots (captured_at);

create table if not exists upstream_baseline.table_snapshots (
  snapshot_id int references upstream_baseline.snapshots (id) on delete cascade,
  relid oid, schemaname text, relname text,
  pg_relation_size bigint, pg_total_relation_size bigint, pg_indexes_size bigint,
  n_live_tup bigint, n_dead_tup bigint, n_tup_ins bigint, n_tup_upd bigint, n_tup_del bigint, n_tup_hot_upd bigint,
  last_vacuum timestamptz, last_autovacuum timestamptz, last_analyze timestamptz, last_autoanalyze timestamptz,
  vacuum_count bigint, autovacuum_count bigint, analyze_count bigint, autoanalyze_count bigint,
  primary key (snapshot_id, relid)
);

create table if not exists upstream_baseline.replication_snapshots (
  snapshot_id int references upstream_baseline.snapshots (id) on delete cascade,
  pid int not null, client_addr inet, application_name text, state text, sync_state text,
  sent_lsn pg_lsn, write_lsn pg_lsn, flush_lsn pg_lsn, replay_lsn pg_lsn,
  write_lag interval, flush_lag interval, replay_lag interval,
  primary key (snapshot_id, pid)
);

create or replace function upstream_baseline.snapshot() returns timestamptz
language plpgsql as $$
declare
  v_at timestamptz := now();
  v_id int;
  v_ver int := current_setting('server_version_num')::int / 10000;
  v_av int;
  v_slots int;
  v_retained bigint;
  v_temp_files bigint;
  v_temp_bytes bigint;
  v_ck_w bigint; v_ck_wt double precision; v_ck_f bigint; v_ck_ft double precision;
  v_av_w bigint; v_av_wt double precision; v_cl_w bigint; v_cl_wt double precision;
  v_bg_w bigint; v_bg_wt double precision;
  c record;
begin
  select count(*) into v_av from pg_stat_activity where backend_type = 'autovacuum worker';
  select count(*), max(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) into v_slots, v_retained from pg_replication_slots;
  select temp_files, temp_bytes into v_temp_files, v_temp_bytes from pg_stat_database where datname = current_database();
  if v_ver >= 16 then
    execute 'select sum(writes), sum(write_time), sum(fsyncs), sum(fsync_time) from pg_stat_io where backend_type = $1'
      into v_ck_w, v_ck_wt, v_ck_f, v_ck_ft using 'checkpointer';
    execute 'select sum(writes), sum(write_time) from pg_stat_io where backend_type = $1' into v_av_w, v_av_wt using 'autovacuum worker';
    execute 'select sum(writes), sum(write_time) from pg_stat_io where backend_type = $1' into v_cl_w, v_cl_wt using 'client backend';
    execute 'select sum(writes), sum(write_time) from pg_stat_io where backend_type = $1' into v_bg_w, v_bg_wt using 'background writer';
  end if;
  if v_ver >= 17 then
    execute 'select w.wal_records, w.wal_fpi, w.wal_bytes, ' ||
        case when v_ver >= 18 then 'null::float8 as wal_write_time, null::float8 as wal_sync_time, '
             else 'w.wal_write_time, w.wal_sync_time, ' end ||
        'x.num_timed as ckpt_timed, x.num_requested as ckpt_requested, x.write_time as ckpt_write_time,
        x.sync_time as ckpt_sync_time, x.buffers_written as ckpt_buffers, b.buffers_clean, b.maxwritten_clean,
        b.buffers_alloc, null::bigint as buffers_backend, null::bigint as buffers_backend_fsync
      from pg_stat_wal w, pg_stat_checkpointer x, pg_stat_bgwriter b' into c;
  else
    execute 'select w.wal_records, w.wal_fpi, w.wal_bytes, w.wal_write_time, w.wal_sync_time,
        b.checkpoints_timed as ckpt_timed, b.checkpoints_req as ckpt_requested, b.checkpoint_write_time as ckpt_write_time,
        b.checkpoint_sync_time as ckpt_sync_time, b.buffers_checkpoint as ckpt_buffers, b.buffers_clean,
        b.maxwritten_clean, b.buffers_alloc, b.buffers_backend, b.buffers_backend_fsync
      from pg_stat_wal w, pg_stat_bgwriter b' into c;
  end if;
  insert into upstream_baseline.snapshots (captured_at, pg_version, wal_records, wal_fpi, wal_bytes, wal_write_time,
    wal_sync_time, checkpoint_lsn, checkpoint_time, ckpt_timed, ckpt_requested, ckpt_write_time, ckpt_sync_time,
    ckpt_buffers, bgw_buffers_clean, bgw_maxwritten_clean, bgw_buffers_alloc, bgw_buffers_backend,
    bgw_buffers_backend_fsync, autovacuum_workers, slots_count, slots_max_retained_wal, io_checkpointer_writes,
    io_checkpointer_write_time, io_checkpointer_fsyncs, io_checkpointer_fsync_time, io_autovacuum_writes,
    io_autovacuum_write_time, io_client_writes, io_client_write_time, io_bgwriter_writes, io_bgwriter_write_time,
    temp_files, temp_bytes)
  values (v_at, v_ver, c.wal_records, c.wal_fpi, c.wal_bytes, c.wal_write_time, c.wal_sync_time,
    (pg_control_checkpoint()).redo_lsn, (pg_control_checkpoint()).checkpoint_time, c.ckpt_timed, c.ckpt_requested,
    c.ckpt_write_time, c.ckpt_sync_time, c.ckpt_buffers, c.buffers_clean, c.maxwritten_clean, c.buffers_alloc,
    c.buffers_backend, c.buffers_backend_fsync, v_av, v_slots, v_retained, v_ck_w, v_ck_wt, v_ck_f, v_ck_ft, v_av_w,
    v_av_wt, v_cl_w, v_cl_wt, v_bg_w, v_bg_wt, v_temp_files, v_temp_bytes)
  returning id into v_id;

  insert into upstream_baseline.table_snapshots
  select v_id, t.relid, t.schemaname, t.relname, pg_relation_size(t.relid), pg_total_relation_size(t.relid),
         pg_indexes_size(t.relid), s.n_live_tup, s.n_dead_tup, s.n_tup_ins, s.n_tup_upd, s.n_tup_del, s.n_tup_hot_upd,
         s.last_vacuum, s.last_autovacuum, s.last_analyze, s.last_autoanalyze, s.vacuum_count, s.autovacuum_count,
         s.analyze_count, s.autoanalyze_count
  from upstream_baseline.tracked_tables t join pg_stat_user_tables s on s.relid = t.relid;

  insert into upstream_baseline.replication_snapshots
  select v_id, pid, client_addr, application_name, state, sync_state, sent_lsn, write_lsn, flush_lsn, replay_lsn,
         write_lag, flush_lag, replay_lag
  from pg_stat_replication;
  return v_at;
end;
$$;
