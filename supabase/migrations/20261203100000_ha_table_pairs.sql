-- Multi-region HA/DR: tables are (schema, name) pairs everywhere, and sequence work is set-based.
--
-- The first HA migration passed tables as 'schema.table' strings and split them on the first
-- dot, so a table named "a.b" (legal in PostgreSQL) broke the fingerprint, the checksums and
-- setup. These replacements take two parallel arrays, p_schemas[i] and p_names[i], and never
-- parse a name. They also make the per-sequence work of a switchover set-based: a statement
-- reads a page of 1,000 sequences and one raises the ones of a page that are behind, instead of
-- one round trip per sequence inside the write pause (measured: 423 ms for 1,001 sequences).

drop function if exists ha.schema_fingerprint(text[]);
drop function if exists ha.table_checksums(text[], int);
drop function if exists ha.raise_sequence(text, bigint);
drop function if exists ha.sequence_state(text[]);
-- earlier drafts of this migration's own functions
drop function if exists ha.sequence_state(text[], boolean);
drop function if exists ha.raise_sequences(text[], text[], bigint[]);
drop function if exists ha.sequence_state(text[], boolean, text, text, int, text[], text[]);

-- A fingerprint of the tables' shape (columns, types, nullability, primary keys): equal on both
-- sites means no DDL drift that would break apply or a failover. `detail` is a JSON array of
-- [schema, name, per-table hash].
create or replace function ha.schema_fingerprint(p_schemas text[], p_names text[])
returns table (fingerprint text, tables int, detail jsonb)
language sql
stable
security invoker
set search_path = ''
as $$
  with t as (
    select c.oid, ns.nspname::text as s, c.relname::text as n
    from unnest(p_schemas, p_names) as w(s, n)
    join pg_catalog.pg_namespace ns on ns.nspname = w.s
    join pg_catalog.pg_class c on c.relnamespace = ns.oid and c.relname = w.n
  ),
  cols as (
    select t.s, t.n,
           string_agg(format('%s:%s:%s', a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull),
                      ',' order by a.attname) as shape,
           coalesce((select string_agg(a2.attname, ',' order by a2.attname)
                     from pg_catalog.pg_index i
                     join pg_catalog.pg_attribute a2 on a2.attrelid = i.indrelid and a2.attnum = any(i.indkey)
                     where i.indrelid = t.oid and i.indisprimary), '') as pk
    from t
    join pg_catalog.pg_attribute a on a.attrelid = t.oid and a.attnum > 0 and not a.attisdropped
    group by t.s, t.n, t.oid
  )
  select md5(coalesce(string_agg(format('%I.%I(%s)pk(%s)', s, n, shape, pk), ';' order by s, n), '')),
         count(*)::int,
         coalesce(jsonb_agg(jsonb_build_array(s, n, md5(shape || '|' || pk)) order by s, n), '[]')
  from cols;
$$;

-- Row count and a checksum of the first p_sample rows in primary-key order, per table.
create or replace function ha.table_checksums(p_schemas text[], p_names text[], p_sample int default 1000)
returns table (schemaname text, tablename text, row_count bigint, sample_checksum text)
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
    select c.oid, ns.nspname, c.relname
    from unnest(p_schemas, p_names) as w(s, n)
    join pg_catalog.pg_namespace ns on ns.nspname = w.s
    join pg_catalog.pg_class c on c.relnamespace = ns.oid and c.relname = w.n
    where c.relkind in ('r', 'p')
    order by 2, 3
  loop
    select string_agg(format('%I', a.attname), ', ' order by array_position(i.indkey::int2[], a.attnum))
    into v_order
    from pg_catalog.pg_index i
    join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
    where i.indrelid = r.oid and i.indisprimary;
    schemaname := r.nspname;
    tablename := r.relname;
    execute format('select count(*) from %I.%I', r.nspname, r.relname) into row_count;
    execute format(
      'select md5(coalesce(string_agg(x::text, %L), %L)) from (select * from %I.%I t order by %s limit %s) x',
      chr(10), '', r.nspname, r.relname, coalesce(v_order, '1'), p_sample)
    into sample_checksum;
    return next;
  end loop;
end;
$$;

-- The pairs of p_schemas/p_names that do not exist here.
create or replace function ha.missing_tables(p_schemas text[], p_names text[])
returns table (schemaname text, tablename text)
language sql
stable
security invoker
set search_path = ''
as $$
  select w.s, w.n
  from unnest(p_schemas, p_names) as w(s, n)
  where not exists (
    select 1 from pg_catalog.pg_class c join pg_catalog.pg_namespace ns on ns.oid = c.relnamespace
    where ns.nspname = w.s and c.relname = w.n and c.relkind in ('r', 'p'))
  order by 1, 2;
$$;

