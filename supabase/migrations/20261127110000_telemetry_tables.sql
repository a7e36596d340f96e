-- Batch telemetry: storage.
--
-- Two tiers, as in the tool this replaces: snapshots (cumulative counters, meaningful only as
-- deltas, every 5 minutes and at run boundaries) and samples (point-in-time activity, every 30-60 s).
-- What is new and why:
--   * every snapshot records the postmaster start time and each statistics view's stats_reset, so
--     deltas detect counter resets (pg_stat_reset*, crash restart, failover) instead of going negative;
--   * one compact row per sample (wait groups and notable sessions as parallel arrays) keeps a
--     sample at about one heap tuple of WAL; query text lives once in a dictionary;
--   * locks store the mode, how long the wait has lasted (pg_locks.waitstart) and all blockers
--     from pg_blocking_pids(), plus the blocker's state and query;
--   * OIDs are stored at sample time and names resolved when read;
--   * runs bracket a batch with a snapshot and a sample at both ends;
--   * every window query is backed by an index on captured_at.
-- Nothing here is reachable by anon/authenticated (the schema's usage is revoked).

-- The schema is (re)created here too, so the tool can be reinstalled after its documented
-- uninstall (supabase/uninstall/telemetry.sql) with `supabase db push --include-all`.
create schema if not exists telemetry;
revoke all on schema telemetry from public, anon, authenticated;

create table if not exists telemetry.config (
  key text primary key,
  value text not null,
  description text not null
);

insert into telemetry.config (key, value, description) values
  ('retention', '7 days', 'How long samples, snapshots and our pg_cron run details are kept (an interval).'),
  ('sample_session_limit', '25', 'At most this many notable sessions are stored per sample.'),
  ('long_running_threshold', '1 second', 'A session whose transaction or query is older than this is notable.'),
  ('capture_query_text', 'on', 'on: keep the text (first 1000 characters) of notable sessions'' queries; off: keep none.'),
  ('statements_top_n', '100', 'How many pg_stat_statements entries (by total time) a snapshot keeps.'),
  ('statements_interval', '15 minutes', 'Scheduled snapshots capture pg_stat_statements at most this often (runs always do).'),
  ('cpu_count', '', 'vCPUs of the database server, for the concurrency check (empty: unknown).'),
  ('cron_log_retention', '1 day', 'How long cron.job_run_details rows of the telemetry jobs are kept.')
on conflict (key) do nothing;

create table if not exists telemetry.snapshots (
  id bigint generated always as identity primary key,
  captured_at timestamptz not null default now(),
  pg_version int not null,
  postmaster_start timestamptz not null,
  in_recovery boolean not null,
  wal_lsn pg_lsn,
  -- pg_stat_wal (write/sync counters and times come from pg_stat_io object=wal on 18+)
  wal_records bigint,
  wal_fpi bigint,
  wal_bytes numeric,
  wal_buffers_full bigint,
  wal_write bigint,
  wal_sync bigint,
  wal_write_time double precision,
  wal_sync_time double precision,
  wal_stats_reset timestamptz,
  -- checkpoints: pg_control_checkpoint() plus pg_stat_bgwriter (15/16) or pg_stat_checkpointer (17+)
  checkpoint_lsn pg_lsn,
  checkpoint_time timestamptz,
  ckpt_timed bigint,
  ckpt_requested bigint,
  ckpt_done bigint,
  ckpt_write_time double precision,
  ckpt_sync_time double precision,
  ckpt_buffers bigint,
  checkpointer_stats_reset timestamptz,
  -- background writer; buffers_backend(_fsync) are rebuilt from pg_stat_io on 17+
  bgw_buffers_clean bigint,
  bgw_maxwritten_clean bigint,
  bgw_buffers_alloc bigint,
  bgw_buffers_backend bigint,
  bgw_buffers_backend_fsync bigint,
  bgwriter_stats_reset timestamptz,
  -- pg_stat_database for the current database
  db_xact_commit bigint,
  db_xact_rollback bigint,
  db_blks_read bigint,
  db_blks_hit bigint,
  db_tup_inserted bigint,
  db_tup_updated bigint,
  db_tup_deleted bigint,
  temp_files bigint,
  temp_bytes bigint,
  deadlocks bigint,
  db_blk_read_time double precision,
  db_blk_write_time double precision,
  db_stats_reset timestamptz,
  io_stats_reset timestamptz,
  -- gauges
  autovacuum_workers int,
  slots_count int,
  slots_max_retained_wal bigint,
  statements_stats_reset timestamptz,
  statements_dealloc bigint,
  -- what could not be collected, and why (e.g. {"pg_stat_statements": "not installed"})
  coverage jsonb not null default '{}'
);
create index if not exists snapshots_captured_at_idx on telemetry.snapshots (captured_at);

-- pg_stat_io rows with any activity, one row per snapshot; element i of every array is the
-- row keyed keys[i] = 'backend_type|object|context'. Bytes are counted on 16/17 as ops x op_bytes.
create table if not exists telemetry.io_snapshots (
  snapshot_id bigint primary key references telemetry.snapshots (id) on delete cascade,
  keys text[] not null,
  reads bigint[] not null,
  read_bytes numeric[] not null,
  read_time double precision[] not null,
  writes bigint[] not null,
  write_bytes numeric[] not null,
  write_time double precision[] not null,
  writebacks bigint[] not null,
  extends bigint[] not null,
  extend_bytes numeric[] not null,
  hits bigint[] not null,
  evictions bigint[] not null,
  reuses bigint[] not null,
  fsyncs bigint[] not null,
  fsync_time double precision[] not null
);

create table if not exists telemetry.tracked_tables (
  relid oid primary key,
  schemaname text not null,
  relname text not null,
  added_at timestamptz not null default now()
);

create table if not exists telemetry.table_snapshots (
  snapshot_id bigint not null references telemetry.snapshots (id) on delete cascade,
  relid oid not null,
  schemaname text not null,
  relname text not null,
  relkind "char" not null,
  relfilenode oid,
  -- null when skipped because another session held or awaited an AccessExclusiveLock
  pg_relation_size bigint,
  pg_total_relation_size bigint,
  pg_indexes_size bigint,
  size_skipped boolean not null default false,
  n_live_tup bigint,
  n_dead_tup bigint,
  n_tup_ins bigint,
  n_tup_upd bigint,
  n_tup_del bigint,
  n_tup_hot_upd bigint,
  seq_scan bigint,
  idx_scan bigint,
  heap_blks_read bigint,
  heap_blks_hit bigint,
  last_vacuum timestamptz,
  last_autovacuum timestamptz,
  last_analyze timestamptz,
  last_autoanalyze timestamptz,
  vacuum_count bigint,
  autovacuum_count bigint,
  analyze_count bigint,
  autoanalyze_count bigint,
  primary key (relid, snapshot_id)
);
create index if not exists table_snapshots_snapshot_idx on telemetry.table_snapshots (snapshot_id);

create table if not exists telemetry.replication_snapshots (
  snapshot_id bigint not null references telemetry.snapshots (id) on delete cascade,
  pid int not null,
  client_addr inet,
  application_name text,
  state text,
  sync_state text,
  current_lsn pg_lsn,
  sent_lsn pg_lsn,
  write_lsn pg_lsn,
  flush_lsn pg_lsn,
  replay_lsn pg_lsn,
  write_lag interval,
  flush_lag interval,
  replay_lag interval,
  primary key (snapshot_id, pid)
);

-- The top pg_stat_statements entries by total time, one row per snapshot; element i of every
-- array is one entry (queryid, userid, dbid, toplevel identify it).
create table if not exists telemetry.statement_snapshots (
  snapshot_id bigint primary key references telemetry.snapshots (id) on delete cascade,
  queryid bigint[] not null,
  userid oid[] not null,
  dbid oid[] not null,
  toplevel boolean[] not null,
  calls bigint[] not null,
  total_time double precision[] not null,
  rows bigint[] not null,
  shared_blks_hit bigint[] not null,
  shared_blks_read bigint[] not null,
  shared_blks_written bigint[] not null,
  temp_blks_written bigint[] not null,
  blk_read_time double precision[] not null,
  wal_bytes numeric[] not null,
  stats_since timestamptz[] not null
);

create table if not exists telemetry.statement_texts (
  queryid bigint primary key,
  query text not null
);

-- One row per sample. Wait groups, notable sessions and lock waits are parallel arrays (index i
-- of every s_* array is one session, of every l_* array one lock wait), which keeps a sample to a
-- single heap tuple: one row of WAL instead of dozens.
create table if not exists telemetry.samples (
  id bigint generated always as identity primary key,
  captured_at timestamptz not null default now(),
  privileged boolean not null,
  backends int not null,  -- every session seen, idle background processes included
  -- WAL position and last checkpoint time, for the WAL/checkpoint timeline between snapshots
  wal_lsn pg_lsn,
  checkpoint_time timestamptz,
  -- wait groups: 'backend_type|state|wait_event_type|wait_event' and how many sessions; idle
  -- background main loops are not stored
  wait_keys text[] not null,
  wait_counts int[] not null,
  -- notable sessions: waiting on a lock, blocking, idle in transaction, or long-running
  s_pid int[] not null default '{}',
  s_backend_type text[] not null default '{}',  -- null element: 'client backend'
  s_state text[] not null default '{}',
  s_wait text[] not null default '{}',
  s_usename text[] not null default '{}',
  s_application_name text[] not null default '{}',
  s_xact_start timestamptz[] not null default '{}',
  s_query_start timestamptz[] not null default '{}',
  s_state_change timestamptz[] not null default '{}',
  s_xmin_age int[] not null default '{}',
  s_query_id bigint[] not null default '{}',
  s_text_hash bigint[] not null default '{}',
  -- lock waits: the waiting pid, its blockers from pg_blocking_pids() ('pid,pid', first is
  -- the one reported as blocking_pid), the awaited lock and when the wait began
  l_pid int[] not null default '{}',
  l_blockers text[] not null default '{}',
  l_lock_type text[] not null default '{}',
  l_mode text[] not null default '{}',
  l_database oid[] not null default '{}',
  l_relation oid[] not null default '{}',
  l_wait_started timestamptz[] not null default '{}'
);
create index if not exists samples_captured_at_idx on telemetry.samples (captured_at);

-- Query text of notable sessions, stored once (samples keep the hash).
create table if not exists telemetry.query_texts (
  hash bigint primary key,
  query text not null
);

create table if not exists telemetry.progress_samples (
  sample_id bigint not null references telemetry.samples (id) on delete cascade,
  captured_at timestamptz not null,
  progress_type text not null,
  pid int not null,
  database_oid oid,
  relation_oid oid,
  phase text,
  details jsonb not null,
  primary key (sample_id, progress_type, pid)
);
create index if not exists progress_samples_captured_at_idx on telemetry.progress_samples (captured_at);

create table if not exists telemetry.runs (
  id bigint generated always as identity primary key,
  name text not null check (length(name) between 1 and 200),
  started_at timestamptz not null,
  ended_at timestamptz,
  start_snapshot_id bigint references telemetry.snapshots (id) on delete set null,
  end_snapshot_id bigint references telemetry.snapshots (id) on delete set null,
  meta jsonb not null default '{}'
);
create index if not exists runs_started_at_idx on telemetry.runs (started_at);

-- Collector self-telemetry: every skipped or failed section is recorded, never silent.
create table if not exists telemetry.collector_events (
  id bigint generated always as identity primary key,
  at timestamptz not null default now(),
  collector text not null,
  event text not null,
  detail text
);
create index if not exists collector_events_at_idx on telemetry.collector_events (at);

revoke all on all tables in schema telemetry from public, anon, authenticated;
revoke all on all sequences in schema telemetry from public, anon, authenticated;
