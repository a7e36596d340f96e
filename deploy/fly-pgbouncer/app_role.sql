-- The application role PgBouncer logs in as. Run it on BOTH projects with the same password
-- (PgBouncer logs in to whichever is primary), as `postgres`, before the toolkit's setup:
--
--   APP_DB_PASSWORD='...' psql "$PRIMARY_DB_URL" -f deploy/fly-pgbouncer/app_role.sql
--   APP_DB_PASSWORD='...' psql "$STANDBY_DB_URL" -f deploy/fly-pgbouncer/app_role.sql
--
-- Why not `postgres`: the owner of the tables can disable the toolkit's write guard
-- (ALTER TABLE … DISABLE TRIGGER) and owns the ha schema, so a client logged in as `postgres` can
-- lift the fence it is supposed to be stopped by. app_writer can read and write the application's
-- tables and nothing else: no rights on the ha, telemetry or storage_to_s3 schemas, no ownership.
\getenv app_password APP_DB_PASSWORD
\if :{?app_password}
\else
  \warn 'APP_DB_PASSWORD is not set'
  \quit
\endif

do $$
begin
  if not exists (select from pg_catalog.pg_roles where rolname = 'app_writer') then
    create role app_writer login noinherit;
  end if;
end
$$;
alter role app_writer password :'app_password';

grant usage on schema public to app_writer;
grant select, insert, update, delete, truncate on all tables in schema public to app_writer;
grant usage, select on all sequences in schema public to app_writer;
-- Tables and sequences the migrations create later (as postgres) are granted too.
alter default privileges for role postgres in schema public
  grant select, insert, update, delete, truncate on tables to app_writer;
alter default privileges for role postgres in schema public
  grant usage, select on sequences to app_writer;
