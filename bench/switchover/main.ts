/**
 * Switchover and failover timing on a real primary/standby/PgBouncer stack, under write load
 * (4 writers committing one row per transaction through PgBouncer):
 *
 *  1. BENCH_SWITCHOVERS (default 10) planned switchovers through the failover function,
 *     alternating direction: write gap (longest time with no acknowledged commit), end-to-end
 *     time, acknowledged rows lost.
 *  2. BENCH_EMERGENCIES (default 3) emergency failovers with the primary stopped: time from the
 *     request to the first acknowledged commit on the new primary. Between runs the old primary
 *     is rebuilt (rejoin) and the role fails back.
 *  3. The upstream toolkit's failover.sh sequence re-created in SQL (PAUSE, freeze, sequences
 *     +10000, drop the subscription, swap the upstream, RESUME — no wait for catch-up), same load,
 *     BENCH_UPSTREAM (default 3) times: its write gap and the acknowledged rows it loses.
 *  4. Diagnostic, off by default (BENCH_LAGGED=N): both again with replication running through
 *     a local TCP proxy that delays every chunk BENCH_DELAY_MS (default 200), a stand-in for a
 *     cross-region link.
 *
 *   ./toolkit bench switchover
 */
import type { Sql } from "../../shared/db/mod.ts";
import { sleep } from "../../shared/ha/deadline.ts";
import { failoverClient } from "../../tests/harness/ha_client.ts";
import {
  setupHa,
  type Stack,
  underWriteLoad,
  waitFor,
  waitOperation,
  waitReplicating,
  withStack,
  Writers,
} from "../../tests/harness/mod.ts";
import { fmt, percentile, printTable } from "../lib/stats.ts";

const SWITCHOVERS = Number(Deno.env.get("BENCH_SWITCHOVERS") ?? 10);
const EMERGENCIES = Number(Deno.env.get("BENCH_EMERGENCIES") ?? 3);
const UPSTREAM = Number(Deno.env.get("BENCH_UPSTREAM") ?? 3);
const LAGGED = Number(Deno.env.get("BENCH_LAGGED") ?? 0);
const DELAY_MS = Number(Deno.env.get("BENCH_DELAY_MS") ?? 200);

// A client of the load generator whose login through PgBouncer fails while it is being closed
// can reject with nobody waiting; report it instead of losing the whole run.
globalThis.addEventListener("unhandledrejection", (e) => {
  e.preventDefault();
  console.error(`  (load generator: ${e.reason instanceof Error ? e.reason.message : e.reason})`);
});

interface Result {
  gapMs: number;
  totalMs: number;
  lost: number;
  acked: number;
  dupKeys: number;
}

async function underLoad(
  stack: Stack,
  primarySite: () => Sql,
  action: () => Promise<void>,
): Promise<Result> {
  const run = await underWriteLoad(stack.pgbouncer!.url(), action, { pauseMs: 2, warmup: 200 });
  const lost = (await run.writers.missingOn(primarySite())).length;
  return {
    gapMs: run.stats.maxGapMs,
    totalMs: run.ms,
    lost,
    acked: run.stats.acked,
    dupKeys: run.stats.duplicateKeyErrors,
  };
}

