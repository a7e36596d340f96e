/**
 * healingSql: after one of its connections closes, the next get() hands out a fresh pool (the
 * postgres.js 3.4.9 write-timer bug can leave a dropped connection unable to log in again), while
 * whoever still holds the old pool can keep using it until it is retired; close() ends them all.
 */
import assert from "node:assert/strict";
import { createSql, healingSql, isOrphanTypeFetchFailure } from "../../shared/db/mod.ts";
import { waitFor, withStack } from "../harness/mod.ts";

Deno.test("healingSql renews a pool whose connection dropped, without breaking its holders", async () => {
  await withStack({ name: "db-healing", primary: true }, async (stack) => {
    const url = stack.primary!.url("postgres");
    const admin = stack.primary!.sql("supabase_admin", { max: 1 });
    const handle = healingSql(() => url, { max: 1, applicationName: "healing-test" });
    try {
      const first = handle.get();
      assert.equal(handle.get(), first, "no close, same pool");
      const [{ pid }] = await first`select pg_backend_pid() as pid`;
      await admin`select pg_terminate_backend(${pid})`;
      await waitFor("the pool to be renewed", () => handle.get() !== first, 5000, 20);
      const second = handle.get();
      const [{ pid: pid2 }] = await second`select pg_backend_pid() as pid`;
      assert.notEqual(pid2, pid);
      // The retired pool still answers for whoever holds it (it reconnects).
      const [{ one }] = await first`select 1 as one`;
      assert.equal(one, 1);
    } finally {
      await handle.close();
      await admin.end();
    }
    const [{ n }] = await stack.primary!.sql("supabase_admin", { max: 1 })`
      select count(*)::int as n from pg_stat_activity where application_name = 'healing-test'`;
    assert.equal(n, 0, "close() ended the current and the retired pool");
  });
});

Deno.test("a failed type fetch after login through PgBouncer is the caller's error, not a crash", async () => {
  await withStack({ name: "db-orphan", primary: true, pgbouncer: true }, async (stack) => {
    const url = stack.pgbouncer!.url();
    const warm = createSql(url, { max: 1 });
    await warm`select 1`; // PgBouncer now answers logins from its cached welcome
    // A client waiting for a server gives up after 2 s instead of the harness's 60.
    const admin = createSql(stack.pgbouncer!.adminUrl(), { max: 1, adminConsole: true });
    await admin.unsafe("SET query_wait_timeout = 2").simple();
    await admin.end();
    await stack.primary!.stop("immediate");
    const cold = createSql(url, { max: 1, connectTimeout: 3 });
    try {
      const err = await cold`select 1`.then(() => undefined, (e) => e);
      assert.ok(err instanceof Error, "the query fails while the server is down");
      // The same error also rejected postgres.js's own, unawaited type fetch; without the guard
      // that rejection is unhandled and this test (like a worker) dies when it surfaces.
      assert.ok(
        isOrphanTypeFetchFailure(err),
        `${err.message} / ${(err as { query?: string }).query}`,
      );
      await new Promise((r) => setTimeout(r, 300));
    } finally {
      await cold.end({ timeout: 1 });
      await warm.end({ timeout: 1 });
    }
  });
});

Deno.test("only postgres.js's own type fetch counts as an orphan", () => {
  assert.equal(isOrphanTypeFetchFailure(new Error("x")), false);
  assert.equal(isOrphanTypeFetchFailure("select 1"), false);
  assert.equal(
    isOrphanTypeFetchFailure(Object.assign(new Error("x"), { query: "select * from pg_type" })),
    false,
  );
});
