-- Multi-region HA/DR: the write fence — a guard on every replicated table that no client can lift.
--
-- Before this, fencing a site meant `ALTER DATABASE … SET default_transaction_read_only = on` plus
-- terminating sessions. Any client walks through that by opening its transaction with
-- `BEGIN READ WRITE` — which the Data API (PostgREST) does for every write — or by
-- `SET default_transaction_read_only = off`. Design rules of the fence:
--
--   * A statement-level trigger `ha_write_guard` (BEFORE INSERT/UPDATE/DELETE/TRUNCATE) on every
--     replicated application table and each of its partitions refuses the statement with SQLSTATE
--     25006 ("site … fenced at epoch N …: writes go to …") unless this site is the writable
--     primary. Ordinary triggers do not fire in logical replication's apply worker
--     (session_replication_role = replica, which only a superuser can set), so the standby keeps
--     applying. Creating a trigger needs only the TRIGGER privilege, which `postgres` holds on
--     auth.users / auth.identities on hosted Supabase; disabling or dropping one needs ownership.
--   * "Writable" is decided by a non-transactional write token: the sequence ha.write_token. A
--     site is writable only while ha.state.write_token equals the sequence's current value.
--     Revoking writes is `nextval` — immediate, visible to every snapshot (a REPEATABLE READ
--     transaction that began before the fence sees it too) and not undone by a rollback. Lifting
--     the fence stores a fresh token value in ha.state in the same transaction that makes the site
--     primary; until that commits the site refuses, so a failed lift fails closed.
--   * With a write lease (next migration renews it), the primary also refuses once lease_until has
--     passed, and every writing transaction is checked again at COMMIT by a deferred constraint
--     trigger, so a transaction that began before the lease expired cannot commit after it.
--   * Nothing is exempt by anything a client controls (application_name, a GUC). The only
--     exemption is a row in ha.write_passes keyed by the current transaction id, which only the
--     owner of the ha schema can insert: the toolkit uses it to truncate a site it rebuilds.
--   * `default_transaction_read_only = on` and terminating sessions stay as the fast path for
--     well-behaved clients. A superuser session can still write (it can set
--     session_replication_role); hosted Supabase gives no client superuser.

drop function if exists ha.default_scope(text[], text[]);

create sequence if not exists ha.write_token;
revoke all on sequence ha.write_token from public, anon, authenticated;

alter table ha.state add column if not exists peer text;
alter table ha.state add column if not exists write_token bigint;
alter table ha.state add column if not exists frozen_by uuid;
alter table ha.state add column if not exists scope jsonb not null
  default '{"schemas": ["public"], "tables": [["auth", "users"], ["auth", "identities"]]}';
alter table ha.state add column if not exists lease_ttl_seconds int;
alter table ha.state add column if not exists lease_until timestamptz;
do $$
begin
  if not exists (select 1 from pg_catalog.pg_constraint where conname = 'state_lease_ttl_seconds_check'
                   and conrelid = 'ha.state'::regclass) then
    alter table ha.state add constraint state_lease_ttl_seconds_check
      check (lease_ttl_seconds is null or lease_ttl_seconds between 1 and 3600);
  end if;
end
$$;

-- Transactions that wrote through the guard while a lease was required: checked again at COMMIT.
create unlogged table if not exists ha.write_checks (xid xid8 primary key);
-- The one exemption: the toolkit's own transaction (by id) when it rebuilds a fenced site.
create table if not exists ha.write_passes (
  xid xid8 primary key,
  reason text not null,
  at timestamptz not null default now()
);
revoke all on ha.write_checks, ha.write_passes from public, anon, authenticated;

-- The application tables in a replication scope: every permanent table of the scope's schemas
-- plus its named extra tables, never the toolkit's own schemas.
create or replace function ha.scope_tables(p_scope jsonb)
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
    and (n.nspname in (select jsonb_array_elements_text(coalesce(p_scope -> 'schemas', '[]')))
         or exists (select 1 from jsonb_array_elements(coalesce(p_scope -> 'tables', '[]')) e
                    where e ->> 0 = n.nspname and e ->> 1 = c.relname))
  order by 1, 2;
$$;

