/**
 * The write lease under a partition: the primary is cut off from the failover function, the
 * standby and PgBouncer (its renewal path stops) while its own Data API still reaches it. An
 * emergency failover promotes the standby. The cut-off primary must refuse the Data API's writes
 * once its lease has run out — and a transaction that wrote before must not commit after — and
 * the failover must not promote before that: at no instant are two sites writable. When the
 * partition heals, the old primary's own lease tick gets it fenced.
 */
import assert from "node:assert/strict";
import { LEASE_MARGIN_MS } from "../../shared/ha/lease.ts";
import { DataApi } from "../harness/data_api.ts";
import { failoverClient, healthClient } from "../harness/ha_client.ts";
import { haPlatform, setupHa, waitFor, waitOperation, withStack, Writers } from "../harness/mod.ts";

interface Ack {
  at: number;
  n: number;
}

/** Data API writes straight to one site, recording what it acknowledged and refused. */
class DirectWriter {
  readonly acks: Ack[] = [];
  readonly refusals: { at: number; code?: string; message?: string }[] = [];
  #stop = false;
  #task?: Promise<void>;
  constructor(readonly api: DataApi, readonly writer: number) {}

  start(): this {
    this.#task = (async () => {
      for (let n = 1; !this.#stop; n++) {
        const r = await this.api.write(
          `insert into public.ledger (writer, n) values (${this.writer}, ${n})`,
        );
        const at = Date.now();
        if (r.ok) this.acks.push({ at, n });
        else this.refusals.push({ at, code: r.code, message: r.message });
        await new Promise((res) => setTimeout(res, 20));
      }
    })();
    return this;
  }

  async stop(): Promise<void> {
    this.#stop = true;
    await this.#task;
    await this.api.close();
  }
}

