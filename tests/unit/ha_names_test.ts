/**
 * Names and connection strings the HA tool builds: tables are (schema, name) pairs, never split
 * on a dot; a subscription's conninfo carries the URL's TLS settings, quoted for libpq.
 */
import assert from "node:assert/strict";
import { conninfo, qualified, tableLabel } from "../../shared/ha/replication.ts";

Deno.test("a table named a.b stays one identifier", () => {
  assert.equal(qualified({ schema: "public", name: "a.b" }), '"public"."a.b"');
  assert.equal(tableLabel({ schema: "public", name: "a.b" }), 'public."a.b"');
  assert.equal(qualified({ schema: 'we"ird', name: "x" }), '"we""ird"."x"');
  assert.equal(tableLabel({ schema: "public", name: "ledger" }), "public.ledger");
  assert.equal(tableLabel({ schema: "Public", name: "T" }), '"Public"."T"');
});

Deno.test("the subscription's conninfo carries the URL's TLS settings", () => {
  const c = conninfo(
    "postgresql://postgres:p%27w@db.abc.supabase.co:5432/postgres?sslmode=verify-full&sslrootcert=/etc/ssl/supabase-ca.crt&sslsni=1&application_name=x",
  );
  assert.match(c, /host='db\.abc\.supabase\.co'/);
  assert.match(c, /sslmode='verify-full'/);
  assert.match(c, /sslrootcert='\/etc\/ssl\/supabase-ca\.crt'/);
  assert.match(c, /sslsni='1'/);
  assert.match(c, /password='p\\'w'/, "a quote in the password is escaped for libpq");
  assert.doesNotMatch(c, /application_name/, "only connection and TLS parameters are carried");
});

Deno.test("without TLS parameters the conninfo has none", () => {
  const c = conninfo("postgresql://u:p@127.0.0.1:6543/db");
  assert.doesNotMatch(c, /ssl/);
  assert.match(c, /port='6543'/);
  assert.match(c, /dbname='db'/);
});
