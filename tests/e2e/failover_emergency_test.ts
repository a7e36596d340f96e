/**
 * Emergency failover with the primary gone: the standby takes writes through PgBouncer, the RPO
 * is reported from the replicated heartbeat, and when the old primary comes back it is fenced
 * (read-only, sessions ended, 503 on /health/primary) and never routed to. It is then rebuilt as
 * the standby and the role fails back with zero loss. An emergency whose driver crashes resumes.
 */
import assert from "node:assert/strict";
import { DataApi } from "../harness/data_api.ts";
import { failoverClient, healthClient } from "../harness/ha_client.ts";
import {
  serveFunctions,
  setupHa,
  waitFor,
  waitOperation,
  waitReplicating,
  withStack,
  Writers,
} from "../harness/mod.ts";

Deno.test("emergency failover: RPO, fencing the returning primary, rejoin and failback", async (t) => {
  await withStack({ name: "failover-emergency", ha: true, functions: true }, async (stack) => {
    await setupHa(stack);
    const f = failoverClient(stack);
    const h = healthClient(stack);
    // pg_cron 1.4 (Debian's) beats once a minute; the test beats every 500 ms as 1.5+ would.
    const beatSql = stack.primary!.sql("postgres", { max: 1 });
    let beating = true;
    const beats = (async () => {
      while (beating) {
        await beatSql`select ha.beat()`.catch(() => {});
        await new Promise((r) => setTimeout(r, 500));
      }
    })();

    const writers = new Writers(stack.pgbouncer!.url(), 4);
    writers.start();
    let opId = "";

    await stack.step(
      t,
      "primary lost: the standby takes writes through PgBouncer, the RPO is reported",
      async () => {
        await writers.progress(300);
        await new Promise((r) => setTimeout(r, 700)); // at least one heartbeat has replicated
        await stack.primary!.stop("immediate");
        beating = false;
        await beats;
        const started = Date.now();
        const r = await f.post("/", { mode: "emergency", idempotency_key: "emergency-1" });
        assert.equal(r.status, 202, JSON.stringify(r.body));
        opId = String(r.body.operation_id);
        const op = await waitOperation(f.base, f.token, opId);
        assert.equal(op.state, "succeeded", `${op.step}: ${op.error}`);
        await writers.progress(200);
        const writable = writers.firstAckAfter(started)!;
        const rpo = op.data.rpo as Record<string, unknown>;
        console.log(
          `  emergency: writable again ${writable} ms after the request; RPO: ${rpo.estimate}`,
        );
        assert.ok(rpo.heartbeat_at, "the heartbeat bounds the loss");
        assert.match(
          String(rpo.estimate),
          /every commit on site primary before .* is on site standby/,
        );
        // The promise the RPO makes: whatever is missing was acknowledged after the heartbeat.
        const missing = await writers.missingOn(stack.standby!.sql("supabase_admin"));
        const bound = Date.parse(String(rpo.heartbeat_at));
        assert.deepEqual(missing.filter((m) => m.ackedAt < bound), []);
        console.log(
          `  acknowledged commits missing on the new primary: ${missing.length} (all after the heartbeat)`,
        );
        const primary = await h.get("/primary");
        assert.equal(primary.status, 200);
        assert.equal(primary.body.site, "standby");
        assert.equal(primary.body.epoch, 2);
        const bouncer = await h.get("/pgbouncer");
        assert.equal(bouncer.body.routes_to, "standby");
      },
    );

    await stack.step(
      t,
      "the old primary comes back: its lease has run out, its next tick gets it fenced, never routed to",
      async () => {
        await stack.primary!.start();
        // Before anything reaches it, the returning site already refuses the Data API's writes.
        const api = DataApi.for(stack.primary!);
        try {
          const early = await api.write(
            "insert into public.ledger (writer, n) values (66, 1)",
          );
          assert.equal(early.ok, false);
          assert.equal(early.code, "25006");
          assert.match(
            String(early.message),
            /site primary fenced at epoch 1 \((its write lease expired|stale epoch)/,
          );
        } finally {
          await api.close();
        }
        // Its own lease tick asks the other region, which fences it (a POST; no probe does).
        await waitFor(
          "the returning primary to be fenced by its lease tick",
          async () =>
            /fenced \(stale epoch 1 < 2/.test(
              String((await h.get("/primary?site=primary")).body.reason),
            ),
          15_000,
          200,
        );
        const [state] = await stack.primary!.sql(
          "supabase_admin",
        )`select role, fenced, epoch from ha.state`;
        assert.deepEqual({ ...state, epoch: Number(state.epoch) }, {
          role: "fenced",
          fenced: true,
          epoch: 2,
        });
        assert.equal((await h.get("/primary")).body.site, "standby");
        assert.equal((await h.get("/pgbouncer")).body.routes_to, "standby");
        const planned = await f.post("/failback", {});
        assert.equal(
          planned.status,
          412,
          "a fenced site cannot take the role back before it is rebuilt",
        );
      },
    );

    await stack.step(
      t,
      "rejoin rebuilds it as the standby; failback then loses nothing",
      async () => {
        const rejoin = await f.post("/rejoin", { site: "primary", discard_unreplicated: true });
        assert.equal(rejoin.status, 200, JSON.stringify(rejoin.body));
        await waitReplicating(stack);
        await waitFor(
          "the rebuilt standby to be healthy",
          async () => (await h.get("/standby")).body.site === "primary",
          30_000,
          200,
        );
        assert.equal((await h.get("/standby")).status, 200);
        const started = Date.now();
        const r = await f.post("/failback", {});
        assert.equal(r.status, 202, JSON.stringify(r.body));
        const op = await waitOperation(f.base, f.token, String(r.body.operation_id));
        assert.equal(op.state, "succeeded", `${op.step}: ${op.error}`);
        writers.measureGapsBetween(started, Date.now());
        await writers.progress(200);
        const stats = await writers.stop();
        assert.equal(stats.duplicateKeyErrors, 0);
        const onHome = await writers.missingOn(stack.primary!.sql("supabase_admin"));
        const onStandby = await writers.missingOn(stack.standby!.sql("supabase_admin"));
        // Rows lost in the emergency stay lost; everything acknowledged since is on both sites.
        const lostInEmergency = new Set(onStandby.map((m) => `${m.writer}:${m.n}`));
        assert.deepEqual(onHome.filter((m) => !lostInEmergency.has(`${m.writer}:${m.n}`)), []);
        assert.equal((await h.get("/primary")).body.site, "primary");
        console.log(`  failback after rejoin: write gap ${stats.maxGapMs} ms`);
      },
    );

    await stack.step(
      t,
      "an emergency whose driver crashes after detaching resumes to the same end",
      async () => {
        await stack.primary!.stop("immediate");
        const crash = await serveFunctions(stack.env(), {
          deps: { failover: { crashAfter: "detach", leaseMs: 800 } },
        });
        let id = "";
        try {
          const r = await fetch(`${crash.url("failover")}/`, {
            method: "POST",
            headers: {
              authorization: `Bearer ${stack.tokens.failover}`,
              "content-type": "application/json",
            },
            body: JSON.stringify({ mode: "emergency", idempotency_key: "emergency-2" }),
          });
          const body = await r.json();
          assert.equal(r.status, 202, JSON.stringify(body));
          id = body.operation_id;
          await waitOperation(crash.url("failover"), stack.tokens.failover, id, {
            until: (o) => o.driver === "lost (resume it)",
          });
        } finally {
          await crash.stop();
        }
        const again = await f.post("/", { mode: "emergency", idempotency_key: "emergency-2" });
        assert.equal(again.status, 202);
        assert.equal(again.body.resumed, true);
        const op = await waitOperation(f.base, f.token, id);
        assert.equal(op.state, "succeeded", `${op.step}: ${op.error}`);
        const primary = await h.get("/primary");
        assert.equal(primary.body.site, "standby");
        assert.equal(primary.body.epoch, 4);
      },
    );
  });
});