-- Why this site refuses writes, or null when it is the writable primary. One place for the rule
-- the guard, the commit check and the probes share.
create or replace function ha.fence_reason(v ha.state, p_token bigint)
returns text
language sql
stable
security invoker
set search_path = ''
as $$
  select case
    when v.id is null then 'this site has no HA control row (ha.state)'
    when v.role = 'standby' then 'it is the standby'
    when v.fenced or v.role = 'fenced' then coalesce(v.fenced_reason, 'fenced')
    when v.frozen_by is not null then format('frozen for switchover %s', v.frozen_by)
    when v.write_token is distinct from p_token then 'its write token was revoked'
    when v.lease_ttl_seconds is not null and v.lease_until is null then 'it holds no write lease'
    when v.lease_ttl_seconds is not null and v.lease_until <= pg_catalog.clock_timestamp()
      then format('its write lease expired at %s', v.lease_until)
  end;
$$;

create or replace function ha.fence_message(v ha.state, p_reason text)
returns text
language sql
stable
security invoker
set search_path = ''
as $$
  select format('site %s fenced at epoch %s (%s): writes go to %s',
                coalesce(v.site, '?'), coalesce(v.epoch, 0), p_reason,
                case when v.role in ('standby', 'fenced') or v.fenced or v.frozen_by is not null
                       then 'site ' || coalesce(v.peer, 'the other site')
                     else 'the current primary (GET /failover/active)' end);
$$;

-- Logical replication's own workers (apply, table sync): the one writer the guard lets through on
-- a fenced site. Asked only when the session runs in replica mode (the workers always do), from
-- the backend type PostgreSQL itself records, which a client cannot set.
create or replace function ha.is_replication_worker()
returns boolean
language sql
stable
security invoker
set search_path = ''
as $$
  select pg_catalog.current_setting('session_replication_role') = 'replica'
     and coalesce((select a.backend_type like 'logical replication%'
                   from pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a), false);
$$;

-- Refuses (SQLSTATE 25006) unless this site is the writable primary, the statement comes from
-- logical replication, or the transaction holds a write pass; registers the transaction for the
-- check at COMMIT. The body of both guard triggers.
create or replace function ha.assert_writable()
returns void
language plpgsql
security definer
set search_path = ''
as $$
declare
  v ha.state;
  v_token bigint;
  v_reason text;
begin
  select * into v from ha.state where id;
  select w.last_value into v_token from ha.write_token w;
  if v.id and v.role = 'primary' and not v.fenced and v.frozen_by is null
     and v.write_token = v_token
     and (v.lease_ttl_seconds is null or v.lease_until > pg_catalog.clock_timestamp()) then
    insert into ha.write_checks (xid) values (pg_catalog.pg_current_xact_id()) on conflict do nothing;
    return;
  end if;
  if ha.is_replication_worker() then
    return;
  end if;
  if exists (select 1 from ha.write_passes p where p.xid = pg_catalog.pg_current_xact_id()) then
    return;
  end if;
  v_reason := coalesce(ha.fence_reason(v, v_token), 'the fence changed during this statement');
  raise exception using
    errcode = '25006',
    message = ha.fence_message(v, v_reason),
    hint = 'Write through the HA endpoint (PgBouncer), or ask GET /failover/active which project is primary.';
end;
$$;

-- The guard: a statement-level BEFORE trigger on every replicated table and partition, set to
-- fire ALWAYS where the toolkit owns the table, so a session in replica mode
-- (session_replication_role, which hosted Supabase lets `postgres` set) is refused too. The same
-- function runs per row on partitioned tables: PostgreSQL clones a row trigger onto every
-- partition, including those created or attached later, which a statement trigger does not reach.
-- SECURITY DEFINER so a Data API role (anon, authenticated) can read the control row.
create or replace function ha.write_guard()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform ha.assert_writable();
  if tg_level = 'STATEMENT' then
    return null;
  elsif tg_op = 'DELETE' then
    return old;
  end if;
  return new;
end;
$$;

-- The same rule at COMMIT for every transaction that wrote through the guard (registered by it):
-- one that passed the guard before its site was fenced, or before its lease ran out, cannot
-- commit after. Its one gap: a transaction that makes the check run early (SET CONSTRAINTS ALL
-- IMMEDIATE) or holds work that runs after it (a WITH HOLD cursor, later deferred triggers); the
-- lease tick ends such sessions once a lease has run out, and a planned freeze waits for them.
create or replace function ha.write_check_at_commit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v ha.state;
  v_token bigint;
  v_reason text;