await withStack(
  { name: "bench-switchover", ha: true, functions: { logSink: () => {} } },
  async (stack) => {
    await setupHa(stack);
    const f = failoverClient(stack);
    const siteSql = (site: string) =>
      (site === "primary" ? stack.primary! : stack.standby!).sql("supabase_admin", { max: 1 });
    let primary = "primary";
    const run = async (body: Record<string, unknown>, path = "/") => {
      const r = await f.post(path, body);
      if (r.status !== 202) throw new Error(`${path}: ${r.status} ${JSON.stringify(r.body)}`);
      const op = await waitOperation(f.base, f.token, String(r.body.operation_id));
      if (op.state !== "succeeded") throw new Error(`${op.step}: ${op.error}`);
      return op;
    };
    const waitHealthy = () =>
      waitFor(
        "the standby to be healthy",
        async () => (await f.get("/checks")).body.ok === true,
        60_000,
        200,
      );

    /**
     * Brings the pair back under the toolkit after the upstream sequence, which left the old primary
     * frozen and unsubscribed and ha.state untouched: mark the standby primary, rebuild, fail back.
     */
    const restoreAfterUpstream = async () => {
      const [{ e }] = await siteSql("standby")`select epoch + 1 as e from ha.state`;
      await siteSql("standby").begin(
        "read write",
        (tx) => tx`select ha.lift_fence(${e}::bigint, null, true)`,
      );
      await siteSql("primary").begin(
        "read write",
        (tx) =>
          tx`select ha.set_fence('fenced', ${e}::bigint, 'replaced by the upstream sequence')`,
      );
      const file = stack.pgbouncer!.databasesFile;
      await Deno.writeTextFile(
        file,
        (await Deno.readTextFile(file)).replace(/;; epoch=\d+/, `;; epoch=${e}`),
      );
      await stack.pgbouncer!.admin().unsafe("RELOAD").simple();
      const rj = await f.post("/rejoin", { site: "primary", discard_unreplicated: true });
      if (rj.status !== 200) {
        throw new Error(`rejoin: ${JSON.stringify(rj.body)}`);
      }
      await waitReplicating(stack);
      await waitHealthy();
      await run({}, "/failback");
    };

    console.error(`planned switchovers (${SWITCHOVERS}) ...`);
    const planned: Result[] = [];
    for (let i = 0; i < SWITCHOVERS; i++) {
      await waitHealthy();
      const target = primary === "primary" ? "standby" : "primary";
      planned.push(
        await underLoad(
          stack,
          () => siteSql(target),
          async () => void await run({ mode: "planned" }),
        ),
      );
      primary = target;
      console.error(
        `  #${i + 1}: gap ${planned.at(-1)!.gapMs} ms, total ${planned.at(-1)!.totalMs} ms, lost ${
          planned.at(-1)!.lost
        }`,
      );
    }
    if (primary !== "primary") {
      await waitHealthy();
      await run({}, "/failback");
      primary = "primary";
    }

    console.error(`emergency failovers (${EMERGENCIES}) ...`);
    const emergency: { writableMs: number; totalMs: number; lost: number }[] = [];
    for (let i = 0; i < EMERGENCIES; i++) {
      await waitHealthy();
      const beat = stack.primary!.sql("postgres", { max: 1 });
      await beat`select ha.beat()`;
      await beat.end();
      const writers = new Writers(stack.pgbouncer!.url(), 4, 2);
      writers.start();
      await writers.progress(200);
      await stack.primary!.stop("immediate");
      const started = Date.now();
      await run({ mode: "emergency" });
      const totalMs = Date.now() - started;
      await writers.progress(100, 60_000);
      const writableMs = writers.firstAckAfter(started)!;
      const wstats = await writers.stop();
      if (Object.keys(wstats.errors).length) {
        console.error(`  writer errors: ${JSON.stringify(wstats.errors)}`);
      }
      if (Deno.env.get("BENCH_VERBOSE") && writableMs > 5000) {
        const copy = `${Deno.makeTempDirSync()}/pgbouncer.log`;
        Deno.copyFileSync(stack.pgbouncer!.logPath, copy);
        console.error(`  slow: PgBouncer's log copied to ${copy}`);
      }
      const lost = (await writers.missingOn(siteSql("standby"))).length;
      emergency.push({ writableMs, totalMs, lost });
      console.error(
        `  #${i + 1}: writable after ${writableMs} ms (operation ${totalMs} ms), lost ${lost}`,
      );
      await stack.primary!.start();
      const rj = await f.post("/rejoin", { site: "primary", discard_unreplicated: true });
      if (rj.status !== 200) {
        throw new Error(`rejoin: ${JSON.stringify(rj.body)}`);
      }
      await waitReplicating(stack);
      await waitHealthy();
      await run({}, "/failback");
    }

    console.error(`upstream failover.sh sequence (${UPSTREAM}) ...`);
    const upstream: Result[] = [];
    for (let i = 0; i < UPSTREAM; i++) {
      await waitHealthy();
      // The upstream's standby is an ordinary writable database (no guard, no read-only default):
      // lift ours for the comparison, as the upstream toolkit effectively runs.
      await stack.standby!.psql(
        "alter database postgres reset default_transaction_read_only; select ha.lift_fence(epoch, null, true) from ha.state;",
      );
      upstream.push(
        await underLoad(stack, () => siteSql("standby"), () => upstreamFailover(stack)),
      );
      console.error(`  #${i + 1}: gap ${upstream.at(-1)!.gapMs} ms, lost ${upstream.at(-1)!.lost}`);
      await restoreAfterUpstream();
    }

    // The same two sequences across a slow link: the standby's subscription reaches the primary
    // through a proxy that delays every chunk by DELAY_MS, as a cross-region link would.
    console.error(`across a ${DELAY_MS} ms link (${LAGGED} each) ...`);
    const laggedOurs: Result[] = [];
    const laggedUpstream: Result[] = [];
    const proxy = delayingProxy(stack.primary!.host, stack.primary!.port, DELAY_MS);
    if (!LAGGED) proxy.close();
    const viaProxy = async () => {
      await waitHealthy();
      const url = new URL(stack.env().PRIMARY_DB_URL!);
      url.port = String(proxy.port);
      const conn =
        `host=127.0.0.1 port=${proxy.port} dbname=postgres user=supabase_admin password=${
          decodeURIComponent(url.password)
        }`;
      await stack.standby!.psql(
        `set default_transaction_read_only = off; alter subscription dr_subscription connection '${conn}';`,
      );
      const seen = proxy.accepted;
      await waitFor(
        "the subscription to run through the proxy",
        () => proxy.accepted > seen,
        30_000,
        100,
      );
      await waitHealthy();
    };
    for (let i = 0; i < LAGGED; i++) {
      await viaProxy();
      laggedOurs.push(
        await underLoad(stack, () => siteSql("standby"), async () => {
          const op = await run({ mode: "planned" });
          if (Deno.env.get("BENCH_VERBOSE")) {
            console.error(
              (op.steps ?? []).filter((x) => x.outcome === "done").map((x) =>
                `${x.step} ${x.details.ms}`
              ).join(", "),
            );
          }
        }),
      );
      console.error(
        `  toolkit #${i + 1}: gap ${laggedOurs.at(-1)!.gapMs} ms, lost ${laggedOurs.at(-1)!.lost}`,
      );
      await waitHealthy();
      await run({}, "/failback");
      await viaProxy();
      await stack.standby!.psql(
        "set default_transaction_read_only = off; alter database postgres reset default_transaction_read_only;",
      );
      laggedUpstream.push(
        await underLoad(stack, () => siteSql("standby"), () => upstreamFailover(stack)),
      );
      console.error(
        `  upstream #${i + 1}: gap ${laggedUpstream.at(-1)!.gapMs} ms, lost ${
          laggedUpstream.at(-1)!.lost
        }`,
      );
      await restoreAfterUpstream();
    }
    if (LAGGED) proxy.close();

    const gaps = planned.map((p) => p.gapMs);
    const totals = planned.map((p) => p.totalMs);
    console.log(`\n4 writers through PgBouncer, one row per transaction\n`);
    printTable([
      "",
      "runs",
      "write gap p50 ms",
      "write gap max ms",
      "operation p50 ms",
      "acked rows lost",
      "duplicate keys",
    ], [
      [
        "planned switchover (this toolkit)",
        planned.length,
        fmt(percentile(gaps, 50), 0),
        fmt(Math.max(...gaps), 0),
        fmt(percentile(totals, 50), 0),
        planned.reduce((a, p) => a + p.lost, 0),
        planned.reduce((a, p) => a + p.dupKeys, 0),
      ],
      [
        "upstream failover.sh sequence (re-created)",
        upstream.length,
        fmt(percentile(upstream.map((u) => u.gapMs), 50), 0),
        fmt(Math.max(...upstream.map((u) => u.gapMs)), 0),
        fmt(percentile(upstream.map((u) => u.totalMs), 50), 0),
        upstream.reduce((a, p) => a + p.lost, 0),
        upstream.reduce((a, p) => a + p.dupKeys, 0),
      ],
    ]);
    if (LAGGED) {
      console.log(`\nreplication across a link that delays every chunk by ${DELAY_MS} ms\n`);
    }
    if (LAGGED) {
      printTable(["", "runs", "write gap p50 ms", "write gap max ms", "acked rows lost"], [
        [
          "planned switchover (this toolkit)",
          laggedOurs.length,
          fmt(percentile(laggedOurs.map((r) => r.gapMs), 50), 0),
          fmt(
            Math.max(...laggedOurs.map((r) => r.gapMs)),
            0,
          ),
          laggedOurs.reduce((a, r) => a + r.lost, 0),
        ],
        [
          "upstream failover.sh sequence (re-created)",
          laggedUpstream.length,
          fmt(percentile(laggedUpstream.map((r) => r.gapMs), 50), 0),
          fmt(Math.max(...laggedUpstream.map((r) => r.gapMs)), 0),
          laggedUpstream.reduce((a, r) => a + r.lost, 0),
        ],
      ]);
    }
    console.log("");
    printTable([
      "emergency failover (primary stopped)",
      "runs",
      "time to writable p50 ms",
      "max ms",
      "operation p50 ms",
      "acked rows lost",
    ], [[
      "this toolkit",
      emergency.length,
      fmt(percentile(emergency.map((e) => e.writableMs), 50), 0),
      fmt(Math.max(...emergency.map((e) => e.writableMs)), 0),
      fmt(percentile(emergency.map((e) => e.totalMs), 50), 0),
      emergency.reduce((a, e) => a + e.lost, 0),
    ]]);
  },
);

