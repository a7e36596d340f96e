/**
 * Resumability: the failover driver "dies" right after each step of a planned switchover (the
 * test hook stops it without touching anything, like a killed Edge Function), and a new function
 * instance resumes the operation by its idempotency key once the lease has expired. Every run
 * must end in the same state — target primary, PgBouncer routed there at the next epoch, reverse
 * replication running — with no acknowledged write lost. Also: a timeout before the repoint rolls
 * back to the starting state, and a failure after it fails closed until an operator resumes.
 */
import assert from "node:assert/strict";
import { loadFailoverConfig } from "../../shared/config/mod.ts";
import { PLANNED_STEPS } from "../../shared/ha/failover.ts";
import { createRouter, type Router } from "../../shared/ha/routers.ts";
import { healthClient } from "../harness/ha_client.ts";
import {
  type FunctionDeps,
  serveFunctions,
  setupHa,
  type Stack,
  waitFor,
  waitOperation,
  withStack,
  Writers,
} from "../harness/mod.ts";

const LEASE_MS = 800;

async function post(base: string, token: string, path: string, body: unknown) {
  const res = await fetch(`${base}${path}`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
}

async function withFunctions<T>(
  stack: Stack,
  deps: FunctionDeps,
  fn: (base: string) => Promise<T>,
): Promise<T> {
  const server = await serveFunctions(stack.env(), { deps });
  try {
    return await fn(server.url("failover"));
  } finally {
    await server.stop();
  }
}

/** Roles, epoch and routing as the health probes see them. */
async function settled(stack: Stack) {
  const h = healthClient(stack);
  const [p, s, b] = await Promise.all([h.get("/primary"), h.get("/standby"), h.get("/pgbouncer")]);
  return {
    primary: p.body.site,
    epoch: p.body.epoch,
    standby: s.status === 200 ? s.body.site : `unhealthy: ${s.body.reason}`,
    pgbouncer: b.status,
  };
}

Deno.test("failover resumes after a crash at every step boundary; rollback and fail-closed", async (t) => {
  await withStack({ name: "failover-crash", ha: true, functions: true }, async (stack) => {
    await setupHa(stack);
    const writers = new Writers(stack.pgbouncer!.url(), 2, 10);
    writers.start();
    let epoch = 1;
    let primary = "primary";

    for (const step of PLANNED_STEPS) {
      await stack.step(t, `crash after ${step}, then resume`, async () => {
        const key = `crash-${step}`;
        const target = primary === "primary" ? "standby" : "primary";
        const id = await withFunctions(
          stack,
          { failover: { crashAfter: step, leaseMs: LEASE_MS } },
          async (base) => {
            const r = await post(base, stack.tokens.failover, "/", {
              mode: "planned",
              idempotency_key: key,
            });
            assert.equal(r.status, 202, JSON.stringify(r.body));
            const op = await waitOperation(base, stack.tokens.failover, r.body.operation_id, {
              until: (o) => o.driver === "lost (resume it)" || o.state !== "running",
              timeoutMs: 30_000,
            });
            assert.equal(op.state, "running", "the crashed operation stays running");
            assert.ok(
              (op.steps ?? []).some((s) => s.step === step && s.outcome === "done"),
              `${step} done before the crash`,
            );
            return r.body.operation_id as string;
          },
        );
        await withFunctions(stack, { failover: { leaseMs: LEASE_MS } }, async (base) => {
          const again = await post(base, stack.tokens.failover, "/", {
            mode: "planned",
            idempotency_key: key,
          });
          assert.equal(again.status, 202, JSON.stringify(again.body));
          assert.equal(again.body.operation_id, id);
          assert.equal(again.body.resumed, true);
          const op = await waitOperation(base, stack.tokens.failover, id);
          assert.equal(op.state, "succeeded", `${op.step}: ${op.error}`);
        });
        epoch++;
        primary = target;
        await waitFor(
          "the pair to settle",
          async () => {
            const s = await settled(stack);
            return s.primary === target &&
              s.standby === (target === "primary" ? "standby" : "primary") && s.pgbouncer === 200;
          },
          20_000,
          100,
        );
        assert.deepEqual(await settled(stack), {
          primary: target,
          epoch,
          standby: target === "primary" ? "standby" : "primary",
          pgbouncer: 200,
        });
        await writers.progress(20);
      });
    }

    await stack.step(t, "no acknowledged write was lost across all the crashes", async () => {
      await writers.progress(50);
      const stats = await writers.stop();
      const sql = (primary === "primary" ? stack.primary! : stack.standby!).sql("supabase_admin");
      assert.deepEqual(await writers.missingOn(sql), []);
      assert.equal(stats.duplicateKeyErrors, 0);
      console.log(
        `  ${PLANNED_STEPS.length} crashed switchovers: ${stats.acked} commits acknowledged, none lost`,
      );
    });

    await stack.step(
      t,
      "a marker that never arrives times out before the repoint: rolled back to the start",
      async () => {
        const other = primary === "primary" ? stack.standby! : stack.primary!;
        const lock = await other.sql("supabase_admin", { max: 1 }).reserve();
        await lock`begin`;
        await lock`lock table ha.markers in share mode`; // blocks the apply, not our reads
        try {
          const before = await settled(stack);
          await withFunctions(
            stack,
            { failover: { limits: { markerTimeoutMs: 1500 } } },
            async (base) => {
              const r = await post(base, stack.tokens.failover, "/", { mode: "planned" });
              assert.equal(r.status, 202);
              const op = await waitOperation(base, stack.tokens.failover, r.body.operation_id);
              assert.equal(op.state, "rolled_back");
              assert.equal(op.step, "wait_marker");
              assert.match(String(op.error), /marker to arrive/);
              const undone = (op.steps ?? []).find((s) => s.outcome === "rolled_back")!.details
                .undone as string[];
              assert.deepEqual(undone, [
                "source unfrozen",
                "PgBouncer resumed",
                "reverse subscription dropped",
              ]);
              const src = primary === "primary" ? stack.primary! : stack.standby!;
              const [{ n }] = await src.sql("supabase_admin", { max: 1 })`
                select count(*)::int as n from pg_subscription`;
              assert.equal(n, 0, "the prepared reverse subscription is gone from the primary");
            },
          );
          await lock`rollback`;
          await waitFor(
            "the pair to settle",
            async () => JSON.stringify(await settled(stack)) === JSON.stringify(before),
            20_000,
            100,
          );
          const src = (primary === "primary" ? stack.primary! : stack.standby!).sql("postgres", {
            max: 1,
          });
          await src`insert into public.ledger (writer, n) values (500, 1)`; // writable again
        } finally {
          await lock`rollback`.catch(() => {});
          lock.release();
        }
      },
    );

    await stack.step(
      t,
      "a failure after the repoint fails closed (still paused); resuming completes it",
      async () => {
        const env = stack.env();
        const real = createRouter(loadFailoverConfig(env));
        let failures = 1;
        const flaky: Router = {
          kind: real.kind,
          pause: (ms) => real.pause(ms),
          current: () => real.current(),
          route: (target, e) => real.route(target, e),
          resume: () =>
            failures-- > 0 ? Promise.reject(new Error("injected: RESUME lost")) : real.resume(),
          close: () => real.close?.() ?? Promise.resolve(),
        };
        const target = primary === "primary" ? "standby" : "primary";
        await withFunctions(
          stack,
          { failover: { router: flaky }, health: { router: flaky } },
          async (base) => {
            const r = await post(base, stack.tokens.failover, "/", { mode: "planned" });
            const op = await waitOperation(base, stack.tokens.failover, r.body.operation_id);
            assert.equal(op.state, "failed_closed");
            assert.equal(op.step, "resume");
            assert.equal(
              (await real.current()).paused,
              true,
              "PgBouncer stays paused for an operator",
            );
            const resumed = await post(
              base,
              stack.tokens.failover,
              `/operations/${r.body.operation_id}/resume`,
              {},
            );
            assert.equal(resumed.status, 202);
            const done = await waitOperation(base, stack.tokens.failover, r.body.operation_id);
            assert.equal(done.state, "succeeded");
          },
        );
        await real.close?.();
        primary = target;
        await waitFor(
          "the pair to settle",
          async () => (await settled(stack)).primary === target,
          20_000,
          100,
        );
      },
    );
  });
});
