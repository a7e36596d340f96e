-- Multi-region HA/DR: control state and replication tooling, installed on BOTH sites (the primary
-- project and the warm standby project).
--
--   * ha.state: one row per site — its role, the epoch (a fencing token that grows on every
--     switchover) and whether the site is fenced. "Newer epoch wins, never trust a self-reported
--     role": probes and the failover compare epochs across sites.
--   * ha.markers: the only toolkit table in the publication. After the primary is frozen the
--     failover writes a marker and waits for it on the standby; logical apply keeps commit order,
--     so every earlier commit has arrived. (The scripts this replaces never waited.)
--   * ha.operations / ha.operation_steps: the failover state machine and its audit trail, kept on
--     the side that takes over.
--   * functions to inspect replication: replica identity, a schema fingerprint, per-table
--     verification, sequence state.
-- Nothing here is reachable by anon/authenticated.

create schema if not exists ha;
revoke all on schema ha from public, anon, authenticated;

create table if not exists ha.state (
  id boolean primary key default true check (id),
  site text not null default 'unnamed',
  role text not null default 'standby' check (role in ('primary', 'standby', 'fenced')),
  epoch bigint not null default 0 check (epoch >= 0),
  fenced boolean not null default false,
  fenced_reason text,
  updated_at timestamptz not null default now()
);

create table if not exists ha.markers (
  token uuid primary key,
  epoch bigint not null,
  operation_id uuid,
  created_at timestamptz not null default now()
);

create table if not exists ha.operations (
  id uuid primary key default gen_random_uuid(),
  kind text not null check (kind in ('switchover', 'emergency', 'failback')),
  idempotency_key text unique check (length(idempotency_key) between 1 and 200),
  state text not null default 'running'
    check (state in ('running', 'succeeded', 'rolled_back', 'failed_closed', 'failed')),
  step text not null default 'precheck',
  source_site text not null,
  target_site text not null,
  epoch_from bigint,
  epoch_to bigint,
  dry_run boolean not null default false,
  lease_owner text,
  lease_expires_at timestamptz,
  data jsonb not null default '{}',
  error text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  finished_at timestamptz
);
create index if not exists operations_created_at_idx on ha.operations (created_at desc);
-- At most one operation runs at a time (the 409 is also enforced by an advisory lock).
create unique index if not exists operations_one_running_idx on ha.operations ((true)) where state = 'running';

create table if not exists ha.operation_steps (
  id bigint generated always as identity primary key,
  operation_id uuid not null references ha.operations (id) on delete cascade,
  step text not null,
  outcome text not null check (outcome in ('started', 'done', 'skipped', 'failed', 'rolled_back', 'info')),
  details jsonb not null default '{}',
  at timestamptz not null default now()
);
create index if not exists operation_steps_operation_idx on ha.operation_steps (operation_id, id);

revoke all on all tables in schema ha from public, anon, authenticated;

-- Initializes this site's control row (idempotent; never lowers an epoch).
create or replace function ha.init_state(p_site text, p_role text, p_epoch bigint default 0)
returns ha.state
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v ha.state;
begin
  insert into ha.state (id, site, role, epoch) values (true, p_site, p_role, p_epoch)
  on conflict (id) do update
    set site = excluded.site,
        role = case when ha.state.epoch > excluded.epoch then ha.state.role else excluded.role end,
        epoch = greatest(ha.state.epoch, excluded.epoch),
        updated_at = now()
  returning * into v;
  return v;
end;
$$;

-- Tables that replication covers by default: every table in the given schemas plus the named
-- extra tables, never the toolkit's own schemas — except ha.markers, which carries the
-- switchover marker, and ha.heartbeat (next migration), which bounds an emergency's data loss.
create or replace function ha.default_scope(
  p_schemas text[] default '{public}',
  p_extra_tables text[] default '{auth.users,auth.identities}'
)
returns table (schemaname text, tablename text)
language sql
stable
security invoker
set search_path = ''
as $$
  select n.nspname::text, c.relname::text
  from pg_catalog.pg_class c
  join pg_catalog.pg_namespace n on n.oid = c.relnamespace
  where c.relkind in ('r', 'p')
    and c.relpersistence = 'p'
    and not c.relispartition
    and n.nspname not in ('ha', 'telemetry', 'storage_to_s3', 'pg_catalog', 'information_schema')
    and (n.nspname = any(p_schemas) or format('%s.%s', n.nspname, c.relname) = any(p_extra_tables))
  union
  select 'ha', 'markers'
  union
  select 'ha', 'heartbeat'
  order by 1, 2;
$$;

-- Published tables whose UPDATE/DELETE cannot replicate: no replica identity, or the default
-- identity without a primary key.
create or replace function ha.replica_identity_problems(p_publication text default 'dr_publication')
returns table (schemaname text, tablename text, replica_identity text, problem text)
language sql
stable
security invoker
set search_path = ''
as $$
  select t.schemaname::text, t.tablename::text,
         case c.relreplident when 'd' then 'default' when 'n' then 'nothing' when 'f' then 'full' when 'i' then 'index' end,
         case
           when c.relreplident = 'n' then 'replica identity NOTHING: updates and deletes cannot be replicated'
           when c.relreplident = 'd' and not exists (
             select 1 from pg_catalog.pg_index i where i.indrelid = c.oid and i.indisprimary)
             then 'no primary key and default replica identity: updates and deletes cannot be replicated'
         end
  from pg_catalog.pg_publication_tables t
  join pg_catalog.pg_namespace n on n.nspname = t.schemaname
  join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = t.tablename
  where t.pubname = p_publication
    and (c.relreplident = 'n'
         or (c.relreplident = 'd' and not exists (
               select 1 from pg_catalog.pg_index i where i.indrelid = c.oid and i.indisprimary)))
  order by 1, 2;