/** A TCP proxy that forwards both ways and delays every chunk by `delayMs`, keeping order. */
function delayingProxy(host: string, port: number, delayMs: number) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns: Deno.Conn[] = [];
  const state = { accepted: 0 };
  const pump = async (from: Deno.Conn, to: Deno.Conn) => {
    let chain = Promise.resolve();
    try {
      for await (const chunk of from.readable) {
        const due = Date.now() + delayMs;
        chain = chain.then(async () => {
          await sleep(Math.max(0, due - Date.now()));
          const w = to.writable.getWriter();
          await w.write(chunk);
          w.releaseLock();
        });
      }
    } catch {
      // a side closed
    }
    await chain.catch(() => {});
    try {
      to.close();
    } catch {
      // already closed
    }
  };
  (async () => {
    for await (const client of listener) {
      const upstream = await Deno.connect({ hostname: host, port }).catch(() => undefined);
      if (!upstream) {
        client.close();
        continue;
      }
      conns.push(client, upstream);
      state.accepted++;
      pump(client, upstream);
      pump(upstream, client);
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    get accepted() {
      return state.accepted;
    },
    close: () => {
      listener.close();
      for (const c of conns) {
        try {
          c.close();
        } catch {
          // already closed
        }
      }
    },
  };
}

/**
 * The upstream's scripts/failover/failover.sh, step for step (see ../shared/reference/upstream.md
 * §2.3–2.5): PAUSE; ALTER DATABASE … read only (no session termination); setval each sequence on
 * the standby to the primary's last_value + 10000; promote = drop the subscription (here with the
 * disable / slot_name = NONE dance its promote_standby.sh lacked, so it completes); swap the
 * upstream and RELOAD; RESUME. It never waits for the standby to catch up.
 */
async function upstreamFailover(stack: Stack): Promise<void> {
  const admin = stack.pgbouncer!.admin();
  await admin.unsafe("PAUSE postgres").simple();
  await stack.primary!.psql("alter database postgres set default_transaction_read_only = on;");
  const seqs = (await stack.primary!.psql(
    "\\pset tuples_only on\n\\pset format unaligned\nselect schemaname || '.' || sequencename || ' ' || coalesce(last_value, 0) from pg_sequences where schemaname = 'public';",
  )).stdout.trim().split("\n").filter(Boolean);
  const setvals = seqs.map((l) => {
    const [name, v] = l.split(" ");
    return `select setval('${name}', ${Number(v) + 10000});`;
  }).join("\n");
  await stack.standby!.psql(
    `${setvals}\nalter subscription dr_subscription disable;\nalter subscription dr_subscription set (slot_name = none);\ndrop subscription dr_subscription;`,
  );
  await stack.primary!.psql("select pg_drop_replication_slot('dr_subscription');").catch(() => {});
  const file = stack.pgbouncer!.databasesFile;
  const text = await Deno.readTextFile(file);
  await Deno.writeTextFile(file, text.replace(/port=\d+/, `port=${stack.standby!.port}`));
  await admin.unsafe("RELOAD").simple();
  await admin.unsafe("RESUME postgres").simple();
  await sleep(0);
}
