/**
 * The fly router against a stand-in for the Fly Machines API whose two "machines" are real
 * PgBouncers started from deploy/fly-pgbouncer: setup and a planned switchover through it with
 * writers on both machines, the documented request shapes (FlyV1 auth for fm2_ tokens, lease
 * nonce on release), all-or-nothing routing, a lease held elsewhere, and a machine restart that
 * boots onto the persisted new target.
 */
import assert from "node:assert/strict";
import { FlyRouter } from "../../../shared/ha/routers.ts";
import {
  FlyStandIn,
  mkdirOwned,
  type PgBouncer,
  serveFunctions,
  setupHa,
  waitOperation,
  withStack,
  Writers,
} from "../../harness/mod.ts";

async function routeOf(m: PgBouncer): Promise<[string, number, number]> {
  const admin = m.admin();
  const rows = await admin.unsafe("SHOW DATABASES").simple();
  const row = rows.find((r: Record<string, unknown>) => r.name === "postgres")!;
  return [String(row.host), Number(row.port), Number(row.paused)];
}

Deno.test("the fly router: Machines API shapes, all-or-nothing, leases, persisted target", async (t) => {
  await withStack({ name: "fly-router", ha: true }, async (stack) => {
    await setupHa(stack);
    await mkdirOwned(stack.user, `${stack.dir}/machine2`, 0o711);
    const m1 = stack.pgbouncer!;
    const m2 = m1.sibling(`${stack.dir}/machine2`);
    await m2.start();
    const fly = new FlyStandIn("sa-pgbouncer", [m1, m2]);
    await fly.start();
    const env = {
      ...stack.env(),
      PGBOUNCER_ROUTER: "fly",
      FLY_APP_NAME: "sa-pgbouncer",
      FLY_API_TOKEN: fly.token,
      FLY_API_URL: fly.origin,
    };
    const server = await serveFunctions(env);
    const failover = server.url("failover");
    const post = async (path: string, body: unknown) => {
      const res = await fetch(`${failover}${path}`, {
        method: "POST",
        headers: {
          authorization: `Bearer ${stack.tokens.failover}`,
          "content-type": "application/json",
        },
        body: JSON.stringify(body),
      });
      return { status: res.status, body: await res.json() };
    };
    const primary = stack.primary!;
    const standby = stack.standby!;
    try {
      await stack.step(
        t,
        "setup through the fly router routes every machine at the epoch",
        async () => {
          const r = await post("/setup", {});
          assert.equal(r.status, 200, JSON.stringify(r.body));
          assert.ok(
            (r.body.actions as string[]).includes("PgBouncer routed to primary at epoch 1"),
          );
          for (const m of [m1, m2]) {
            assert.deepEqual(await routeOf(m), ["127.0.0.1", primary.port, 0]);
          }
          assert.match(await Deno.readTextFile(m2.databasesFile), /^;; epoch=1$/m);
          const calls = fly.requests.map((q) =>
            `${q.method} ${q.path.replace(/^\/v1\/apps\/sa-pgbouncer/, "")}`
          );
          assert.ok(calls.includes(`POST /machines/${fly.machineIds[0]}/lease`));
          assert.ok(calls.includes(`DELETE /machines/${fly.machineIds[1]}/lease`));
          assert.ok(
            fly.requests.every((q) => q.status !== 401),
            "FlyV1 auth accepted for an fm2_ token",
          );
          const exec = fly.requests.find((q) => q.path.endsWith("/exec"))!;
          assert.deepEqual(Object.keys(exec.body as object).sort(), ["cmd", "timeout"]);
          const health = await fetch(`${server.url("health")}/pgbouncer`, {
            headers: { authorization: `Bearer ${stack.tokens.health}` },
          });
          assert.equal(health.status, 200);
          await health.body?.cancel();
        },
      );

      await stack.step(
        t,
        "routing is all-or-nothing: a failing machine puts the other back",
        async () => {
          const router = new FlyRouter(fly.origin, "sa-pgbouncer", fly.token, "postgres");
          fly.failExec = (id, argv) => id === fly.machineIds[1] && argv[1] === "route";
          await assert.rejects(() =>
            router.route({ host: "127.0.0.1", port: standby.port, dbname: "postgres" }, 9)
          );
          fly.failExec = undefined;
          for (const m of [m1, m2]) {
            assert.deepEqual(await routeOf(m), ["127.0.0.1", primary.port, 0]);
          }
          assert.equal((await router.current()).epoch, 1);
        },
      );

      await stack.step(
        t,
        "a lease held by someone else stops the switchover before anything changes",
        async () => {
          const lease = await fetch(
            `${fly.origin}/v1/apps/sa-pgbouncer/machines/${fly.machineIds[0]}/lease`,
            {
              method: "POST",
              headers: { authorization: `Bearer ${fly.token}`, "content-type": "application/json" },
              body: JSON.stringify({ ttl: 60, description: "someone else" }),
            },
          );
          const nonce = (await lease.json()).data.nonce;
          const r = await post("/", { mode: "planned" });
          assert.equal(r.status, 202);
          const op = await waitOperation(failover, stack.tokens.failover, r.body.operation_id);
          assert.equal(op.state, "rolled_back");
          assert.match(String(op.error), /leased by another operation/);
          for (const m of [m1, m2]) {
            assert.deepEqual(await routeOf(m), ["127.0.0.1", primary.port, 0]);
          }
          const release = await fetch(
            `${fly.origin}/v1/apps/sa-pgbouncer/machines/${fly.machineIds[0]}/lease`,
            {
              method: "DELETE",
              headers: { authorization: `Bearer ${fly.token}`, "fly-machine-lease-nonce": nonce },
            },
          );
          assert.equal(release.status, 200);
          await release.body?.cancel();
        },
      );

      await stack.step(
        t,
        "planned switchover through both machines loses nothing; a restarted machine keeps the new target",
        async () => {
          const w1 = new Writers(m1.url(), 2);
          const w2 = new Writers(m2.url(), 2, 5, 11);
          w1.start();
          w2.start();
          await Promise.all([w1.progress(100), w2.progress(100)]);
          const r = await post("/", { mode: "planned" });
          assert.equal(r.status, 202, JSON.stringify(r.body));
          const op = await waitOperation(failover, stack.tokens.failover, r.body.operation_id);
          assert.equal(op.state, "succeeded", `${op.step}: ${op.error}`);
          await Promise.all([w1.progress(100), w2.progress(100)]);
          for (const w of [w1, w2]) {
            const stats = await w.stop();
            assert.deepEqual(await w.missingOn(standby.sql("supabase_admin")), []);
            assert.equal(stats.duplicateKeyErrors, 0);
          }
          for (const m of [m1, m2]) {
            assert.deepEqual(await routeOf(m), ["127.0.0.1", standby.port, 0]);
          }
          await m2.stop();
          await m2.start();
          assert.deepEqual(await routeOf(m2), ["127.0.0.1", standby.port, 0]);
          assert.match(await Deno.readTextFile(m2.databasesFile), /^;; epoch=2$/m);
          const sql = m2.sql({ max: 1 });
          const [{ ro }] = await sql`select current_setting('transaction_read_only') as ro`;
          assert.equal(ro, "off", "the restarted machine reaches the writable new primary");
        },
      );
    } finally {
      await server.stop();
      await fly.stop();
      await m2.stop();
    }
  });
});
