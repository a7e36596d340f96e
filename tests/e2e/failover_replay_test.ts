/**
 * Operations that cannot be replayed into harm: a resumed operation re-checks its plan (412,
 * nothing changed) and its epochs (409 when the pair moved on; abandon closes it); setup refuses
 * while an operation runs and takes its epoch from every witness; the router never goes back in
 * epoch; a driver that loses its lease stops before its next action and never rolls back without
 * re-claiming it; rejoin refuses to cascade into tables that do not replicate.
 */
import assert from "node:assert/strict";
import { loadFailoverConfig } from "../../shared/config/mod.ts";
import type { Faults } from "../../shared/ha/failover.ts";
import { createRouter } from "../../shared/ha/routers.ts";
import { failoverClient } from "../harness/ha_client.ts";
import {
  haState,
  serveFunctions,
  setupHa,
  type Stack,
  waitFor,
  waitOperation,
  waitReplicating,
  withStack,
} from "../harness/mod.ts";

const LEASE_MS = 900;

async function post(base: string, token: string, path: string, body: unknown) {
  const res = await fetch(`${base}${path}`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
}

/** A failover function with test hooks, for one call; stopped afterwards ("the driver died"). */
async function withDriver<T>(
  stack: Stack,
  faults: Faults,
  fn: (base: string) => Promise<T>,
  limits: Record<string, unknown> = {},
): Promise<T> {
  const server = await serveFunctions(stack.env(), {
    deps: { failover: { faults, leaseMs: LEASE_MS, limits } },
  });
  try {
    return await fn(server.url("failover"));
  } finally {
    await server.stop();
  }
}

/** Starts a planned switchover whose driver "dies" right after `step`; returns its id. */
async function crashAfter(stack: Stack, step: string, key: string): Promise<string> {
  return await withDriver(stack, { crashAfter: step }, async (base) => {
    const r = await post(base, stack.tokens.failover, "/", {
      mode: "planned",
      idempotency_key: key,
    });
    assert.equal(r.status, 202, JSON.stringify(r.body));
    await waitOperation(base, stack.tokens.failover, r.body.operation_id, {
      until: (o) => o.driver === "lost (resume it)",
      timeoutMs: 20_000,
    });
    return r.body.operation_id as string;
  });
}

/** Changes an operation's row wherever it is stored (on the site that takes over). */
async function onOperation(stack: Stack, id: string, set: string): Promise<void> {
  for (const site of ["primary", "standby"] as const) {
    await sqlOn(stack, site, `update ha.operations set ${set} where id = '${id}'`);
  }
}

async function sqlOn(stack: Stack, site: "primary" | "standby", text: string) {
  const c = site === "primary" ? stack.primary! : stack.standby!;
  const sql = c.sql("supabase_admin", { max: 1 });
  try {
    await sql`set default_transaction_read_only = off`;
    return await sql.unsafe(text);
  } finally {
    await sql.end();
  }
}

Deno.test("replay safety: resumes re-check the world, abandon, epochs only move forward, lease loss stops the driver", async (t) => {
  await withStack({ name: "replay", ha: true, functions: true }, async (stack) => {
    await setupHa(stack);
    const f = failoverClient(stack);

    await stack.step(
      t,
      "a resumed operation whose guardrail no longer holds is refused (412) and changes nothing",
      async () => {
        const id = await crashAfter(stack, "seq_prebump", "replay-plan");
        await stack.standby!.psql("alter subscription dr_subscription disable;");
        const before = await haState(stack);
        const r = await f.post("/", { mode: "planned", idempotency_key: "replay-plan" });
        assert.equal(r.status, 412, JSON.stringify(r.body));
        assert.equal(r.body.error, "guardrail_failed");
        assert.ok((r.body.details as { failed: string[] }).failed.includes("subscription_healthy"));
        assert.equal(await haState(stack), before);
        // Setup refuses while the operation is (still) running.
        const setup = await f.post("/setup", {});
        assert.equal(setup.status, 409);
        assert.equal(setup.body.error, "operation_in_progress");
        await stack.standby!.psql("alter subscription dr_subscription enable;");
        await waitReplicating(stack);
        const again = await f.post(`/operations/${id}/resume`, {});
        assert.equal(again.status, 202, JSON.stringify(again.body));
        const op = await waitOperation(f.base, f.token, id);
        assert.equal(op.state, "succeeded", `${op.step}: ${op.error}`);
      },
    );

    await stack.step(
      t,
      "an operation whose pair moved on is refused (409 stale_operation) and can be abandoned",
      async () => {
        const id = await crashAfter(stack, "pause", "replay-stale");
        const router = createRouter(loadFailoverConfig(stack.env()));
        try {
          // Another actor moved the pair on: PgBouncer now carries a newer epoch, same target.
          const cur = await router.current();
          await router.route(cur.target!, cur.epoch! + 2);
          const before = await haState(stack);
          const r = await f.post(`/operations/${id}/resume`, {});
          assert.equal(r.status, 409, JSON.stringify(r.body));
          assert.equal(r.body.error, "stale_operation");
          assert.equal(await haState(stack), before, "a refused resume changes nothing");
          // The router refuses to go back in epoch, or elsewhere at its epoch.
          await assert.rejects(() => router.route(cur.target!, cur.epoch!), /stale_epoch|refused/);
          const other = { ...cur.target!, port: cur.target!.port + 1 };
          await assert.rejects(() => router.route(other, cur.epoch! + 2), /another upstream/);
          const abandoned = await f.post(`/operations/${id}/abandon`, { reason: "moved on" });
          assert.equal(abandoned.status, 200, JSON.stringify(abandoned.body));
          assert.equal(abandoned.body.state, "abandoned");
          assert.equal(abandoned.body.error, "abandoned by an operator: moved on");
          assert.equal((await f.post(`/operations/${id}/abandon`, {})).status, 409);
          const replay = await f.post("/", { mode: "planned", idempotency_key: "replay-stale" });
          assert.equal(replay.status, 200, "a replayed key reports the abandoned operation");
          assert.equal(replay.body.state, "abandoned");
          // The operator resumes PgBouncer (the abandoned operation had paused it) and re-runs
          // setup, which takes the epoch from every witness: the router's.
          await router.resume();
          const setup = await f.post("/setup", {});
          assert.equal(setup.status, 200, JSON.stringify(setup.body));
          assert.equal(setup.body.epoch, cur.epoch! + 2);
        } finally {
          await router.close?.();
        }
      },
    );

    await stack.step(
      t,
      "a driver that loses its lease stops before its next action",
      async () => {
        let thief = "";
        const op = await withDriver(stack, {
          beforeStep: async (step, id) => {
            if (step !== "pause") return;
            // Another driver takes the lease over just before the pause.
            await onOperation(
              stack,
              id,
              "lease_owner = 'thief', lease_expires_at = now() + interval '1 minute'",
            );
            thief = id;
            await new Promise((r) => setTimeout(r, LEASE_MS)); // the driver's renewals run meanwhile
          },
        }, async (base) => {
          const r = await post(base, stack.tokens.failover, "/", { mode: "planned" });
          assert.equal(r.status, 202, JSON.stringify(r.body));
          await waitFor("the lease to be taken", () => thief !== "", 10_000, 50);
          await new Promise((r) => setTimeout(r, LEASE_MS)); // time for a wrongful next action
          return await waitOperation(base, stack.tokens.failover, r.body.operation_id, {
            until: () => true,
          });
        });
        const steps = (await f.get(`/operations/${op.operation_id}`)).body.steps as {
          step: string;
          outcome: string;
        }[];
        assert.equal(op.state, "running");
        assert.ok(
          !steps.some((s) => s.step === "pause" && s.outcome === "done"),
          "it did not pause",
        );
        assert.equal((await createRouter(loadFailoverConfig(stack.env())).current()).paused, false);
        await onOperation(stack, op.operation_id, "lease_expires_at = now() - interval '1 s'");
        const resumed = await f.post(`/operations/${op.operation_id}/resume`, {});
        assert.equal(resumed.status, 202, JSON.stringify(resumed.body));
        const done = await waitOperation(f.base, f.token, op.operation_id);
        assert.equal(done.state, "succeeded", `${done.step}: ${done.error}`);
      },
    );

    await stack.step(
      t,
      "a driver that fails after losing its lease does not roll back (the holder decides)",
      async () => {
        const op = await withDriver(stack, {
          failAt: "marker",
          beforeStep: async (step, id) => {
            if (step !== "marker") return;
            await onOperation(
              stack,
              id,
              "lease_owner = 'thief', lease_expires_at = now() + interval '1 minute'",
            );
          },
        }, async (base) => {
          const r = await post(base, stack.tokens.failover, "/", { mode: "planned" });
          assert.equal(r.status, 202, JSON.stringify(r.body));
          return await waitOperation(base, stack.tokens.failover, r.body.operation_id, {
            until: (o) =>
              (o.steps ?? []).some((s) => s.step === "marker" && s.outcome === "failed"),
            timeoutMs: 15_000,
          });
        });
        const steps = (await f.get(`/operations/${op.operation_id}`)).body.steps as {
          outcome: string;
        }[];
        assert.equal(op.state, "running", "not rolled back by a driver without the lease");
        assert.ok(!steps.some((s) => s.outcome === "rolled_back"));
        const router = createRouter(loadFailoverConfig(stack.env()));
        assert.equal((await router.current()).paused, true, "left as it was, for the holder");
        await router.close?.();
        // The holder's lease runs out; resuming finishes the switchover.
        await onOperation(stack, op.operation_id, "lease_expires_at = now() - interval '1 s'");
        const resumed = await f.post(`/operations/${op.operation_id}/resume`, {});
        assert.equal(resumed.status, 202, JSON.stringify(resumed.body));
        const done = await waitOperation(f.base, f.token, op.operation_id);
        assert.equal(done.state, "succeeded", `${done.step}: ${done.error}`);
      },
    );

    await stack.step(
      t,
      "rejoin refuses (412) when a table outside the scope references a replicated one; nothing changes",
      async () => {
        const status = await f.get("/active");
        const standby = status.body.primary === "primary" ? "standby" : "primary";
        const c = standby === "primary" ? stack.primary! : stack.standby!;
        await c.psql(
          `create schema app_private;
           create table app_private.notes (id int primary key, ledger_id bigint references public.ledger (id));`,
          { role: "postgres" },
        );
        const before = await haState(stack);
        const r = await f.post("/rejoin", { site: standby, discard_unreplicated: true });
        assert.equal(r.status, 412, JSON.stringify(r.body));
        assert.equal(r.body.error, "unpublished_references");
        assert.deepEqual((r.body.details as { tables: string[] }).tables, ["app_private.notes"]);
        assert.equal(await haState(stack), before);
        await c.psql("drop schema app_private cascade;", { role: "postgres" });
        const ok = await f.post("/rejoin", { site: standby, discard_unreplicated: true });
        assert.equal(ok.status, 200, JSON.stringify(ok.body));
        await waitReplicating(stack);
        await waitFor(
          "the rebuilt standby to match",
          async () => (await f.get("/verify")).body.match === true,
          30_000,
          200,
        );
      },
    );

    await stack.step(
      t,
      "an explicit id written after the sequences were read, into a table that had none above its sequence, is caught after the resume",
      async () => {
        const from = (await f.get("/active")).body.primary as "primary" | "standby";
        const to = from === "primary" ? "standby" : "primary";
        const [{ id: top }] = await sqlOn(stack, from, "select max(id) as id from public.ledger");
        const explicitId = Number(top) + 5_000_000;
        const op = await withDriver(stack, {
          // After reverse_prepare and seq_prebump, before the pause: the write replicates, and
          // the pause's sync reads only the sequences noted as fed explicit ids (none).
          beforeStep: async (step) => {
            if (step !== "wait_lag") return;
            await sqlOn(
              stack,
              from,
              `insert into public.ledger (id, writer, n) values (${explicitId}, 990, 1)`,
            );
          },
        }, async (base) => {
          const r = await post(base, stack.tokens.failover, "/", { mode: "planned" });
          assert.equal(r.status, 202, JSON.stringify(r.body));
          return await waitOperation(base, stack.tokens.failover, r.body.operation_id);
        });
        assert.equal(op.state, "succeeded", `${op.step}: ${op.error}`);
        const step = (name: string) =>
          (op.steps ?? []).find((s) => s.step === name && s.outcome === "done")!.details;
        const noted = op.data.explicit_id_sequences as [string, string][];
        assert.ok(!noted.some(([, n]) => n === "ledger_id_seq"), "ledger was not noted");
        assert.equal(step("seq_sync").columns_read, noted.length);
        assert.ok(Number(step("seq_verify").raised) >= 1, JSON.stringify(step("seq_verify")));
        assert.match(String(step("seq_verify").warning), /public\.ledger_id_seq/);
        const [row] = await sqlOn(
          stack,
          to,
          "insert into public.ledger (writer, n) values (991, 1) returning id",
        );
        assert.ok(Number(row.id) > explicitId, `the next id ${row.id} is above ${explicitId}`);
      },
    );

    await stack.step(
      t,
      "a descending sequence in use refuses the switchover before the pause, naming it",
      async () => {
        const from = (await f.get("/active")).body.primary as "primary" | "standby";
        await sqlOn(
          stack,
          from,
          "create sequence public.countdown increment -1; grant select, usage on sequence public.countdown to postgres",
        );
        await sqlOn(stack, from, "select nextval('public.countdown')");
        try {
          const op = await withDriver(stack, {}, async (base) => {
            const r = await post(base, stack.tokens.failover, "/", { mode: "planned" });
            assert.equal(r.status, 202, JSON.stringify(r.body));
            return await waitOperation(base, stack.tokens.failover, r.body.operation_id);
          });
          assert.equal(op.state, "rolled_back", `${op.step}: ${op.error}`);
          assert.equal(op.step, "seq_prebump");
          assert.match(String(op.error), /public\.countdown/);
          assert.equal((await f.get("/active")).body.primary, from, "nothing moved");
        } finally {
          await sqlOn(stack, from, "drop sequence public.countdown");
        }
      },
    );
  });
});