$$;

-- A fingerprint of the published tables' shape (columns, types, nullability, primary keys): equal
-- on both sites means no DDL drift that would break apply or a failover.
create or replace function ha.schema_fingerprint(p_tables text[])
returns table (fingerprint text, tables int, detail jsonb)
language sql
stable
security invoker
set search_path = ''
as $$
  with t as (
    select c.oid, format('%I.%I', n.nspname, c.relname) as name
    from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
    where format('%s.%s', n.nspname, c.relname) = any(p_tables)
  ),
  cols as (
    select t.name,
           string_agg(format('%s:%s:%s', a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull),
                      ',' order by a.attname) as shape,
           coalesce((select string_agg(a2.attname, ',' order by a2.attname)
                     from pg_catalog.pg_index i
                     join pg_catalog.pg_attribute a2 on a2.attrelid = i.indrelid and a2.attnum = any(i.indkey)
                     where i.indrelid = t.oid and i.indisprimary), '') as pk
    from t
    join pg_catalog.pg_attribute a on a.attrelid = t.oid and a.attnum > 0 and not a.attisdropped
    group by t.name, t.oid
  )
  select md5(coalesce(string_agg(format('%s(%s)pk(%s)', name, shape, pk), ';' order by name), '')),
         count(*)::int,
         coalesce(jsonb_object_agg(name, md5(shape || '|' || pk)), '{}')
  from cols;
$$;

-- Row count and a checksum of the first p_sample rows in primary-key order, per table: compared
-- across sites to prove the data matches.
create or replace function ha.table_checksums(p_tables text[], p_sample int default 1000)
returns table (table_name text, row_count bigint, sample_checksum text)
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
  r record;
  v_order text;
begin
  for r in
    select c.oid, n.nspname, c.relname
    from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
    where format('%s.%s', n.nspname, c.relname) = any(p_tables) and c.relkind in ('r', 'p')
    order by 2, 3
  loop
    select string_agg(format('%I', a.attname), ', ' order by array_position(i.indkey::int2[], a.attnum))
    into v_order
    from pg_catalog.pg_index i
    join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
    where i.indrelid = r.oid and i.indisprimary;
    table_name := format('%I.%I', r.nspname, r.relname);
    execute format('select count(*) from %I.%I', r.nspname, r.relname) into row_count;
    execute format(
      'select md5(coalesce(string_agg(x::text, %L), %L)) from (select * from %I.%I t order by %s limit %s) x',
      chr(10), '', r.nspname, r.relname, coalesce(v_order, '1'), p_sample)
    into sample_checksum;
    return next;
  end loop;
end;
$$;

-- Sequences in the given schemas with their last value and the largest value of the column that
-- owns them (serial and identity columns), so a new primary can be set safely above both.
create or replace function ha.sequence_state(p_schemas text[] default '{public}')
returns table (sequence_name text, last_value bigint, owned_by text, column_max bigint)
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
  r record;
begin
  for r in
    select s.oid, n.nspname, s.relname, d.refobjid as tab, a.attname, tn.nspname as tab_schema, tc.relname as tab_name
    from pg_catalog.pg_class s
    join pg_catalog.pg_namespace n on n.oid = s.relnamespace
    left join pg_catalog.pg_depend d on d.objid = s.oid and d.classid = 'pg_catalog.pg_class'::regclass
         and d.refclassid = 'pg_catalog.pg_class'::regclass and d.deptype in ('a', 'i')
    left join pg_catalog.pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
    left join pg_catalog.pg_class tc on tc.oid = d.refobjid
    left join pg_catalog.pg_namespace tn on tn.oid = tc.relnamespace
    where s.relkind = 'S' and n.nspname = any(p_schemas)
    order by 2, 3
  loop
    sequence_name := format('%I.%I', r.nspname, r.relname);
    select ps.last_value into last_value from pg_catalog.pg_sequences ps
    where ps.schemaname = r.nspname and ps.sequencename = r.relname;
    owned_by := case when r.tab is not null then format('%I.%I.%I', r.tab_schema, r.tab_name, r.attname) end;
    column_max := null;
    if r.tab is not null then
      begin
        execute format('select max(%I)::bigint from %I.%I', r.attname, r.tab_schema, r.tab_name) into column_max;
      exception when others then
        column_max := null;
      end;
    end if;
    return next;
  end loop;
end;
$$;

-- Raises a sequence to at least p_value (never lowers it); returns the value it now stands at.
create or replace function ha.raise_sequence(p_sequence text, p_value bigint)
returns bigint
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_current bigint;
  v_called boolean;
begin
  execute format('select last_value, is_called from %s', p_sequence::regclass) into v_current, v_called;
  if v_current >= p_value and v_called then
    return v_current;
  end if;
  perform pg_catalog.setval(p_sequence::regclass, greatest(p_value, v_current), true);
  return greatest(p_value, v_current);
end;
$$;

revoke all on function ha.init_state(text, text, bigint) from public;
revoke all on function ha.default_scope(text[], text[]) from public;
revoke all on function ha.replica_identity_problems(text) from public;
revoke all on function ha.schema_fingerprint(text[]) from public;
revoke all on function ha.table_checksums(text[], int) from public;
revoke all on function ha.sequence_state(text[]) from public;
revoke all on function ha.raise_sequence(text, bigint) from public;