begin
  select * into v from ha.state where id;
  select w.last_value into v_token from ha.write_token w;
  v_reason := ha.fence_reason(v, v_token);
  if v_reason is not null then
    raise exception using
      errcode = '25006',
      message = 'commit refused: ' || ha.fence_message(v, v_reason),
      hint = 'The site lost its right to accept writes while this transaction was open.';
  end if;
  delete from ha.write_checks where xid = new.xid;
  return null;
end;
$$;

do $$
begin
  if not exists (select 1 from pg_catalog.pg_trigger where tgname = 'write_check_at_commit'
                   and tgrelid = 'ha.write_checks'::regclass) then
    create constraint trigger write_check_at_commit after insert on ha.write_checks
      deferrable initially deferred for each row execute function ha.write_check_at_commit();
  end if;
end
$$;
-- In replica mode too (a session that set session_replication_role still gets the check).
alter table ha.write_checks enable always trigger write_check_at_commit;

-- Each named table and every partition beneath it: statement triggers are not inherited, and a
-- client can write a partition directly. `can_alter`: this role may set the guard to fire ALWAYS
-- (it owns the table, or is superuser); `postgres` on hosted Supabase does not own auth.*.
create or replace function ha.guard_targets(p_schemas text[], p_names text[])
returns table (relid oid, schemaname text, tablename text, relkind "char", can_alter boolean)
language sql
stable
security invoker
set search_path = ''
as $$
  with roots as (
    select c.oid
    from unnest(p_schemas, p_names) as w(s, n)
    join pg_catalog.pg_namespace ns on ns.nspname = w.s
    join pg_catalog.pg_class c on c.relnamespace = ns.oid and c.relname = w.n and c.relkind in ('r', 'p')
  ),
  everything as (
    select oid from roots
    union
    select t.relid::oid from roots r, pg_catalog.pg_partition_tree(r.oid) t
  )
  select c.oid, ns.nspname::text, c.relname::text, c.relkind,
         pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE')
           or coalesce((select r.rolsuper from pg_catalog.pg_roles r where r.rolname = current_user), false)
  from everything e
  join pg_catalog.pg_class c on c.oid = e.oid
  join pg_catalog.pg_namespace ns on ns.oid = c.relnamespace
  where c.relkind in ('r', 'p')
  order by 2, 3;
$$;

-- The guard triggers a target should have: the statement guard everywhere (BEFORE INSERT,
-- UPDATE, DELETE, TRUNCATE: tgtype 62), and on a partitioned table also the row guard (BEFORE
-- INSERT, UPDATE, DELETE FOR EACH ROW: tgtype 31) its partitions inherit.
create or replace function ha.guard_spec(p_relkind "char")
returns table (tgname text, tgtype int, fn regprocedure, ddl text)
language sql
immutable
security invoker
set search_path = ''
as $$
  select 'ha_write_guard', 62, 'ha.write_guard()'::regprocedure,
         'before insert or update or delete or truncate on %I.%I for each statement execute function ha.write_guard()'
  union all
  select 'ha_write_guard_rows', 31, 'ha.write_guard()'::regprocedure,
         'before insert or update or delete on %I.%I for each row execute function ha.write_guard()'
  where p_relkind = 'p';
$$;

-- Installs (or repairs: CREATE OR REPLACE re-enables a disabled one) every guard a target lacks,
-- and sets it to fire ALWAYS where this role may. Returns how many it (re)created. Callers batch
-- large lists: each trigger takes a SHARE ROW EXCLUSIVE lock until the transaction ends.
create or replace function ha.install_write_guards(p_schemas text[], p_names text[])
returns int
language plpgsql
security invoker
set search_path = ''
as $$
declare
  r record;
  n int := 0;
