/** Migrations go through the real Supabase CLI, as the non-superuser `postgres` role. */
import assert from "node:assert/strict";
import { dbPush, REPO_ROOT, withStack } from "../harness/mod.ts";

async function migrationFiles(): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(`${REPO_ROOT}/supabase/migrations`)) {
    if (e.name.endsWith(".sql")) names.push(e.name);
  }
  return names.sort();
}

Deno.test("supabase db push applies every migration, and a second push is a no-op", async (t) => {
  await withStack({ name: "migrations", primary: true }, async (stack) => {
    const primary = stack.primary!;
    const files = await migrationFiles();
    const sql = primary.sql("supabase_admin");

    await stack.step(t, "the first push applies all migrations", async () => {
      const first = await dbPush(primary.url("postgres"));
      assert.equal(first.appliedAny, true, first.output);
      const rows =
        await sql`select version from supabase_migrations.schema_migrations order by version`;
      assert.deepEqual(rows.map((r) => r.version), files.map((f) => f.split("_")[0]));
    });

    await stack.step(
      t,
      "the schemas belong to postgres (migrations ran without superuser)",
      async () => {
        const owners = await sql`
        select nspname, pg_get_userbyid(nspowner) as owner from pg_namespace
        where nspname in ('telemetry', 'ha', 'storage_to_s3') order by 1`;
        assert.deepEqual(owners.map((r) => `${r.nspname}:${r.owner}`), [
          "ha:postgres",
          "storage_to_s3:postgres",
          "telemetry:postgres",
        ]);
      },
    );

    await stack.step(t, "a second push changes nothing", async () => {
      const before =
        await sql`select count(*)::int as n from supabase_migrations.schema_migrations`;
      const second = await dbPush(primary.url("postgres"));
      assert.equal(second.appliedAny, false, second.output);
      assert.match(second.output, /up to date/i);
      const after = await sql`select count(*)::int as n from supabase_migrations.schema_migrations`;
      assert.equal(after[0].n, before[0].n);
    });
  });
});
