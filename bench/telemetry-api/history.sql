-- Seven days of synthetic telemetry history, shaped like a busy database: a sample every 30 s with
-- 100 backends (wait groups of active, lock-waiting, I/O, WAL, idle and idle-in-transaction
-- sessions, 25 notable sessions, 3 lock waits), a snapshot every 5 minutes with growing counters,
-- and the top-100 statements every 15 minutes. Used only by bench/telemetry-api.
insert into telemetry.query_texts (hash, query)
select h, format('update public.orders set status = %s where id = $1 /* synthetic %s */', h, h)
from generate_series(1, 100) h
on conflict do nothing;

insert into telemetry.samples (
  captured_at, privileged, backends, wal_lsn, checkpoint_time, wait_keys, wait_counts,
  s_pid, s_backend_type, s_state, s_wait, s_usename, s_application_name, s_xact_start, s_query_start,
  s_state_change, s_xmin_age, s_query_id, s_text_hash,
  l_pid, l_blockers, l_lock_type, l_mode, l_database, l_relation, l_wait_started
)
select g.t, true, 100,
       '0/0'::pg_lsn + (g.i * 262144)::numeric,
       date_trunc('hour', g.t) + interval '5 minutes' * floor(extract(minute from g.t) / 5),
       array['autovacuum worker|active|Timeout|VacuumDelay', 'client backend|active||',
             'client backend|active|IO|DataFileRead', 'client backend|active|LWLock|WALWrite',
             'client backend|active|Lock|transactionid', 'client backend|idle in transaction|Client|ClientRead',
             'client backend|idle|Client|ClientRead'],
       array[(g.i % 2), 8 + (g.i % 7), 3 + (g.i % 4), 2 + (g.i % 3), (g.i % 5), 1 + (g.i % 2), 50],
       array(select 10000 + k from generate_series(1, 25) k),
       array(select null::text from generate_series(1, 25) k),
       array(select case when k % 5 = 0 then 'idle in transaction' else 'active' end from generate_series(1, 25) k),
       array(select case when k <= 3 then 'Lock:transactionid' when k % 4 = 0 then 'IO:DataFileRead' end from generate_series(1, 25) k),
       array(select 'app_user' from generate_series(1, 25) k),
       array(select 'batch-worker' from generate_series(1, 25) k),
       array(select g.t - make_interval(secs => k * 3) from generate_series(1, 25) k),
       array(select g.t - make_interval(secs => k) from generate_series(1, 25) k),
       array(select g.t - make_interval(secs => k) from generate_series(1, 25) k),
       array(select k * 10 from generate_series(1, 25) k),
       array(select (k * 7919)::bigint from generate_series(1, 25) k),
       array(select (1 + (g.i + k) % 100)::bigint from generate_series(1, 25) k),
       array[10001, 10002, 10003],
       array['10004', '10004', '10005,10004'],
       array['transactionid', 'transactionid', 'transactionid'],
       array['ShareLock', 'ShareLock', 'ShareLock'],
       array[null::oid, null, null],
       array[null::oid, null, null],
       array[g.t - interval '2 seconds', g.t - interval '1 second', g.t - interval '500 milliseconds']
from generate_series(now() - interval '7 days', now(), interval '30 seconds') with ordinality as g(t, i);

insert into telemetry.snapshots (
  captured_at, pg_version, postmaster_start, in_recovery, wal_lsn, wal_records, wal_fpi, wal_bytes, wal_buffers_full,
  wal_write, wal_sync, wal_write_time, wal_sync_time, wal_stats_reset, checkpoint_lsn, checkpoint_time, ckpt_timed,
  ckpt_requested, ckpt_done, ckpt_write_time, ckpt_sync_time, ckpt_buffers, checkpointer_stats_reset,
  bgw_buffers_clean, bgw_maxwritten_clean, bgw_buffers_alloc, bgw_buffers_backend, bgw_buffers_backend_fsync,
  bgwriter_stats_reset, db_xact_commit, db_xact_rollback, db_blks_read, db_blks_hit, db_tup_inserted, db_tup_updated,
  db_tup_deleted, temp_files, temp_bytes, deadlocks, db_blk_read_time, db_blk_write_time, db_stats_reset,
  io_stats_reset, autovacuum_workers, slots_count, slots_max_retained_wal, coverage
)
select g.t, current_setting('server_version_num')::int / 10000, now() - interval '30 days', false,
       '0/0'::pg_lsn + (g.i * 26214400)::numeric, g.i * 100000, g.i * 1000, g.i * 26214400, g.i,
       g.i * 500, g.i * 500, g.i * 12.5, g.i * 40.0, now() - interval '30 days',
       '0/0'::pg_lsn + (g.i * 26214400)::numeric, g.t - interval '1 minute', g.i, g.i / 10, g.i, g.i * 900.0, g.i * 15.0,
       g.i * 2000, now() - interval '30 days',
       g.i * 300, g.i / 20, g.i * 5000, g.i * 120, 0, now() - interval '30 days',
       g.i * 10000, g.i * 10, g.i * 4000, g.i * 400000, g.i * 6000, g.i * 3000, g.i * 200,
       g.i * 2, g.i * 8388608, g.i / 1000, g.i * 30.0, g.i * 10.0, now() - interval '30 days',
       now() - interval '30 days', 1, 1, 1048576, '{}'
from generate_series(now() - interval '7 days', now(), interval '5 minutes') with ordinality as g(t, i);

insert into telemetry.statement_snapshots
select s.id,
       array(select k::bigint from generate_series(1, 100) k),
       array(select 10::oid from generate_series(1, 100) k),
       array(select 5::oid from generate_series(1, 100) k),
       array(select true from generate_series(1, 100) k),
       array(select s.id * k from generate_series(1, 100) k),
       array(select (s.id * k * 1.5)::float8 from generate_series(1, 100) k),
       array(select s.id * k * 3 from generate_series(1, 100) k),
       array(select s.id * k * 50 from generate_series(1, 100) k),
       array(select s.id * k * 5 from generate_series(1, 100) k),
       array(select s.id * k from generate_series(1, 100) k),
       array(select (s.id % 3) * k from generate_series(1, 100) k),
       array(select (s.id * k * 0.2)::float8 from generate_series(1, 100) k),
       array(select (s.id * k * 100)::numeric from generate_series(1, 100) k),
       array(select now() - interval '30 days' from generate_series(1, 100) k)
from telemetry.snapshots s
where s.id % 3 = 0
on conflict do nothing;

insert into telemetry.statement_texts (queryid, query)
select k, format('select * from public.orders where customer_id = $1 /* statement %s */', k)
from generate_series(1, 100) k
on conflict do nothing;

analyze telemetry.samples;
analyze telemetry.snapshots;
analyze telemetry.statement_snapshots;
