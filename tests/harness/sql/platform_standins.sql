-- Stand-ins for two platform extensions that cannot be installed here, created by the bootstrap
-- superuser after platform.sql:
--   * pg_net: `net.http_post(...)` with pg_net's signature and defaults. Like pg_net it only
--     queues the request in net.http_request_queue (the real extension's background worker then
--     sends it); tests/harness/pg_net.ts stands in for that worker where a test needs one.
--   * Supabase Vault: vault.secrets, vault.decrypted_secrets, vault.create_secret() and
--     vault.update_secret() with Vault's signatures. The secret column holds an encoding, not the plaintext, as in Vault
--     (there it is ciphertext); decrypted_secrets decodes it.
-- Grants follow hosted Supabase: `postgres` may call http_post, create secrets and read
-- decrypted_secrets; anon and authenticated get nothing.

create schema if not exists net;
grant usage on schema net to postgres, service_role;

create table if not exists net.http_request_queue (
  id bigserial primary key,
  method text not null,
  url text not null,
  headers jsonb not null,
  body bytea,
  timeout_milliseconds int not null
);

create table if not exists net._http_response (
  id bigint,
  status_code int,
  content_type text,
  headers jsonb,
  content text,
  timed_out boolean,
  error_msg text,
  created timestamptz not null default now()
);

create or replace function net.http_post(
  url text,
  body jsonb default '{}'::jsonb,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
  timeout_milliseconds int default 5000
)
returns bigint
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
  v_id bigint;
  v_content_type text;
  v_query text;
begin
  select h.value into v_content_type
  from jsonb_each_text(coalesce(headers, '{}'::jsonb)) h
  where lower(h.key) = 'content-type'
  limit 1;
  if v_content_type is null then
    headers := coalesce(headers, '{}'::jsonb) || '{"Content-Type": "application/json"}'::jsonb;
  elsif v_content_type <> 'application/json' then
    raise exception 'Content-Type header must be "application/json"';
  end if;
  select string_agg(format('%s=%s', p.key, p.value), '&') into v_query from jsonb_each_text(coalesce(params, '{}'::jsonb)) p;
  insert into net.http_request_queue (method, url, headers, body, timeout_milliseconds)
  values ('POST', case when v_query is null then url else url || '?' || v_query end, headers,
          convert_to(body::text, 'UTF8'), timeout_milliseconds)
  returning id into v_id;
  return v_id;
end;
$$;

revoke all on function net.http_post(text, jsonb, jsonb, jsonb, int) from public;
grant execute on function net.http_post(text, jsonb, jsonb, jsonb, int) to postgres, service_role;
grant select on net.http_request_queue, net._http_response to postgres, service_role;

create schema if not exists vault;
grant usage on schema vault to postgres, service_role;

create table if not exists vault.secrets (
  id uuid primary key default gen_random_uuid(),
  name text,
  description text not null default '',
  secret text not null,
  key_id uuid,
  nonce bytea,
  created_at timestamptz not null default current_timestamp,
  updated_at timestamptz not null default current_timestamp
);
create unique index if not exists secrets_name_idx on vault.secrets (name) where name is not null;

create or replace view vault.decrypted_secrets as
select s.id, s.name, s.description, s.secret,
       convert_from(decode(s.secret, 'base64'), 'UTF8') as decrypted_secret,
       s.key_id, s.nonce, s.created_at, s.updated_at
from vault.secrets s;

create or replace function vault.create_secret(
  new_secret text,
  new_name text default null,
  new_description text default '',
  new_key_id uuid default null
)
returns uuid
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_id uuid;
begin
  insert into vault.secrets (secret, name, description, key_id)
  values (encode(convert_to(new_secret, 'UTF8'), 'base64'), new_name, coalesce(new_description, ''), new_key_id)
  returning id into v_id;
  return v_id;
end;
$$;

-- Vault's rotation: null arguments leave a field as it is.
create or replace function vault.update_secret(
  secret_id uuid,
  new_secret text default null,
  new_name text default null,
  new_description text default null,
  new_key_id uuid default null
)
returns void
language plpgsql
security definer
set search_path = ''
as $$
begin
  update vault.secrets s
     set secret = coalesce(encode(convert_to(new_secret, 'UTF8'), 'base64'), s.secret),
         name = coalesce(new_name, s.name),
         description = coalesce(new_description, s.description),
         key_id = coalesce(new_key_id, s.key_id),
         updated_at = current_timestamp
   where s.id = secret_id;
end;
$$;

revoke all on vault.secrets, vault.decrypted_secrets from public;
revoke all on function vault.create_secret(text, text, text, uuid) from public;
revoke all on function vault.update_secret(uuid, text, text, text, uuid) from public;
grant execute on function vault.update_secret(uuid, text, text, text, uuid) to postgres, service_role;
grant select on vault.decrypted_secrets to postgres, service_role;
grant select, delete on vault.secrets to postgres, service_role;
grant execute on function vault.create_secret(text, text, text, uuid) to postgres, service_role;
