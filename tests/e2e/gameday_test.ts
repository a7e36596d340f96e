/**
 * The HA game day (tests/harness/gameday.ts): seeded iterations of switchovers, failbacks and
 * emergency failovers, one fault each, writers of every kind, invariants after every iteration.
 * `./toolkit test` runs a fixed seed's 10 iterations; `deno task test:soak:ha` runs 100
 * (GAMEDAY_ITERATIONS, GAMEDAY_SEED to reproduce a failure).
 */
import assert from "node:assert/strict";
import { type FlyFleet, GameDay } from "../harness/gameday.ts";
import {
  FlyStandIn,
  mkdirOwned,
  serveFunctions,
  setupHa,
  type Stack,
  withStack,
} from "../harness/mod.ts";

/**
 * The endpoint as deployed: two PgBouncer machines of a Fly app (the Machines API stand-in runs
 * deploy/fly-pgbouncer's entrypoint), each with the boot check, and functions using the fly router.
 */
async function flyFleet(stack: Stack): Promise<FlyFleet & { stop(): Promise<void> }> {
  await mkdirOwned(stack.user, `${stack.dir}/machine2`, 0o711);
  const m1 = stack.pgbouncer!;
  const m2 = m1.sibling(`${stack.dir}/machine2`);
  const boot = {
    ACTIVE_URLS: stack.functions!.url("failover"),
    HEALTH_TOKEN: stack.tokens.health,
    PRIMARY_UPSTREAM: `127.0.0.1:${stack.proxies!.primary.port}/postgres`,
    STANDBY_UPSTREAM: `127.0.0.1:${stack.proxies!.standby.port}/postgres`,
    BOOT_CHECK_TIMEOUT: "60",
    BOOT_CHECK_INTERVAL: "1",
  };
  m1.env = boot;
  m2.env = boot;
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
  return {
    fly,
    machines: [m1, m2],
    env,
    failoverUrl: server.url("failover"),
    healthUrl: server.url("health"),
    stop: async () => {
      await server.stop();
      await fly.stop();
      await m2.stop();
    },
  };
}

const ITERATIONS = Number(Deno.env.get("GAMEDAY_ITERATIONS") ?? 10);
const SEED = Number(Deno.env.get("GAMEDAY_SEED") ?? 20261203);

Deno.test(`game day: ${ITERATIONS} seeded iterations (seed ${SEED}) keep every HA invariant`, async () => {
  await withStack({
    name: "gameday",
    ha: true,
    functions: true,
    partitionable: true,
    // The logical replication launcher restarts a subscription's worker at most this often;
    // the default 5 s only slows the game day down (the reverse stream after each switchover).
    pgSettings: { wal_retrieve_retry_interval: "500ms" },
  }, async (stack) => {
    await setupHa(stack);
    const fleet = await flyFleet(stack);
    const day = new GameDay(stack, SEED, fleet);
    await day.start();
    const started = performance.now();
    try {
      for (let i = 0; i < ITERATIONS; i++) await day.iterate();
    } finally {
      await day.stop();
      await fleet.stop();
      const r = day.report;
      console.log(
        `  game day seed ${r.seed}: ${r.iterations} iterations in ${
          Math.round((performance.now() - started) / 1000)
        } s; operations ${JSON.stringify(r.operations)}; outcomes ${
          JSON.stringify(r.outcomes)
        }; faults ${
          JSON.stringify(r.faults)
        }; acknowledged writes ${r.acknowledged}; lost inside emergency RPO windows ${r.lostInEmergencyWindows}; violations ${r.violations.length}`,
      );
      if (r.violations.length || Deno.env.get("GAMEDAY_VERBOSE")) console.log(r.log.join("\n"));
    }
    assert.deepEqual(day.report.violations, []);
  });
});
