/**
 * The fly router against a stand-in for the Fly Machines API whose two "machines" are real
 * PgBouncers started from deploy/fly-pgbouncer: setup and planned switchovers through it with
 * writers on both machines, the documented request shapes (FlyV1 auth for fm2_ tokens, lease
 * nonce on release), a lease held elsewhere, and every machine accounted for whatever its state:
 * a machine between states is waited for or named, a stopped one is reported and reconciles its
 * route in the entrypoint's boot check before it serves (and does not serve while no failover
 * function names the primary), one that starts meanwhile is routed too, and a failing machine
 * fails the route closed without undoing the others.
 */
import assert from "node:assert/strict";
import { FlyRouter, type RouteReport } from "../../../shared/ha/routers.ts";
import { HttpError } from "../../../shared/http/errors.ts";
import {
  FlyStandIn,
  freePort,
  mkdirOwned,
  type PgBouncer,
  serveFunctions,
  setupHa,
  waitFor,
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

async function epochOf(m: PgBouncer): Promise<number | undefined> {
  const text = await Deno.readTextFile(m.databasesFile);
  const found = /^;; epoch=(\d+)$/m.exec(text);
  return found ? Number(found[1]) : undefined;
}

/** Rejects with an HttpError of `status` whose message matches every pattern. */
async function rejectsWith(
  fn: () => Promise<unknown>,
  status: number,
  ...patterns: RegExp[]
): Promise<HttpError> {
  let caught: unknown;
  await assert.rejects(async () => {
    try {
      await fn();
    } catch (e) {
      caught = e;
      throw e;
    }
  });
  assert.ok(caught instanceof HttpError, String(caught));
  assert.equal(caught.status, status, caught.message);
  for (const p of patterns) assert.match(caught.message, p);
  return caught;
}

/** A failover function's GET /active that answers what the test says, counting bearer tokens. */
function activeStub(answer: () => { status: number; body: unknown }) {
  const seen: (string | null)[] = [];
  let origin = "";
  const server = Deno.serve({
    hostname: "127.0.0.1",
    port: 0,
    onListen: ({ port }) => (origin = `http://127.0.0.1:${port}`),
  }, (req) => {
    seen.push(req.headers.get("authorization"));
    const a = answer();
    return Response.json(a.body, { status: a.status });
  });
  return {
    url: () => `${origin}/functions/v1/failover`,
    seen,
    stop: () => server.shutdown(),
  };
}

Deno.test("the fly router: Machines API shapes, leases, every machine routed or reconciled", async (t) => {
  await withStack({ name: "fly-router", ha: true }, async (stack) => {
    await setupHa(stack);
    await mkdirOwned(stack.user, `${stack.dir}/machine2`, 0o711);
    const m1 = stack.pgbouncer!;
    const m2 = m1.sibling(`${stack.dir}/machine2`);
    await m2.start();
    const fly = new FlyStandIn("sa-pgbouncer", [m1, m2]);
    await fly.start();
    const [id1, id2] = fly.machineIds;
    const env = {
      ...stack.env(),
      PGBOUNCER_ROUTER: "fly",
      FLY_APP_NAME: "sa-pgbouncer",
      FLY_API_TOKEN: fly.token,
      FLY_API_URL: fly.origin,
    };
    // Request logs go to a file kept with the server logs when a step fails.
    const logPath = `${stack.dir}/functions.log`;
    const server = await serveFunctions(env, {
      logSink: (line) => Deno.writeTextFileSync(logPath, `${line}\n`, { append: true }),
    });
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
    const toPrimary = { host: "127.0.0.1", port: primary.port, dbname: "postgres" };
    const toStandby = { host: "127.0.0.1", port: standby.port, dbname: "postgres" };
    const router = new FlyRouter(
      fly.origin,
      "sa-pgbouncer",
      fly.token,
      "postgres",
      fetch,
      "/app/entrypoint.sh",
      { settleMs: 1500, pollMs: 100 },
    );
    /** The exec commands ("<machine> <command>") the stand-in received since `from`. */
    const execsSince = (from: number) =>
      fly.requests.slice(from).filter((q) => q.path.endsWith("/exec")).map((q) =>
        `${q.path.split("/")[5]} ${String((q.body as { cmd: string }).cmd).split(" ")[1]}`
      );
    /** The boot check's environment: both sites' upstreams, /active at `urls`. */
    const bootCheck = (urls: string, timeoutSeconds = 30) => ({
      ACTIVE_URLS: urls,
      HEALTH_TOKEN: stack.tokens.health,
      PRIMARY_UPSTREAM: `127.0.0.1:${primary.port}/postgres`,
      STANDBY_UPSTREAM: `127.0.0.1:${standby.port}/postgres`,
      BOOT_CHECK_TIMEOUT: String(timeoutSeconds),
      BOOT_CHECK_INTERVAL: "1",
    });
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
          assert.equal(await epochOf(m2), 1);
          const calls = fly.requests.map((q) =>
            `${q.method} ${q.path.replace(/^\/v1\/apps\/sa-pgbouncer/, "")}`
          );
          assert.ok(calls.includes(`POST /machines/${id1}/lease`));
          assert.ok(calls.includes(`DELETE /machines/${id2}/lease`));
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
        "the application role PgBouncer logs in as can neither read nor write ha.*",
        async () => {
          const admin = primary.sql("supabase_admin");
          const tables = await admin`
            select tablename from pg_tables where schemaname = 'ha' order by 1`;
          assert.ok(tables.length >= 4);
          const app = m1.sql({ max: 1 });
          const [{ who }] = await app`select current_user as who`;
          assert.equal(who, "app_writer");
          for (const { tablename } of tables) {
            await assert.rejects(
              () => app`select * from ${app("ha")}.${app(tablename)} limit 1`,
              (e: { code?: string }) => e.code === "42501",
              `read ha.${tablename}`,
            );
          }
          await assert.rejects(
            () => app`update ha.state set epoch = epoch + 100`,
            (e: { code?: string }) => e.code === "42501",
          );
          await assert.rejects(
            () => app`insert into ha.markers default values`,
            (e: { code?: string }) => e.code === "42501",
          );
        },
      );

      await stack.step(
        t,
        "a lease held by someone else stops the switchover before anything changes",
        async () => {
          const lease = await fetch(
            `${fly.origin}/v1/apps/sa-pgbouncer/machines/${id1}/lease`,
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
            `${fly.origin}/v1/apps/sa-pgbouncer/machines/${id1}/lease`,
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
        "a machine between states is waited for and routed once started, or named when it does not settle",
        async () => {
          fly.states.set(id2, "replacing");
          let from = fly.requests.length;
          const err = await rejectsWith(
            () => router.route(toPrimary, 1),
            503,
            new RegExp(`${id2} \\(replacing\\)`),
          );
          assert.equal(err.code, "fly_machines_unsettled");
          assert.deepEqual(execsSince(from), [], "nothing is run on any machine");

          fly.states.set(id2, "starting");
          from = fly.requests.length;
          const routing = router.route(toPrimary, 1);
          await waitFor(
            "the router to see the machine starting",
            () => fly.requests.slice(from).some((q) => q.method === "GET"),
          );
          fly.states.delete(id2);
          const report = await routing as RouteReport;
          assert.deepEqual(report.routed.sort(), [id1, id2].sort());
          assert.ok(execsSince(from).includes(`${id2} route`));
        },
      );

      await stack.step(
        t,
        "a stopped machine on an app without the boot check fails the route closed, naming it",
        async () => {
          await m2.stop();
          const from = fly.requests.length;
          const err = await rejectsWith(
            () => router.route(toPrimary, 1),
            503,
            new RegExp(`${id2} \\(stopped\\)`),
            /ACTIVE_URLS/,
          );
          assert.equal(err.code, "fly_boot_check_off");
          assert.ok(!execsSince(from).some((e) => e.endsWith(" route")), "no machine was routed");
          await m2.start();
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
          assert.equal(await epochOf(m2), 2);
          const sql = m2.sql({ max: 1 });
          const [{ ro }] = await sql`select current_setting('transaction_read_only') as ro`;
          assert.equal(ro, "off", "the restarted machine reaches the writable new primary");
        },
      );

      await stack.step(
        t,
        "a stopped machine is reported, and its boot check reconciles it onto the new target before it serves",
        async () => {
          for (const m of [m1, m2]) {
            m.env = bootCheck(failover);
            await m.stop();
            await m.start();
            assert.match(
              await Deno.readTextFile(m.logPath),
              /boot check: the persisted route is current \(standby at epoch 2\)/,
            );
          }
          await m2.stop();
          const r = await post("/failback", {});
          assert.equal(r.status, 202, JSON.stringify(r.body));
          const op = await waitOperation(failover, stack.tokens.failover, r.body.operation_id);
          assert.equal(op.state, "succeeded", `${op.step}: ${op.error}`);
          assert.deepEqual(await routeOf(m1), ["127.0.0.1", primary.port, 0]);
          assert.equal(await epochOf(m1), 3);
          assert.equal(await epochOf(m2), 2, "the stopped machine still holds the old route");

          const state = await router.current();
          assert.deepEqual(state.notServing, [{ id: id2, state: "stopped" }]);
          const report = await router.route(toPrimary, 3) as RouteReport;
          assert.deepEqual(report, { routed: [id1], notServing: [{ id: id2, state: "stopped" }] });

          const from = fly.requests.length;
          await m2.start();
          assert.deepEqual(await routeOf(m2), ["127.0.0.1", primary.port, 0]);
          assert.equal(await epochOf(m2), 3);
          assert.deepEqual(
            execsSince(from).filter((e) => e.startsWith(id2) && e.endsWith(" route")),
            [],
            "reconciled by its own boot check, not routed by the router",
          );
          const log = await Deno.readTextFile(m2.logPath);
          assert.match(
            log,
            /boot check: reconciled: .* \(epoch 2\) now routes postgres to primary .* at epoch 3/,
          );
          assert.ok(!log.includes(stack.tokens.health), "the token is never printed");
        },
      );

      await stack.step(
        t,
        "a machine that starts while the route runs is routed too",
        async () => {
          await m2.stop();
          fly.beforeExec = async (id, argv) => {
            if (id === id1 && argv[1] === "route" && !m2.running) await m2.start();
          };
          const from = fly.requests.length;
          try {
            const report = await router.route(toPrimary, 3) as RouteReport;
            assert.deepEqual(report, { routed: [id1, id2], notServing: [] });
          } finally {
            fly.beforeExec = undefined;
          }
          assert.deepEqual(
            execsSince(from).filter((e) => e.endsWith(" route")),
            [`${id1} route`, `${id2} route`],
          );
          assert.deepEqual(await routeOf(m2), ["127.0.0.1", primary.port, 0]);
        },
      );

      await stack.step(
        t,
        "a machine whose boot check gets no primary (503, unreachable, or an older epoch than reported) does not serve and exits",
        async () => {
          let answer = { status: 503, body: { primary: null, epoch: 3 } as unknown };
          const stub = activeStub(() => answer);
          try {
            const cases: [string, string][] = [
              ["503", stub.url()],
              ["unreachable", `http://127.0.0.1:${freePort()}/functions/v1/failover`],
              ["older epoch", `${stub.url()},${failover}`],
            ];
            for (const [label, urls] of cases) {
              if (label === "older epoch") {
                answer = { status: 503, body: { primary: null, epoch: 9 } };
              }
              await m2.stop();
              m2.env = bootCheck(urls, 2);
              const proc = await m2.launch();
              let served = false;
              await waitFor(`the machine to give up (${label})`, async () => {
                served ||= await m2.listening();
                return proc.exited;
              }, 30_000);
              assert.equal(served, false, `${label}: PgBouncer never listened`);
              assert.notEqual((await proc.status).code, 0, label);
              assert.equal(await epochOf(m2), 3, `${label}: the route is left alone`);
            }
            assert.ok(stub.seen.length >= 2);
            assert.ok(stub.seen.every((a) => a === `Bearer ${stack.tokens.health}`));
            const log = await Deno.readTextFile(m2.logPath);
            assert.match(log, /not serving \(the machine restarts and asks again\)/);
            assert.match(log, /primary is primary at epoch 3, but epoch 9 was reported: waiting/);
            assert.ok(!log.includes(stack.tokens.health), "the token is never printed");
          } finally {
            await stub.stop();
          }
          m2.env = bootCheck(failover);
          await m2.start();
          assert.deepEqual(await routeOf(m2), ["127.0.0.1", primary.port, 0]);
        },
      );

      // Last: it routes the endpoint away from the primary the sites agree on.
      await stack.step(
        t,
        "a failing machine fails the route closed and names it; the retry routes forward",
        async () => {
          fly.failExec = (id, argv) => id === id2 && argv[1] === "route";
          const err = await rejectsWith(
            () => router.route(toStandby, 9),
            503,
            new RegExp(`${id2} \\(injected failure\\)`),
          );
          assert.equal(err.code, "fly_route_failed");
          fly.failExec = undefined;
          assert.deepEqual(await routeOf(m1), ["127.0.0.1", standby.port, 0], "no undo");
          assert.equal(await epochOf(m1), 9);
          assert.deepEqual(await routeOf(m2), ["127.0.0.1", primary.port, 0]);
          const disagree = await rejectsWith(
            () => router.current(),
            503,
            new RegExp(id1),
            new RegExp(id2),
          );
          assert.equal(disagree.code, "pgbouncer_disagree");

          await router.route(toStandby, 9);
          for (const m of [m1, m2]) {
            assert.deepEqual(await routeOf(m), ["127.0.0.1", standby.port, 0]);
          }
          assert.equal((await router.current()).epoch, 9);
          const stale = await rejectsWith(() => router.route(toPrimary, 8), 409, new RegExp(id1));
          assert.equal(stale.code, "stale_epoch");
          // A route without an epoch would erase the held one (and let every older epoch pass
          // later): the entrypoint refuses it like a stale one and leaves the route alone.
          const bare = await m1.entrypoint([
            "route",
            "127.0.0.1",
            String(primary.port),
            "postgres",
          ]);
          assert.equal(bare.code, 3, bare.stderr);
          assert.match(bare.stderr, /holds epoch 9; give the new route's epoch/);
          assert.equal(await epochOf(m1), 9);
          assert.deepEqual(await routeOf(m1), ["127.0.0.1", standby.port, 0]);
        },
      );
    } finally {
      await server.stop();
      await fly.stop();
      await m2.stop();
    }
  });
});
