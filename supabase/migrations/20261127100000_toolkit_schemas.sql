-- The SA Toolkit's three schemas. They are never exposed to the Data API roles: everything in
-- them is reached through the toolkit's Edge Functions (service connection) or by `postgres`.
-- Re-runnable: `if not exists`, and the revokes are idempotent.

create schema if not exists telemetry;
create schema if not exists ha;
create schema if not exists storage_to_s3;

comment on schema telemetry is 'SA Toolkit: batch telemetry (snapshots, samples, diagnosis).';
comment on schema ha is 'SA Toolkit: multi-region HA/DR control state and replication tooling.';
comment on schema storage_to_s3 is 'SA Toolkit: Supabase Storage to S3 migration jobs and manifest.';

revoke all on schema telemetry, ha, storage_to_s3 from public;
revoke all on schema telemetry, ha, storage_to_s3 from anon, authenticated;
-- Functions created later in these schemas must not be executable by PUBLIC by default.
alter default privileges in schema telemetry revoke execute on functions from public;
alter default privileges in schema ha revoke execute on functions from public;
alter default privileges in schema storage_to_s3 revoke execute on functions from public;