begin
  for r in
    select g.relid, g.schemaname, g.tablename, g.can_alter, s.tgname, s.ddl, t.oid as trigger_oid,
           t.tgenabled, t.tgtype = s.tgtype and t.tgfoid = s.fn as intact
    from ha.guard_targets(p_schemas, p_names) g
    cross join lateral ha.guard_spec(g.relkind) s
    left join pg_catalog.pg_trigger t on t.tgrelid = g.relid and t.tgname = s.tgname
    where t.oid is null or not (t.tgtype = s.tgtype and t.tgfoid = s.fn)
       or t.tgenabled = 'D' or t.tgenabled = 'R' or (t.tgenabled = 'O' and g.can_alter)
  loop
    if r.trigger_oid is null or not r.intact or r.tgenabled in ('D', 'R') then
      execute format('create or replace trigger %I ' || r.ddl, r.tgname, r.schemaname, r.tablename);
      n := n + 1;
    end if;
    if r.can_alter then
      execute format('alter table %I.%I enable always trigger %I', r.schemaname, r.tablename, r.tgname);
    end if;
  end loop;
  return n;
end;
$$;

-- Guards that are missing, do not fire for clients (disabled, replica-only) or were altered; and
-- those left to fire only outside replica mode although this role could make them fire ALWAYS.
-- A guard in origin mode on a table the role cannot alter (auth.* on hosted Supabase) is the best
-- it can be, and is not listed (docs/ha-architecture.md says what that leaves open).
create or replace function ha.write_guard_gaps(p_schemas text[], p_names text[])
returns table (schemaname text, tablename text, problem text)
language sql
stable
security invoker
set search_path = ''
as $$
  select g.schemaname, g.tablename,
         case
           when t.oid is null then format('no %s', s.tgname)
           when t.tgtype <> s.tgtype or t.tgfoid <> s.fn then format('%s altered', s.tgname)
           when t.tgenabled = 'D' then format('%s disabled', s.tgname)
           when t.tgenabled = 'R' then format('%s set to fire in replica mode only', s.tgname)
           when t.tgenabled = 'O' and g.can_alter then format('%s does not fire in replica mode (ENABLE ALWAYS expected)', s.tgname)
         end
  from ha.guard_targets(p_schemas, p_names) g
  cross join lateral ha.guard_spec(g.relkind) s
  left join pg_catalog.pg_trigger t on t.tgrelid = g.relid and t.tgname = s.tgname
  where t.oid is null or t.tgtype <> s.tgtype or t.tgfoid <> s.fn or t.tgenabled in ('D', 'R')
     or (t.tgenabled = 'O' and g.can_alter)
  order by 1, 2, 3;
$$;

-- Guards left in origin mode because this role cannot alter the table: a session that sets
-- session_replication_role = replica (hosted Supabase lets `postgres` do that) is not refused there.
create or replace function ha.write_guard_origin_only(p_schemas text[], p_names text[])
returns table (schemaname text, tablename text)
language sql
stable
security invoker
set search_path = ''
as $$
  select distinct g.schemaname, g.tablename
  from ha.guard_targets(p_schemas, p_names) g
  join pg_catalog.pg_trigger t on t.tgrelid = g.relid and t.tgname = 'ha_write_guard'
  where t.tgenabled = 'O' and not g.can_alter
  order by 1, 2;
$$;

-- Draws the next token value. nextval alone WAL-logs 32 values ahead, so after a crash the
-- sequence would resume past the value a lifted site stored and the primary would come back
-- refusing writes; setval logs the exact value. Callers hold ha.state's row lock, so no other
-- nextval can slip in between and be overwritten.
create or replace function ha.next_write_token()
returns bigint
language sql
volatile
security invoker
set search_path = ''
as $$
  select pg_catalog.setval('ha.write_token', pg_catalog.nextval('ha.write_token'), true);
$$;

