-- Batch telemetry: diagnosis.
--
-- telemetry.diagnose(start, end [, baseline_start, baseline_end [, cpu_count]]) names the causes of a
-- slow window, ranked by how much of the database time they explain (session-seconds), each with
-- its evidence (blocker pid, lock mode and query; checkpoint counts and write time; temp bytes;
-- wait classes ...) and a concrete recommendation. With a baseline window it attributes the extra
-- session-seconds to wait classes, run versus baseline, and states what stays unexplained.
--
-- Session-seconds: a sample counts the sessions in each state; averaged over the window's samples
-- that is average active sessions (AAS), and AAS x window length is session-seconds. The batch
-- "load" counts client backends, parallel workers and background workers (pg_cron jobs);
-- autovacuum and system processes are reported separately.

-- Wait events that mean WAL or shared-buffer contention between concurrent writers.
create or replace function telemetry._is_write_pressure(p_type text, p_event text)
returns boolean
language sql
immutable
security invoker
-- no SET clause, so the planner inlines it; it uses only pg_catalog operators and functions
as $$
  select (p_type = 'LWLock' and p_event in ('WALWrite', 'WALInsert', 'WALBufMapping', 'BufferContent', 'BufferMapping',
                                            'WALBufferMapping', 'BufferMappingLock', 'WALWriteLock', 'WALInsertLock'))
      or (p_type = 'IO' and p_event in ('WALWrite', 'WALSync', 'WALInitWrite', 'WALInitSync', 'DataFileWrite',
                                        'DataFileExtend', 'DataFileFlush', 'BufFileWrite'))
      or (p_type = 'IO' and p_event like 'WAL%');
$$;

-- Which sessions make up the load: client backends, parallel and background workers (pg_cron
-- jobs), and autovacuum workers (shown as the pseudo wait class 'Autovacuum': maintenance that
-- competes with the batch). System processes (checkpointer, walwriter ...) are not load.
create or replace function telemetry._load_backend_types()
returns setof text
language sql
immutable
security invoker
-- no SET clause, so the planner inlines it; it uses only pg_catalog operators and functions
as $$
  select unnest(array['client backend', 'parallel worker', 'background worker', 'pg_cron', 'autovacuum worker']);
$$;

-- Per wait event: samples seen, session-seconds and AAS of the batch load in a window.
create or replace function telemetry._load_profile(p_start timestamptz, p_end timestamptz)
returns table (
  wait_class text,
  wait_event_type text,
  wait_event text,
  session_seconds numeric,
  aas numeric,
  peak int
)
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  with n as (
    select count(*)::numeric as samples, extract(epoch from p_end - p_start)::numeric as secs
    from telemetry.samples s where s.captured_at between p_start and p_end
  ),
  per_sample as (
    select w.captured_at,
           case when w.backend_type = 'autovacuum worker' then 'Autovacuum' else w.wait_class end as wait_class,
           w.wait_event_type, w.wait_event, sum(w.count) as c
    from telemetry.waits(p_start, p_end) w
    where w.wait_class is not null and w.backend_type in (select telemetry._load_backend_types())
    group by 1, 2, 3, 4
  )
  select p.wait_class, p.wait_event_type, p.wait_event,
         round(sum(p.c) / n.samples * n.secs, 3), round(sum(p.c) / n.samples, 3), max(p.c)::int
  from per_sample p, n
  where n.samples > 0
  group by p.wait_class, p.wait_event_type, p.wait_event, n.samples, n.secs;
$$;

-- Session-seconds per wait class of the batch load in a window (every class present).
create or replace function telemetry._class_seconds(p_start timestamptz, p_end timestamptz)
returns jsonb
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  select coalesce(jsonb_object_agg(x.wait_class, x.ss), '{}')
  from (
    select p.wait_class, sum(p.session_seconds) as ss
    from telemetry._load_profile(p_start, p_end) p
    group by p.wait_class
  ) x;
$$;