Deno.test("partition: the cut-off primary stops accepting writes before the standby is promoted", async (t) => {
  await withStack(
    { name: "partition", ha: true, functions: true, partitionable: true },
    async (stack) => {
      await setupHa(stack);
      const f = failoverClient(stack);
      const h = healthClient(stack);
      const platform = haPlatform(stack);
      const ttlMs = platform.lease!.ttlSeconds * 1000;
      const app = new Writers(stack.pgbouncer!.url(), 2, 10);
      app.start();
      const direct = new DirectWriter(DataApi.for(stack.primary!), 700).start();
      const longTx = await stack.primary!.sql("app_writer", { max: 1 }).reserve();
      let longPid = 0;
      let cutAt = 0;
      let op: Awaited<ReturnType<typeof waitOperation>> | undefined;

      await stack.step(
        t,
        "cut off: the emergency failover waits out the old primary's lease",
        async () => {
          await app.progress(100);
          await waitFor(
            "the Data API to write to the primary",
            () => direct.acks.length > 20,
            10_000,
            50,
          );
          await longTx`begin`;
          await longTx`insert into public.ledger (writer, n) values (701, 1)`;
          [{ pid: longPid }] = await longTx`select pg_backend_pid() as pid`;
          stack.proxies!.primary.cut();
          platform.net.primary.cut();
          cutAt = Date.now();
          const r = await f.post("/", { mode: "emergency", idempotency_key: "partition-1" });
          assert.equal(r.status, 202, JSON.stringify(r.body));
          op = await waitOperation(f.base, f.token, String(r.body.operation_id), {
            timeoutMs: 60_000,
          });
          assert.equal(op.state, "succeeded", `${op.step}: ${op.error}`);
          const wait = op.data.lease_wait as { last_lease_until: string; waited_ms: number };
          assert.ok(wait, "the operation reports its lease wait");
          const lastLease = Date.parse(wait.last_lease_until);
          assert.ok(lastLease > cutAt, "a lease granted before the cut was still running");
          console.log(
            `  last lease granted until +${
              lastLease - cutAt
            } ms after the cut; lease wait ${wait.waited_ms} ms`,
          );
        },
      );

      await stack.step(
        t,
        "the cut-off primary refused the Data API once its lease ran out, before the promotion",
        async () => {
          const steps = await stack.standby!.sql("supabase_admin", { max: 1 })`
            select step, outcome, at from ha.operation_steps
            where operation_id = ${op!.operation_id} order by id`;
          const promotedAt = new Date(
            steps.find((s) => s.step === "epoch" && s.outcome === "started")!.at,
          ).getTime();
          const [old] = await stack.primary!.sql("supabase_admin", { max: 1 })`
            select lease_until from ha.state`;
          const oldLease = new Date(old.lease_until).getTime();
          const lastAck = Math.max(...direct.acks.map((a) => a.at));
          console.log(
            `  old primary: last Data API write acknowledged at +${
              lastAck - cutAt
            } ms, its lease ended at +${oldLease - cutAt} ms; the standby was promoted at +${
              promotedAt - cutAt
            } ms`,
          );
          assert.ok(lastAck <= oldLease + 50, "no write was acknowledged after the lease ended");
          assert.ok(
            promotedAt >= oldLease + LEASE_MARGIN_MS - 50,
            "the promotion came after the old lease plus the margin",
          );
          assert.ok(lastAck < promotedAt, "never two writable primaries");
          const refusedAfter = direct.refusals.filter((r) => r.at > oldLease);
          assert.ok(refusedAfter.length > 0, "writes kept coming and were refused");
          for (const r of refusedAfter) {
            assert.equal(r.code, "25006", JSON.stringify(r));
            assert.match(
              String(r.message),
              /site primary fenced at epoch 1 \(its write lease expired/,
            );
          }
          assert.ok(Date.now() - oldLease < ttlMs * 20, "sanity: the lease ended during the test");
        },
      );

      await stack.step(
        t,
        "a transaction that wrote before the cut cannot commit after it",
        async () => {
          // Either the lease tick's watchdog has ended the session (it runs every tick once the
          // lease is out), or its COMMIT meets the commit check: the row never lands.
          const admin = stack.primary!.sql("supabase_admin", { max: 1 });
          const [{ alive }] = await admin`
            select exists (select 1 from pg_stat_activity where pid = ${longPid}) as alive`;
          if (alive) {
            // A session ended in between leaves postgres.js's reserved connection hanging.
            let settled = false;
            const ended = (async () => {
              for (;;) {
                await new Promise((r) => setTimeout(r, 200));
                if (settled) return;
                const [r] = await admin`
                  select exists (select 1 from pg_stat_activity where pid = ${longPid}) as alive`;
                if (!r.alive) {
                  throw Object.assign(new Error("ended by the watchdog"), { code: "57P01" });
                }
              }
            })();
            await assert.rejects(
              () => Promise.race([longTx`commit`, ended]).finally(() => (settled = true)),
              (e: { code?: string; message?: string }) =>
                e.code === "57P01" || (e.code === "25006" &&
                  /^commit refused: .*write lease expired/.test(String(e.message))),
            );
          } else {
            console.log("  the lease watchdog ended the open transaction's session");
            assert.match(
              await Deno.readTextFile(stack.primary!.logPath),
              /the write lease ran out at .*: ended \d+ session\(s\) still holding a transaction/,
            );
          }
          longTx.release();
          const [{ c }] = await admin`
          select count(*)::int as c from public.ledger where writer = 701`;
          assert.equal(c, 0);
        },
      );

      await stack.step(t, "the application path writes to the new primary", async () => {
        await app.progress(100, 30_000);
        assert.equal((await h.get("/primary")).body.site, "standby");
      });

      await stack.step(
        t,
        "when the partition heals, the old primary's own tick gets it fenced; it never took a write",
        async () => {
          stack.proxies!.primary.heal();
          platform.net.primary.heal();
          const before = direct.acks.length;
          await waitFor(
            "the old primary to be fenced",
            async () => {
              const [s] = await stack.primary!.sql("supabase_admin", { max: 1 })`
                select role, epoch from ha.state`;
              return s.role === "fenced" && Number(s.epoch) === 2;
            },
            15_000,
            200,
          );
          await new Promise((r) => setTimeout(r, 300));
          await direct.stop();
          assert.equal(
            direct.acks.length,
            before,
            "no write was accepted after the cut's lease ran out",
          );
          const last = direct.refusals.at(-1)!;
          assert.match(String(last.message), /fenced at epoch 2 \(stale epoch 1 < 2/);
          const stats = await app.stop();
          assert.equal(stats.duplicateKeyErrors, 0);
        },
      );
    },
  );
});
