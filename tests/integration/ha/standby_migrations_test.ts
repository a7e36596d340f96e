/**
 * Migrations on a read-only site (the standby, or a demoted primary): `supabase db push` opens
 * ordinary transactions, which the database's read-only default refuses; with the documented
 * `options=-c default_transaction_read_only=off` in the URL the real CLI's session lifts it for
 * itself and the push applies (docs/ha-architecture.md, "Migrations on both sites").
 */
import assert from "node:assert/strict";
import { dbPush, withStack } from "../../harness/mod.ts";

Deno.test("supabase db push reaches a read-only standby through the documented options URL", async () => {
  await withStack({ name: "ro-push", primary: true }, async (stack) => {
    const c = stack.primary!;
    await c.psql("alter database postgres set default_transaction_read_only = on;");
    const url = c.url("postgres");
    await assert.rejects(() => dbPush(url), /read-only transaction/);
    await dbPush(`${url}?options=-c%20default_transaction_read_only%3Doff`);
    const sql = c.sql("supabase_admin", { max: 1 });
    const [{ n }] = await sql`select count(*)::int as n from supabase_migrations.schema_migrations`;
    const files = [...Deno.readDirSync("supabase/migrations")].filter((f) =>
      f.name.endsWith(".sql")
    );
    assert.equal(n, files.length, "every migration applied");
    const [{ ro }] = await sql`
      select coalesce(bool_or(s = 'default_transaction_read_only=on'), false) as ro
      from pg_db_role_setting d, unnest(d.setconfig) s where d.setrole = 0`;
    assert.equal(ro, true, "the site stays read-only by default");
  });
});