-- One page of the sequences in p_schemas (keyset order: after (p_after_schema, p_after_name), at
-- most p_limit), or only the pairs p_only_schemas/p_only_names, with each one's last value (null
-- when never used or not readable) and increment. With p_column_max, also the largest value of
-- the column that owns it (serial and identity columns), so a new primary can be set above rows
-- inserted with explicit ids; that reads each owning table once (an index lookup when the column
-- is a key). Pages keep one statement's locks (a sequence each, and a table and index each for
-- the column maximum) well inside the lock table of a small instance.
create or replace function ha.sequence_state(
  p_schemas text[],
  p_column_max boolean,
  p_after_schema text default '',
  p_after_name text default '',
  p_limit int default 1000,
  p_only_schemas text[] default null,
  p_only_names text[] default null)
returns table (schemaname text, sequencename text, last_value bigint, increment bigint,
              max_value bigint, column_max bigint)
language plpgsql
stable
security invoker
set search_path = ''
-- The planner misjudges the keyset's selectivity and sorts all of pg_class for each page.
set enable_seqscan = off
set enable_sort = off
as $$
declare
  r record;
  v_after_ns oid := coalesce(
    (select n.oid from pg_catalog.pg_namespace n where n.nspname = p_after_schema), 0);
  v_schema text;
  v_table text;
  v_column text;
begin
  -- Keyset pages in the order of pg_class's (relname, relnamespace) index, so each page reads
  -- only its own rows (the switchover reads 10,000 sequences in 10 pages inside its pause).
  for r in
    select n.nspname::text as s, c.relname::text as q, c.oid as seq, q.seqincrement as inc,
           q.seqmax as mx,
           case when pg_catalog.has_sequence_privilege(c.oid, 'SELECT,USAGE')
                then pg_catalog.pg_sequence_last_value(c.oid) end as lv
    from pg_catalog.pg_class c
    join pg_catalog.pg_namespace n on n.oid = c.relnamespace
    join pg_catalog.pg_sequence q on q.seqrelid = c.oid
    where c.relkind = 'S'
      and case when p_only_names is null
               then n.nspname = any(p_schemas)
                    and (c.relname, c.relnamespace) > (p_after_name::name, v_after_ns)
               else (n.nspname::text, c.relname::text) in (
                      select w.s, w.n from unnest(p_only_schemas, p_only_names) as w(s, n))
          end
    order by c.relname, c.relnamespace
    limit case when p_only_names is null then p_limit end
  loop
    schemaname := r.s;
    sequencename := r.q;
    last_value := r.lv;
    increment := r.inc;
    max_value := r.mx;
    column_max := null;
    if p_column_max then
      -- The column the sequence feeds: OWNED BY (serial) or an identity column.
      select tn.nspname::text, tc.relname::text, a.attname::text
        into v_schema, v_table, v_column
      from pg_catalog.pg_depend d
      join pg_catalog.pg_class tc on tc.oid = d.refobjid
      join pg_catalog.pg_namespace tn on tn.oid = tc.relnamespace
      join pg_catalog.pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
      where d.classid = 'pg_catalog.pg_class'::regclass and d.objid = r.seq
        and d.refclassid = 'pg_catalog.pg_class'::regclass and d.deptype in ('a', 'i')
      limit 1;
      if found then
        begin
          execute format('select max(%I)::bigint from %I.%I', v_column, v_schema, v_table)
            into column_max;
        exception
          -- not an integer column (uuid, text, numeric beyond bigint), or not readable by this
          -- role; a lock timeout or any other failure is raised, never read as "no values"
          when undefined_function or cannot_coerce or datatype_mismatch
               or numeric_value_out_of_range or insufficient_privilege then
            column_max := null;
        end;
      end if;
    end if;
    return next;
  end loop;
end;
$$;

-- Raises each named ascending sequence whose next value would not be above its floor (the largest
-- value already used) to floor + p_margin, capped at its maximum; never lowers one. Returns how
-- many it moved. Sequences that no longer exist, and descending ones, are skipped.
create or replace function ha.raise_sequences(p_schemas text[], p_names text[], p_floors bigint[], p_margin bigint)
returns int
language sql
volatile
security invoker
set search_path = ''
as $$
  -- Ascending sequences only, and only below their maximum (the caller names the others). The
  -- margin is dropped where it does not fit, so a raise never burns a sequence's last values.
  select count(pg_catalog.setval(c.oid::regclass,
                                 case when w.f <= q.seqmax - p_margin then w.f + p_margin else w.f end,
                                 true))::int
  from unnest(p_schemas, p_names, p_floors) as w(s, n, f)
  join pg_catalog.pg_namespace ns on ns.nspname = w.s
  join pg_catalog.pg_class c on c.relnamespace = ns.oid and c.relname = w.n and c.relkind = 'S'
  join pg_catalog.pg_sequence q on q.seqrelid = c.oid
  where w.f is not null and q.seqincrement > 0 and w.f < q.seqmax
    and coalesce(pg_catalog.pg_sequence_last_value(c.oid), q.seqstart - 1) < w.f;
$$;

revoke all on function ha.schema_fingerprint(text[], text[]) from public;
revoke all on function ha.table_checksums(text[], text[], int) from public;
revoke all on function ha.missing_tables(text[], text[]) from public;
revoke all on function ha.sequence_state(text[], boolean, text, text, int, text[], text[]) from public;
revoke all on function ha.raise_sequences(text[], text[], bigint[], bigint) from public;
