-- Removes batch telemetry completely: its pg_cron jobs and their run history, the telemetry
-- schema with all collected data, and its rows in the CLI's migration history (so a later
-- `supabase db push --include-all` installs it again from scratch).
--
--   psql "$SUPABASE_DB_URL" -v ON_ERROR_STOP=1 -f supabase/uninstall/telemetry.sql
--
-- Safe to run twice. Touches nothing outside the telemetry schema, our cron jobs and our
-- migration-history rows.
begin;

do $$
begin
  if to_regprocedure('telemetry.unschedule_jobs()') is not null then
    perform telemetry.unschedule_jobs();
  elsif to_regclass('cron.job') is not null then
    -- A partial install without the function: remove the jobs by name.
    perform cron.unschedule(j.jobid)
    from cron.job j
    where j.jobname in ('telemetry_snapshot', 'telemetry_sample', 'telemetry_cleanup') and j.username = current_user;
  end if;
end
$$;

drop schema if exists telemetry cascade;

do $$
begin
  if to_regclass('supabase_migrations.schema_migrations') is not null then
    delete from supabase_migrations.schema_migrations where name like 'telemetry\_%';
  end if;
end
$$;

commit;