-- Revokes writes at once and records why: p_kind 'frozen' (a switchover's freeze, role kept),
-- 'standby' (demoted) or 'fenced'. The nextval is not undone if the caller's transaction rolls
-- back: a fence that was asked for holds.
create or replace function ha.set_fence(p_kind text, p_epoch bigint, p_reason text default null,
                                        p_operation uuid default null)
returns ha.state
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v ha.state;
begin
  if p_kind not in ('frozen', 'standby', 'fenced') then
    raise exception 'unknown fence kind %', p_kind using errcode = '22023';
  end if;
  select * into v from ha.state where id for update;
  -- A fence at an older epoch than the site holds comes from a driver that fell behind (it lost
  -- its operation's lease while stalled): refuse it rather than demote a newer primary.
  if p_epoch is not null and v.epoch > p_epoch then
    raise exception 'site % is at epoch %: a % fence at the older epoch % is refused', v.site, v.epoch, p_kind, p_epoch
      using errcode = '55000';
  end if;
  perform ha.next_write_token();
  update ha.state s
     set role = case p_kind when 'frozen' then s.role else p_kind end,
         fenced = (p_kind = 'fenced'),
         fenced_reason = case when p_kind = 'fenced' then p_reason end,
         frozen_by = case when p_kind = 'frozen' then p_operation end,
         epoch = greatest(s.epoch, coalesce(p_epoch, s.epoch)),
         lease_until = case when p_kind = 'frozen' then s.lease_until end,
         updated_at = now()
   where id
  returning * into v;
  return v;
end;
$$;

-- Makes this site the writable primary at p_epoch — the last act of a promotion. A fresh token
-- value is drawn first (so the site refuses until this transaction commits) and stored with the
-- new role. The lease (when on) becomes: p_lease_seconds from now on this site's clock; infinite
-- with p_lease_infinite (no standby can grant one); else it is kept as it is (a rollback's
-- unfreeze: the grant that covers it is already recorded). Refuses to go back to an older epoch.
create or replace function ha.lift_fence(p_epoch bigint, p_lease_seconds numeric default null,
                                         p_lease_infinite boolean default false)
returns ha.state
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v ha.state;
  v_token bigint;
begin
  select * into v from ha.state where id for update;
  if not found then
    raise exception 'ha.state has no row: run the setup first' using errcode = '55000';
  end if;
  if v.epoch > p_epoch then
    raise exception 'site % is at epoch %, it cannot be made primary at the older epoch %', v.site, v.epoch, p_epoch
      using errcode = '55000';
  end if;
  v_token := ha.next_write_token();
  update ha.state s
     set role = 'primary', fenced = false, fenced_reason = null, frozen_by = null, epoch = p_epoch,
         write_token = v_token,
         lease_until = case
           when s.lease_ttl_seconds is null then null
           when p_lease_infinite then 'infinity'
           when p_lease_seconds is not null
             then pg_catalog.clock_timestamp() + make_interval(secs => p_lease_seconds::float8)
           else s.lease_until end,
         updated_at = now()
   where id
  returning * into v;
  return v;
end;
$$;

-- The site's fence as the probes report it: writable or why not. lease_until is text in UTC
-- ISO-8601 (or 'infinity'), so clients need not parse PostgreSQL's timestamp output.
create or replace function ha.fence_status()
returns table (writable boolean, reason text, lease_until text, lease_ttl_seconds int)
language sql
stable
security invoker
set search_path = ''
as $$
  select ha.fence_reason(s, w.last_value) is null, ha.fence_reason(s, w.last_value),
         case when s.lease_until is null then null
              when s.lease_until = 'infinity' then 'infinity'
              else to_char(s.lease_until at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') end,
         s.lease_ttl_seconds
  from ha.write_token w
  left join ha.state s on s.id;
$$;

revoke all on function ha.scope_tables(jsonb) from public;
revoke all on function ha.fence_reason(ha.state, bigint) from public;
revoke all on function ha.fence_message(ha.state, text) from public;
revoke all on function ha.is_replication_worker() from public;
revoke all on function ha.assert_writable() from public, anon, authenticated;
revoke all on function ha.write_guard() from public, anon, authenticated;
revoke all on function ha.guard_spec("char") from public;
revoke all on function ha.write_guard_origin_only(text[], text[]) from public;
revoke all on function ha.write_check_at_commit() from public, anon, authenticated;
revoke all on function ha.guard_targets(text[], text[]) from public;
revoke all on function ha.install_write_guards(text[], text[]) from public;
revoke all on function ha.write_guard_gaps(text[], text[]) from public;
revoke all on function ha.next_write_token() from public;
revoke all on function ha.set_fence(text, bigint, text, uuid) from public;
revoke all on function ha.lift_fence(bigint, numeric, boolean) from public;
revoke all on function ha.fence_status() from public;
