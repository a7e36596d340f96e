/**
 * healingSql: after one of its connections closes, the next get() hands out a fresh pool (the
 * postgres.js 3.4.9 write-timer bug can leave a dropped connection unable to log in again), while
 * whoever still holds the old pool can keep using it until it is retired; close() ends them all.
 */
import assert from "node:assert/strict";
import { healingSql } from "../../shared/db/mod.ts";
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
