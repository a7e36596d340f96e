-- Batch telemetry: runs. A run brackets a batch with a snapshot and a sample at both ends, so
-- compare() and table_compare() answer the moment the batch ends instead of up to five minutes
-- later (the replaced tool returned zero rows until the next scheduled snapshot).
-- Counters of a session that committed less than about a second before end_run may not have
-- been flushed to the statistics system yet (PostgreSQL flushes them when the backend goes idle).

create or replace function telemetry.start_run(p_name text, p_meta jsonb default '{}')
returns bigint
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_snapshot bigint;
  v_id bigint;
begin
  if p_name is null or length(btrim(p_name)) = 0 or length(p_name) > 200 then
    raise exception 'A run needs a name of 1 to 200 characters' using errcode = 'invalid_parameter_value';
  end if;
  v_snapshot := telemetry._snapshot(true, true);
  perform telemetry._sample(true);
  insert into telemetry.runs (name, started_at, start_snapshot_id, meta)
  values (btrim(p_name), now(), v_snapshot, coalesce(p_meta, '{}'))
  returning id into v_id;
  return v_id;
end;
$$;

create or replace function telemetry.end_run(p_id bigint)
returns telemetry.runs
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_run telemetry.runs;
  v_snapshot bigint;
begin
  select * into v_run from telemetry.runs r where r.id = p_id for update;
  if not found then
    raise exception 'Run % does not exist', p_id using errcode = 'no_data_found';
  end if;
  if v_run.ended_at is not null then
    raise exception 'Run % already ended at %', p_id, v_run.ended_at using errcode = 'object_not_in_prerequisite_state';
  end if;
  v_snapshot := telemetry._snapshot(true, true);
  perform telemetry._sample(true);
  update telemetry.runs r set ended_at = now(), end_snapshot_id = v_snapshot
  where r.id = p_id
  returning * into v_run;
  return v_run;
end;
$$;

-- Runs, newest first, with their duration.
create or replace function telemetry.list_runs(p_limit int default 50)
returns table (id bigint, name text, started_at timestamptz, ended_at timestamptz, duration interval, meta jsonb)
language sql
stable
security invoker
set search_path = ''
as $$
  select r.id, r.name, r.started_at, r.ended_at, r.ended_at - r.started_at, r.meta
  from telemetry.runs r
  order by r.started_at desc, r.id desc
  limit p_limit;
$$;

revoke all on function telemetry.start_run(text, jsonb) from public;
revoke all on function telemetry.end_run(bigint) from public;
revoke all on function telemetry.list_runs(int) from public;
