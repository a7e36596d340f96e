/**
 * Every catalog view and column the telemetry collectors read, with the versions where the SQL
 * expects it (mirrors the probes in supabase/migrations/*_telemetry_collectors.sql). The catalog
 * manifest test checks each entry against live PostgreSQL 15, 16, 17 and 18.
 */
export interface CatalogRead {
  view: string;
  columns: string[];
  /** First major version that has these columns (inclusive). */
  from?: number;
  /** Last major version that has them (inclusive); the collectors switch sources after it. */
  until?: number;
}

export const READS: CatalogRead[] = [
  {
    view: "pg_catalog.pg_stat_activity",
    columns: [
      "pid",
      "backend_type",
      "state",
      "wait_event_type",
      "wait_event",
      "usename",
      "application_name",
      "xact_start",
      "query_start",
      "state_change",
      "query_id",
      "query",
      "backend_xmin",
    ],
  },
  {
    view: "pg_catalog.pg_locks",
    columns: ["pid", "locktype", "mode", "granted", "database", "relation", "waitstart"],
  },
  {
    view: "pg_catalog.pg_stat_wal",
    columns: ["wal_records", "wal_fpi", "wal_bytes", "wal_buffers_full", "stats_reset"],
  },
  {
    view: "pg_catalog.pg_stat_wal",
    columns: ["wal_write", "wal_sync", "wal_write_time", "wal_sync_time"],
    until: 17,
  },
  {
    view: "pg_catalog.pg_stat_bgwriter",
    columns: ["buffers_clean", "maxwritten_clean", "buffers_alloc", "stats_reset"],
  },
  {
    view: "pg_catalog.pg_stat_bgwriter",
    columns: [
      "checkpoints_timed",
      "checkpoints_req",
      "checkpoint_write_time",
      "checkpoint_sync_time",
      "buffers_checkpoint",
      "buffers_backend",
      "buffers_backend_fsync",
    ],
    until: 16,
  },
  {
    view: "pg_catalog.pg_stat_checkpointer",
    columns: [
      "num_timed",
      "num_requested",
      "write_time",
      "sync_time",
      "buffers_written",
      "stats_reset",
    ],
    from: 17,
  },
  { view: "pg_catalog.pg_stat_checkpointer", columns: ["num_done"], from: 18 },
  {
    view: "pg_catalog.pg_stat_io",
    columns: [
      "backend_type",
      "object",
      "context",
      "reads",
      "read_time",
      "writes",
      "write_time",
      "writebacks",
      "writeback_time",
      "extends",
      "extend_time",
      "hits",
      "evictions",
      "reuses",
      "fsyncs",
      "fsync_time",
      "stats_reset",
    ],
    from: 16,
  },
  { view: "pg_catalog.pg_stat_io", columns: ["op_bytes"], from: 16, until: 17 },
  {
    view: "pg_catalog.pg_stat_io",
    columns: ["read_bytes", "write_bytes", "extend_bytes"],
    from: 18,
  },
  {
    view: "pg_catalog.pg_stat_database",
    columns: [
      "datname",
      "xact_commit",
      "xact_rollback",
      "blks_read",
      "blks_hit",
      "tup_inserted",
      "tup_updated",
      "tup_deleted",
      "temp_files",
      "temp_bytes",
      "deadlocks",
      "blk_read_time",
      "blk_write_time",
      "stats_reset",
    ],
  },
  { view: "pg_catalog.pg_replication_slots", columns: ["restart_lsn"] },
  {
    view: "pg_catalog.pg_stat_replication",
    columns: [
      "pid",
      "client_addr",
      "application_name",
      "state",
      "sync_state",
      "sent_lsn",
      "write_lsn",
      "flush_lsn",
      "replay_lsn",
      "write_lag",
      "flush_lag",
      "replay_lag",
    ],
  },
  {
    view: "extensions.pg_stat_statements",
    columns: [
      "queryid",
      "userid",
      "dbid",
      "toplevel",
      "calls",
      "total_exec_time",
      "total_plan_time",
      "rows",
      "shared_blks_hit",
      "shared_blks_read",
      "shared_blks_dirtied",
      "shared_blks_written",
      "temp_blks_read",
      "temp_blks_written",
      "wal_records",
      "wal_fpi",
      "wal_bytes",
      "query",
    ],
  },
  {
    view: "extensions.pg_stat_statements",
    columns: ["blk_read_time", "blk_write_time"],
    until: 16,
  },
  {
    view: "extensions.pg_stat_statements",
    columns: ["shared_blk_read_time", "shared_blk_write_time", "stats_since"],
    from: 17,
  },
  { view: "extensions.pg_stat_statements_info", columns: ["dealloc", "stats_reset"] },
];

/** The views whose full column lists are pinned in tests/catalog/pgNN.tsv. */
export const MANIFEST_VIEWS = [...new Set(READS.map((r) => r.view))].sort();

/** SQL that lists `view<TAB>column<TAB>type` for the manifest views. */
export const MANIFEST_SQL = `
  select format('%s.%s', n.nspname, c.relname) as view, a.attname as column, format_type(a.atttypid, a.atttypmod) as type
  from pg_class c
  join pg_namespace n on n.oid = c.relnamespace
  join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
  where format('%s.%s', n.nspname, c.relname) = any($1::text[])
  order by 1, a.attnum`;

/** Statistics functions the collectors call directly (the views around them cost more). */
export const FUNCTIONS = [
  "pg_catalog.pg_stat_get_live_tuples(oid)",
  "pg_catalog.pg_stat_get_dead_tuples(oid)",
  "pg_catalog.pg_stat_get_tuples_inserted(oid)",
  "pg_catalog.pg_stat_get_tuples_updated(oid)",
  "pg_catalog.pg_stat_get_tuples_deleted(oid)",
  "pg_catalog.pg_stat_get_tuples_hot_updated(oid)",
  "pg_catalog.pg_stat_get_numscans(oid)",
  "pg_catalog.pg_stat_get_blocks_fetched(oid)",
  "pg_catalog.pg_stat_get_blocks_hit(oid)",
  "pg_catalog.pg_stat_get_last_vacuum_time(oid)",
  "pg_catalog.pg_stat_get_last_autovacuum_time(oid)",
  "pg_catalog.pg_stat_get_last_analyze_time(oid)",
  "pg_catalog.pg_stat_get_last_autoanalyze_time(oid)",
  "pg_catalog.pg_stat_get_vacuum_count(oid)",
  "pg_catalog.pg_stat_get_autovacuum_count(oid)",
  "pg_catalog.pg_stat_get_analyze_count(oid)",
  "pg_catalog.pg_stat_get_autoanalyze_count(oid)",
  "pg_catalog.pg_blocking_pids(integer)",
  "pg_catalog.pg_control_checkpoint()",
  "pg_catalog.pg_postmaster_start_time()",
  "pg_catalog.pg_stat_force_next_flush()",
  "extensions.pg_stat_statements(boolean)",
];