-- Average active sessions per wait class in time buckets (the report's stacked chart).
create or replace function telemetry.aas_timeline(p_start timestamptz, p_end timestamptz, p_buckets int default 60)
returns table (bucket_start timestamptz, bucket_end timestamptz, wait_class text, aas numeric, samples int)
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  with b as (
    select greatest(1, least(p_buckets, 500)) as n, extract(epoch from p_end - p_start) as secs
  ),
  s as (
    select x.id, x.captured_at,
           least(b.n - 1, floor(extract(epoch from x.captured_at - p_start) / b.secs * b.n))::int as bucket
    from telemetry.samples x, b
    where x.captured_at between p_start and p_end
  ),
  per_bucket as (
    select s.bucket, count(*)::int as samples from s group by s.bucket
  ),
  w as (
    select s.bucket,
           case when split_part(k.key, '|', 1) = 'autovacuum worker' then 'Autovacuum'
                else telemetry._wait_class(nullif(split_part(k.key, '|', 2), ''), nullif(split_part(k.key, '|', 3), '')) end as cls,
           split_part(k.key, '|', 1) as backend_type, k.n
    from s
    join telemetry.samples x on x.id = s.id
    cross join lateral unnest(x.wait_keys, x.wait_counts) as k(key, n)
  )
  select p_start + make_interval(secs => b.secs / b.n * pb.bucket),
         p_start + make_interval(secs => b.secs / b.n * (pb.bucket + 1)),
         w.cls, round(sum(w.n)::numeric / pb.samples, 3), pb.samples
  from w
  join per_bucket pb on pb.bucket = w.bucket
  cross join b
  where w.cls is not null and w.backend_type in (select telemetry._load_backend_types())
  group by pb.bucket, pb.samples, w.cls, b.secs, b.n
  order by 1, 3;
$$;

-- WAL written and checkpoints completed per time bucket, from the samples' WAL position and
-- last-checkpoint time (finer than the 5-minute snapshots).
create or replace function telemetry.wal_timeline(p_start timestamptz, p_end timestamptz, p_buckets int default 60)
returns table (bucket_start timestamptz, bucket_end timestamptz, wal_bytes numeric, checkpoints int)
language sql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
  with b as (
    select greatest(1, least(p_buckets, 500)) as n, extract(epoch from p_end - p_start) as secs
  ),
  s as (
    select x.captured_at, x.wal_lsn, x.checkpoint_time,
           lag(x.wal_lsn) over (order by x.captured_at, x.id) as prev_lsn,
           lag(x.checkpoint_time) over (order by x.captured_at, x.id) as prev_ckpt
    from telemetry.samples x
    where x.captured_at between p_start and p_end
  ),
  d as (
    select least(b.n - 1, floor(extract(epoch from s.captured_at - p_start) / b.secs * b.n))::int as bucket,
           greatest(pg_catalog.pg_wal_lsn_diff(s.wal_lsn, s.prev_lsn), 0) as bytes,
           (s.prev_ckpt is not null and s.checkpoint_time is distinct from s.prev_ckpt)::int as ckpt
    from s, b
    where s.prev_lsn is not null
  )
  select p_start + make_interval(secs => b.secs / b.n * d.bucket),
         p_start + make_interval(secs => b.secs / b.n * (d.bucket + 1)),
         sum(d.bytes), sum(d.ckpt)::int
  from d cross join b
  group by d.bucket, b.secs, b.n
  order by 1;
$$;

-- The causes visible in one window, unranked: {"findings": [...], "notes": [...], "load": {...}}.
create or replace function telemetry._findings(p_start_time timestamptz, p_end_time timestamptz, p_cpu_count int)
returns jsonb
language plpgsql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
declare
  v_secs numeric := extract(epoch from p_end_time - p_start_time);
  v_samples int;
  v_weight numeric;
  v_cpu int := coalesce(p_cpu_count, nullif(telemetry._config('cpu_count', ''), '')::int);
  v_total numeric;
  v_classes jsonb;
  v_findings jsonb := '[]';
  v_cmp record;
  v_notes text[] := '{}';
  v_cpu_aas numeric;
  v_peak int;
  r record;
  v_ss numeric;
  v_ev jsonb;
  v_top jsonb;
  v_privileged boolean;
  v_has_cmp boolean;
  v_profile jsonb;
  v_wal numeric;
  v_max_wal numeric := pg_catalog.pg_size_bytes(current_setting('max_wal_size'));
  v_ckpt_busy numeric;
  v_ckpt_seen int;
begin
  if p_end_time <= p_start_time then
    raise exception 'The window must end after it starts' using errcode = 'invalid_parameter_value';
  end if;

  select count(*), bool_and(s.privileged) into v_samples, v_privileged
  from telemetry.samples s where s.captured_at between p_start_time and p_end_time;
  v_weight := case when v_samples > 0 then v_secs / v_samples else 0 end;
  if v_samples = 0 then
    v_notes := v_notes || 'No samples in this window: waits, locks and sessions cannot be assessed.'::text;
  elsif v_samples < 10 then
    v_notes := v_notes || format('Only %s samples in this window: shares are rough (sampling error is large).', v_samples);
  end if;
  if v_privileged is false then
    v_notes := v_notes || 'Some samples were taken without pg_read_all_stats: other users'' sessions are missing.'::text;
  end if;

  -- The load profile, computed once and read below through jsonb_to_recordset.
  select coalesce(jsonb_agg(to_jsonb(p)), '[]') into v_profile from telemetry._load_profile(p_start_time, p_end_time) p;
  select coalesce(jsonb_object_agg(x.wait_class, x.ss), '{}') into v_classes
  from (select p.wait_class, sum(p.session_seconds) as ss
        from jsonb_to_recordset(v_profile) as p(wait_class text, session_seconds numeric) group by p.wait_class) x;
  select coalesce(sum(value::numeric), 0) into v_total from jsonb_each_text(v_classes);
  select * into v_cmp from telemetry.compare(p_start_time, p_end_time);
  -- (a record IS NULL only when every field is; `found` says whether compare() had a row)
  v_has_cmp := found;
  if not v_has_cmp then
    v_notes := v_notes || 'Fewer than two snapshots around this window: counter-based causes (checkpoints, temp files, WAL) cannot be assessed.'::text;
  elsif v_cmp.restarted or cardinality(v_cmp.resets) > 0 then
    v_notes := v_notes || format('Counters were reset or the server restarted inside the window (%s); affected deltas are since-reset values.',
                                 coalesce(nullif(array_to_string(v_cmp.resets, ', '), ''), 'restart'));
  end if;

  -- 1-3. Lock waits, classified by what the first blocker was doing.
  for r in
    with l as (
      select x.*,
             case
               when x.blocking_state like 'idle in transaction%' then 'idle_in_transaction_blocker'
               when x.lock_type = 'relation' then 'relation_lock_ddl'
               when x.lock_type in ('transactionid', 'tuple') then 'row_lock_wait'
               else 'lock_wait_other'
             end as cause
      from telemetry.locks(p_start_time, p_end_time) x
    ),
    top_blocker as (
      select distinct on (l.cause) l.cause, l.blocking_pid, l.blocking_state, l.blocking_query_preview,
             l.blocking_wait, l.blocking_app, l.blocking_user, count(*) over (partition by l.cause, l.blocking_pid) as n
      from l
      order by l.cause, count(*) over (partition by l.cause, l.blocking_pid) desc, l.captured_at desc
    )
    select l.cause, count(*) as waits, count(distinct l.blocked_pid) as sessions,
           max(l.blocked_duration) as longest_wait, max(l.blocking_xact_age) as blocker_xact_age,
           array_agg(distinct l.lock_mode) as modes, array_agg(distinct l.lock_type) as types,
           array_remove(array_agg(distinct l.locked_relation), null) as relations,
           (array_agg(l.blocked_query_preview order by l.captured_at desc))[1] as blocked_query,
           tb.blocking_pid, tb.blocking_state, tb.blocking_query_preview, tb.blocking_wait, tb.blocking_app
    from l join top_blocker tb on tb.cause = l.cause
    group by l.cause, tb.blocking_pid, tb.blocking_state, tb.blocking_query_preview, tb.blocking_wait, tb.blocking_app
  loop
    v_ss := round(r.waits * v_weight, 1);
    v_ev := jsonb_build_object(
      'blocked_sessions', r.sessions, 'samples_waiting', r.waits, 'lock_modes', to_jsonb(r.modes),
      'lock_types', to_jsonb(r.types), 'relations', to_jsonb(r.relations),
      'longest_wait_seconds', round(extract(epoch from r.longest_wait)::numeric, 1),
      'blocker_pid', r.blocking_pid, 'blocker_state', r.blocking_state, 'blocker_wait', r.blocking_wait,
      'blocker_application', r.blocking_app, 'blocker_query', r.blocking_query_preview,
      'blocker_transaction_age_seconds', round(extract(epoch from r.blocker_xact_age)::numeric, 1),
      'blocked_query', r.blocked_query);
    v_findings := v_findings || jsonb_build_object(
      'cause', r.cause,
      'wait_class', 'Lock',
      'impact_session_seconds', v_ss,
      'basis', 'lock waits in samples',
      'title', case r.cause
        when 'idle_in_transaction_blocker' then format('Lock waits behind an idle-in-transaction session (pid %s)', r.blocking_pid)
        when 'relation_lock_ddl' then format('Relation lock waits behind DDL or an exclusive lock on %s (pid %s)',
                                             coalesce(r.relations[1], 'a relation'), r.blocking_pid)
        when 'row_lock_wait' then format('Row-lock waits behind a long transaction (pid %s)', r.blocking_pid)
        else format('Lock waits (%s) behind pid %s', array_to_string(r.types, ', '), r.blocking_pid) end,
      'evidence', v_ev,
      'recommendation', case r.cause
        when 'idle_in_transaction_blocker' then 'A client opened a transaction, took locks and stopped talking. Find it by the blocker pid and application, fix the code path that leaves transactions open, and set idle_in_transaction_session_timeout so it cannot hold the batch hostage again.'
        when 'relation_lock_ddl' then 'DDL (ALTER, TRUNCATE, VACUUM FULL, REINDEX, LOCK TABLE) took or queued for an exclusive lock and every query on the table waited behind it. Run DDL outside the batch window, with a short lock_timeout and retries, or use concurrent variants (CREATE INDEX CONCURRENTLY).'
        when 'row_lock_wait' then 'Another transaction held the rows the batch updates. Keep transactions short, update rows in a consistent order, split the batch into smaller commits, or schedule the competing job elsewhere.'
        else 'Sessions waited on a heavyweight lock (advisory or object). Identify the blocker by pid and shorten how long it holds the lock.' end);
  end loop;

  -- 4. The application stalled inside its own transaction (idle in transaction, not blocking).
  select count(*) as n, count(distinct a.pid) as sessions, max(a.idle_for) as longest,
         (array_agg(a.application_name order by a.captured_at desc))[1] as app,
         (array_agg(a.query_preview order by a.captured_at desc))[1] as query,
         (array_agg(a.pid order by a.captured_at desc))[1] as pid
  into r
  from telemetry.activity(p_start_time, p_end_time) a
  where a.state like 'idle in transaction%'
    and not exists (
      select 1 from telemetry.samples s cross join lateral unnest(s.l_blockers) as b(pids)
      where s.captured_at = a.captured_at and a.pid = any(string_to_array(b.pids, ',')::int[]));
  if r.n > 0 then
    v_findings := v_findings || jsonb_build_object(
      'cause', 'client_stall_in_transaction', 'wait_class', 'IdleInTransaction',
      'impact_session_seconds', round(r.n * v_weight, 1), 'basis', 'idle-in-transaction sessions in samples',
      'title', format('The application stalled inside open transactions (%s session(s))', r.sessions),
      'evidence', jsonb_build_object('sessions', r.sessions, 'samples_idle_in_transaction', r.n,
                                     'longest_idle_seconds', round(extract(epoch from r.longest)::numeric, 1),
                                     'application', r.app, 'last_query', r.query, 'example_pid', r.pid),
      'recommendation', 'Time went by between statements of open transactions: the client was busy, waiting on the network or on other services. Move non-database work outside the transaction, batch round trips, and set idle_in_transaction_session_timeout as a guard.');
  end if;

  -- 5. Waiting for a synchronous standby.
  select coalesce(sum(p.session_seconds), 0), max(p.peak) into v_ss, v_peak
  from jsonb_to_recordset(v_profile) as p(wait_class text, wait_event_type text, wait_event text, session_seconds numeric, aas numeric, peak int)
  where p.wait_event_type = 'IPC' and p.wait_event in ('SyncRep', 'SyncRepWait');
  if v_ss > 0 then
    v_findings := v_findings || jsonb_build_object(
      'cause', 'sync_replication_wait', 'wait_class', 'IPC', 'impact_session_seconds', v_ss,
      'basis', 'IPC:SyncRep waits in samples',
      'title', 'Commits waited for a synchronous standby (IPC:SyncRep)',
      'evidence', jsonb_build_object('peak_sessions_waiting', v_peak,
                                     'synchronous_standby_names', current_setting('synchronous_standby_names'),
                                     'synchronous_commit', current_setting('synchronous_commit')),
      'recommendation', 'Each commit waited for a standby to confirm. Check that the standby is connected and keeping up, or run the batch with SET synchronous_commit = local (or off) when losing the last commits on failover is acceptable for it.');
  end if;

  -- 6. WAL and shared-buffer contention between concurrent writers.
  select coalesce(sum(p.session_seconds), 0), max(p.peak),
         coalesce(jsonb_object_agg(p.wait_event_type || ':' || p.wait_event, p.session_seconds), '{}')
  into v_ss, v_peak, v_ev
  from jsonb_to_recordset(v_profile) as p(wait_class text, wait_event_type text, wait_event text, session_seconds numeric, aas numeric, peak int)
  where telemetry._is_write_pressure(p.wait_event_type, p.wait_event);
  if v_ss > 0 then
    v_findings := v_findings || jsonb_build_object(
      'cause', 'write_pressure', 'wait_class',
      (select p.wait_class from jsonb_to_recordset(v_profile) as p(wait_class text, wait_event_type text, wait_event text, session_seconds numeric, aas numeric, peak int)
       where telemetry._is_write_pressure(p.wait_event_type, p.wait_event) order by p.session_seconds desc limit 1),
      'impact_session_seconds', v_ss, 'basis', 'WAL and buffer waits in samples',
      'title', 'Concurrent writers contended for WAL and shared buffers',
      'evidence', jsonb_build_object('session_seconds_by_event', v_ev, 'peak_sessions', v_peak,
                                     'wal_bytes', v_cmp.wal_bytes_delta, 'wal_buffers_full', v_cmp.wal_buffers_full_delta,
                                     'backend_buffer_writes', v_cmp.bgw_buffers_backend_delta,
                                     'client_evictions', v_cmp.io_client_evictions_delta),
      'recommendation', 'Many sessions wrote WAL and dirty buffers at once. Commit in larger transactions (fewer WAL flushes), reduce the number of concurrent writers, consider synchronous_commit = off for the batch, and raise wal_buffers if wal_buffers_full grows.');
  end if;

  -- 7. Checkpoints forced by WAL volume, or several checkpoints inside the window. A checkpoint's
  -- counters are published when it finishes, so one still running at the end of the window is
  -- seen instead in the samples (the checkpointer busy) together with WAL written beyond half of
  -- max_wal_size (which is what requests a checkpoint).
  select coalesce(sum(x.n), 0) * v_weight into v_ckpt_busy
  from (
    select w.captured_at, sum(w.count) as n
    from telemetry.waits(p_start_time, p_end_time) w
    where w.backend_type = 'checkpointer' and w.wait_class is not null
    group by 1
  ) x;
  select coalesce(sum(t.checkpoints), 0), coalesce(sum(t.wal_bytes), 0) into v_ckpt_seen, v_wal
  from telemetry.wal_timeline(p_start_time, p_end_time, 1) t;
  v_wal := greatest(v_wal, case when v_has_cmp then coalesce(v_cmp.wal_bytes_delta, 0) else 0 end);
  if (v_has_cmp and (coalesce(v_cmp.ckpt_requested_delta, 0) > 0
                     or coalesce(v_cmp.ckpt_timed_delta, 0) + coalesce(v_cmp.ckpt_requested_delta, 0) >= 2))
     or v_ckpt_seen >= 2
     or (v_ckpt_busy > 0 and v_wal >= 0.5 * v_max_wal) then
    v_ss := round((coalesce(v_cmp.ckpt_write_time_ms, 0) + coalesce(v_cmp.ckpt_sync_time_ms, 0)) / 1000.0, 1);
    v_findings := v_findings || jsonb_build_object(
      'cause', 'checkpoint_pressure', 'wait_class', 'IO',
      'impact_session_seconds', greatest(v_ss, 0.1), 'basis', 'checkpointer write and sync time (estimate)',
      'title', format('Checkpoints during the window driven by WAL volume (%s of WAL written)', pg_catalog.pg_size_pretty(v_wal)),
      'evidence', jsonb_build_object('checkpointer_busy_seconds', round(v_ckpt_busy, 1),
                                     'checkpoints_completed_in_samples', v_ckpt_seen,
                                     'checkpoints_requested', v_cmp.ckpt_requested_delta,
                                     'checkpoints_timed', v_cmp.ckpt_timed_delta,
                                     'checkpoint_write_time_ms', v_cmp.ckpt_write_time_ms,
                                     'checkpoint_sync_time_ms', v_cmp.ckpt_sync_time_ms,
                                     'buffers_written', v_cmp.ckpt_buffers_delta, 'wal_bytes', v_wal,
                                     'full_page_images', v_cmp.wal_fpi_delta,
                                     'max_wal_size_now', current_setting('max_wal_size'),
                                     'checkpoint_timeout', current_setting('checkpoint_timeout')),
      'recommendation', 'The batch wrote enough WAL to force checkpoints: each one flushes dirty buffers and makes the next writes carry full-page images. Raise max_wal_size so checkpoints stay time-driven, spread them with checkpoint_completion_target, or reduce WAL (COPY, unlogged staging tables, fewer index updates).');
  end if;

  -- 8. Sorts and hashes spilled to temporary files.
  if v_has_cmp and coalesce(v_cmp.temp_bytes_delta, 0) > 0 then
    select coalesce(sum(p.session_seconds), 0) into v_ss
    from jsonb_to_recordset(v_profile) as p(wait_class text, wait_event_type text, wait_event text, session_seconds numeric, aas numeric, peak int)
    where p.wait_event_type = 'IO' and p.wait_event like 'BufFile%';
    select coalesce(jsonb_agg(jsonb_build_object('query', left(s.query, 200), 'temp_blocks_written', s.temp_blks_written_delta)), '[]')
    into v_top
    from telemetry.statement_compare(p_start_time, p_end_time, 50) s
    where coalesce(s.temp_blks_written_delta, 0) > 0
    limit 3;
    v_findings := v_findings || jsonb_build_object(
      -- The class where most of the spill's time went: on a disk whose cache absorbs the temp
      -- files it shows as CPU (sorting through the page cache), not as BufFile waits. IO when
      -- BufFile waits carry half of the estimate, or more than the CPU sampled in the window.
      'cause', 'temp_spill',
      'wait_class', case when v_ss >= 0.1 and (v_ss >= 0.5 * greatest(v_ss, round(v_cmp.temp_bytes_delta / 104857600.0, 1))
                                               or v_ss > (select coalesce(sum(c.session_seconds), 0)
                                                          from jsonb_to_recordset(v_profile) as c(wait_class text, session_seconds numeric)
                                                          where c.wait_class = 'CPU'))
                         then 'IO' else 'CPU' end,
      'impact_session_seconds', greatest(v_ss, round(v_cmp.temp_bytes_delta / 104857600.0, 1), 0.1),
      'basis', 'BufFile waits, or temp bytes at 100 MB/s (estimate)',
      'title', format('Queries spilled %s to %s temporary file(s)', v_cmp.temp_bytes_pretty, v_cmp.temp_files_delta),
      'evidence', jsonb_build_object('temp_files', v_cmp.temp_files_delta, 'temp_bytes', v_cmp.temp_bytes_delta,
                                     'work_mem', current_setting('work_mem'), 'statements', v_top),
      'recommendation', 'Sorts, hashes or materializations did not fit in work_mem and went to disk. Raise work_mem for the batch session only (SET work_mem = ''256MB''), add an index that removes the sort, or process the data in smaller pieces.');
  end if;

  -- 9. Autovacuum worked on a tracked table during the window.
  select coalesce(sum(x.n), 0) * v_weight into v_ss
  from (
    select w.captured_at, sum(w.count) as n
    from telemetry.waits(p_start_time, p_end_time) w
    where w.backend_type = 'autovacuum worker' and w.wait_class is not null
    group by 1
  ) x;
  select coalesce(jsonb_agg(distinct t.schemaname || '.' || t.relname), '[]') into v_ev
  from telemetry.tracked_tables t
  cross join lateral telemetry.table_compare(t.relname, p_start_time, p_end_time, t.schemaname) c
  where c.autovacuum_ran;
  select v_ev || coalesce(jsonb_agg(distinct p.relname), '[]') into v_ev
  from telemetry.progress(p_start_time, p_end_time) p
  where p.progress_type = 'vacuum' and p.relname is not null
    and exists (select 1 from telemetry.tracked_tables t where format('%I.%I', t.schemaname, t.relname) = p.relname
                                                          or t.relname = p.relname);
  if jsonb_array_length(v_ev) > 0 then
    select coalesce(jsonb_agg(distinct x), '[]') into v_ev from jsonb_array_elements_text(v_ev) x;
    v_findings := v_findings || jsonb_build_object(
      'cause', 'autovacuum_on_tracked_table', 'wait_class', 'Autovacuum',
      'impact_session_seconds', greatest(round(v_ss, 1), 0.1), 'basis', 'autovacuum worker activity in samples',
      'title', format('Autovacuum ran on %s during the window', (select string_agg(x, ', ') from jsonb_array_elements_text(v_ev) x)),
      'evidence', jsonb_build_object('tables', v_ev, 'autovacuum_session_seconds', round(v_ss, 1),
                                     'vacuum_phases', (select coalesce(jsonb_agg(distinct p.phase), '[]')
                                                       from telemetry.progress(p_start_time, p_end_time) p
                                                       where p.progress_type = 'vacuum')),
      'recommendation', 'Autovacuum worked on the batch''s tables while it ran, competing for I/O and locks. Vacuum and analyze them before the batch, tune their autovacuum thresholds (per-table reloptions), or raise autovacuum_vacuum_cost_limit so it finishes sooner.');
  end if;

  -- 10. More sessions wanting CPU than there are CPUs.
  select coalesce(sum(p.aas), 0), coalesce(max(p.peak), 0) into v_cpu_aas, v_peak
  from jsonb_to_recordset(v_profile) as p(wait_class text, wait_event_type text, wait_event text, session_seconds numeric, aas numeric, peak int) where p.wait_class = 'CPU';
  if v_cpu is null then
    if v_cpu_aas > 1 then
      v_notes := v_notes || 'CPU count unknown (set telemetry.config cpu_count or pass cpu_count): CPU saturation cannot be assessed.'::text;
    end if;
  elsif v_cpu_aas > v_cpu then
    v_findings := v_findings || jsonb_build_object(
      'cause', 'cpu_saturation', 'wait_class', 'CPU',
      'impact_session_seconds', round((v_cpu_aas - v_cpu) * v_secs, 1), 'basis', 'CPU AAS above the CPU count',
      'title', format('%s sessions on average wanted CPU on %s CPU(s)', round(v_cpu_aas, 1), v_cpu),
      'evidence', jsonb_build_object('cpu_aas', round(v_cpu_aas, 2), 'peak_sessions_on_cpu', v_peak, 'cpu_count', v_cpu),
      'recommendation', 'More sessions ran at once than there are CPUs, so they queued for CPU. Lower the batch''s parallelism (worker count, max_parallel_workers_per_gather), move concurrent jobs out of the window, or use a larger compute size.');
  end if;

  -- 11. Reads from disk (cache misses).
  select coalesce(sum(p.session_seconds), 0) into v_ss
  from jsonb_to_recordset(v_profile) as p(wait_class text, wait_event_type text, wait_event text, session_seconds numeric, aas numeric, peak int)
  where p.wait_event_type = 'IO' and p.wait_event in ('DataFileRead', 'DataFilePrefetch');
  if v_ss > 0 then
    v_findings := v_findings || jsonb_build_object(
      'cause', 'disk_reads', 'wait_class', 'IO', 'impact_session_seconds', v_ss, 'basis', 'IO:DataFileRead waits in samples',
      'title', 'Sessions waited on reads from disk (cache misses)',
      'evidence', jsonb_build_object('blocks_read', v_cmp.blks_read_delta, 'blocks_hit', v_cmp.blks_hit_delta,
                                     'client_evictions', v_cmp.io_client_evictions_delta),
      'recommendation', 'Data was not in shared_buffers or the OS cache. Check for sequential scans that an index would avoid (statement_compare), and whether the working set fits the instance''s memory.');
  end if;

  -- Forced checkpoints make every following write carry full-page images: the WAL and buffer waits
  -- of such a window are their symptom, so they are counted under checkpoint_pressure.
  if exists (select 1 from jsonb_array_elements(v_findings) x where x ->> 'cause' = 'checkpoint_pressure') then
    select jsonb_agg(case
             when x ->> 'cause' = 'checkpoint_pressure' then
               x || jsonb_build_object(
                 'impact_session_seconds',
                 (x ->> 'impact_session_seconds')::numeric
                   + coalesce((select (y ->> 'impact_session_seconds')::numeric from jsonb_array_elements(v_findings) y
                               where y ->> 'cause' = 'write_pressure'), 0),
                 'basis', 'checkpointer time plus the WAL and buffer waits it caused',
                 'wait_class', coalesce((select y ->> 'wait_class' from jsonb_array_elements(v_findings) y
                                         where y ->> 'cause' = 'write_pressure'), x ->> 'wait_class'),
                 'evidence', (x -> 'evidence') || jsonb_build_object('wal_and_buffer_waits',
                   (select y -> 'evidence' -> 'session_seconds_by_event' from jsonb_array_elements(v_findings) y
                    where y ->> 'cause' = 'write_pressure')))
             else x end)
    into v_findings
    from jsonb_array_elements(v_findings) x
    where x ->> 'cause' <> 'write_pressure';
  end if;

  return jsonb_build_object(
    'findings', v_findings,
    'notes', to_jsonb(v_notes),
    'samples', v_samples,
    'seconds_per_sample', case when v_samples > 0 then round(v_weight, 1) end,
    'load', jsonb_build_object('session_seconds', round(v_total, 1),
                               'aas', case when v_secs > 0 then round(v_total / v_secs, 2) end,
                               'by_wait_class', v_classes, 'cpu_count', v_cpu),
    'compare', case when v_has_cmp then to_jsonb(v_cmp) end
  );
end;
$$;

-- Ranked causes of a slow window, with evidence and recommendations; with a baseline window, each
-- cause is ranked by the session-seconds it added over the baseline, and the extra time is
-- attributed to wait classes with the unexplained remainder stated.
create or replace function telemetry.diagnose(
  p_start_time timestamptz,
  p_end_time timestamptz,
  p_baseline_start timestamptz default null,
  p_baseline_end timestamptz default null,
  p_cpu_count int default null
)
returns jsonb
language plpgsql
stable
security invoker
set search_path = ''
-- short analytical queries: JIT compilation (100+ ms) never pays off here
set jit = off
as $$
declare
  v_secs numeric := extract(epoch from p_end_time - p_start_time);
  v_run jsonb;
  v_base jsonb;
  v_findings jsonb;
  v_classes jsonb;
  v_total numeric;
  v_base_classes jsonb;
  v_base_total numeric;
  v_attr jsonb;
  v_top jsonb;
  v_summary text;
  v_cmp jsonb;
begin
  if p_end_time <= p_start_time then
    raise exception 'The window must end after it starts' using errcode = 'invalid_parameter_value';
  end if;
  if (p_baseline_start is null) <> (p_baseline_end is null) then
    raise exception 'A baseline needs both a start and an end' using errcode = 'invalid_parameter_value';
  end if;
  if p_baseline_start is not null and p_baseline_end <= p_baseline_start then
    raise exception 'The baseline window must end after it starts' using errcode = 'invalid_parameter_value';
  end if;

  v_run := telemetry._findings(p_start_time, p_end_time, p_cpu_count);
  v_classes := v_run -> 'load' -> 'by_wait_class';
  v_total := (v_run -> 'load' ->> 'session_seconds')::numeric;
  v_cmp := nullif(v_run -> 'compare', 'null'::jsonb);
  if p_baseline_start is not null then
    v_base := telemetry._findings(p_baseline_start, p_baseline_end, p_cpu_count);
    v_base_classes := v_base -> 'load' -> 'by_wait_class';
    v_base_total := (v_base -> 'load' ->> 'session_seconds')::numeric;
  end if;

  -- Each finding: how much it explains here, and (with a baseline) how much more than there.
  -- A temp spill's time shows as IO or as CPU depending on the page cache: with a baseline its
  -- class is the one of the two that grew more (if either grew; else the window's own evidence).
  select coalesce(jsonb_agg(x.f || case
           when v_base is not null and x.f ->> 'cause' = 'temp_spill'
                and greatest(coalesce((v_classes ->> 'IO')::numeric, 0) - coalesce((v_base_classes ->> 'IO')::numeric, 0),
                             coalesce((v_classes ->> 'CPU')::numeric, 0) - coalesce((v_base_classes ->> 'CPU')::numeric, 0)) > 0
           then jsonb_build_object('wait_class',
             case when coalesce((v_classes ->> 'IO')::numeric, 0) - coalesce((v_base_classes ->> 'IO')::numeric, 0)
                       > coalesce((v_classes ->> 'CPU')::numeric, 0) - coalesce((v_base_classes ->> 'CPU')::numeric, 0)
                  then 'IO' else 'CPU' end)
           else '{}'::jsonb end || jsonb_build_object(
           'rank', x.rn,
           'impact_session_seconds', round(x.impact, 1),
           'share_of_load_pct', case when v_total > 0 then least(100, round(100 * x.impact / v_total, 1)) end,
           'excess_session_seconds', x.excess,
           'confidence', case
             when x.f ->> 'basis' like '%estimate%' then 'low'
             when v_total > 0 and x.impact >= 0.25 * v_total then 'high'
             else 'medium' end)
         order by x.rn), '[]')
  into v_findings
  from (
    select f, impact, excess,
           row_number() over (order by coalesce(excess, impact) desc, impact desc, f ->> 'cause') as rn
    from (
      select f, (f ->> 'impact_session_seconds')::numeric as impact,
             case when v_base is null then null
                  else round((f ->> 'impact_session_seconds')::numeric - coalesce((
                    select (b ->> 'impact_session_seconds')::numeric
                    from jsonb_array_elements(v_base -> 'findings') b where b ->> 'cause' = f ->> 'cause'), 0), 1) end as excess
      from jsonb_array_elements(v_run -> 'findings') f
    ) y
  ) x;

  if v_base is not null then
    with c as (
      select k as wait_class, coalesce((v_classes ->> k)::numeric, 0) as run_ss, coalesce((v_base_classes ->> k)::numeric, 0) as base_ss
      from (select jsonb_object_keys(v_classes) as k union select jsonb_object_keys(v_base_classes)) keys
    ),
    named as (
      select distinct f ->> 'wait_class' as wait_class from jsonb_array_elements(v_findings) f
    ),
    explained as (
      select coalesce(sum(c.run_ss - c.base_ss), 0) as ss from c
      where c.run_ss > c.base_ss and c.wait_class in (select n.wait_class from named n)
    )
    select jsonb_build_object(
      'run_seconds', round(v_secs, 1),
      'baseline_seconds', round(extract(epoch from p_baseline_end - p_baseline_start)::numeric, 1),
      'extra_seconds', round(v_secs - extract(epoch from p_baseline_end - p_baseline_start)::numeric, 1),
      'run_session_seconds', round(v_total, 1),
      'baseline_session_seconds', round(v_base_total, 1),
      'extra_session_seconds', round(v_total - v_base_total, 1),
      'by_wait_class', coalesce((select jsonb_agg(jsonb_build_object(
          'wait_class', c.wait_class, 'run_session_seconds', round(c.run_ss, 1),
          'baseline_session_seconds', round(c.base_ss, 1), 'delta_session_seconds', round(c.run_ss - c.base_ss, 1),
          'named_by_findings', c.wait_class in (select n.wait_class from named n))
        order by c.run_ss - c.base_ss desc, c.wait_class) from c), '[]'),
      'explained_session_seconds', round((select ss from explained), 1),
      'unexplained_session_seconds', round((v_total - v_base_total) - (select ss from explained), 1)
    )
    into v_attr;
  end if;

  v_top := v_findings -> 0;
  v_summary := case
    when v_top is null and coalesce((v_run ->> 'samples')::int, 0) = 0 then
      'No samples in this window, so there is nothing to diagnose: take samples (runs or pg_cron) while the batch runs.'
    when v_top is null then
      'No cause stood out: the load was mostly CPU within the CPU count, with no lock, I/O, WAL or commit waits of note.'
    else format('%s explains %s session-seconds%s%s.', v_top ->> 'title', v_top ->> 'impact_session_seconds',
                case when v_top ->> 'share_of_load_pct' is not null
                     then format(' (%s%% of the database load)', v_top ->> 'share_of_load_pct') else '' end,
                case when v_top ->> 'excess_session_seconds' is not null
                     then format(', %s more than in the baseline', v_top ->> 'excess_session_seconds') else '' end)
  end;

  return jsonb_build_object(
    'window', jsonb_build_object('start', p_start_time, 'end', p_end_time, 'seconds', round(v_secs, 1),
                                 'samples', v_run -> 'samples',
                                 'snapshots', case when v_cmp is null then null else jsonb_build_object(
                                   'start_at', v_cmp -> 'start_snapshot_at', 'end_at', v_cmp -> 'end_snapshot_at',
                                   'start_offset_seconds', v_cmp -> 'start_offset_seconds',
                                   'end_offset_seconds', v_cmp -> 'end_offset_seconds') end),
    'baseline', case when p_baseline_start is null then null
                     else jsonb_build_object('start', p_baseline_start, 'end', p_baseline_end,
                                             'samples', v_base -> 'samples', 'findings', v_base -> 'findings') end,
    'load', v_run -> 'load',
    'findings', v_findings,
    'attribution', v_attr,
    'coverage', jsonb_build_object('samples', v_run -> 'samples',
                                   'seconds_per_sample', v_run -> 'seconds_per_sample',
                                   'resets', v_cmp -> 'resets',
                                   'restarted', v_cmp -> 'restarted',
                                   'track_io_timing', current_setting('track_io_timing'),
                                   'notes', coalesce(v_run -> 'notes', '[]') || coalesce(v_base -> 'notes', '[]')),
    'summary', v_summary
  );
end;
$$;

revoke all on function telemetry._load_backend_types() from public;
revoke all on function telemetry._is_write_pressure(text, text) from public;
revoke all on function telemetry._findings(timestamptz, timestamptz, int) from public;
revoke all on function telemetry._load_profile(timestamptz, timestamptz) from public;
revoke all on function telemetry._class_seconds(timestamptz, timestamptz) from public;
revoke all on function telemetry.aas_timeline(timestamptz, timestamptz, int) from public;
revoke all on function telemetry.wal_timeline(timestamptz, timestamptz, int) from public;
revoke all on function telemetry.diagnose(timestamptz, timestamptz, timestamptz, timestamptz, int) from public;
