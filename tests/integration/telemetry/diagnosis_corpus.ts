/**
 * Reproduced slow batches. Each scenario runs a short "batch" twice inside telemetry runs: once
 * clean (the baseline) and once with a fault injected for real, while a sampler takes samples
 * every 100 ms. The diagnosis of the faulty run must rank the injected cause first, and the
 * attribution against the clean run must name the scenario's wait class.
 */
import assert from "node:assert/strict";
import type { Sql } from "../../../shared/db/mod.ts";
import { type PgCluster, withStack } from "../../harness/mod.ts";

export interface Ctx {
  cluster: PgCluster;
  sql: Sql;
  admin: Sql;
}

export interface Scenario {
  name: string;
  /** The cause diagnose() must rank first. */
  cause: string;
  /** The wait class(es) the attribution may put first (largest growth over the baseline); it must
   * also be the class the top finding names. */
  waitClass: string | string[];
  /** "top": the class must be the attribution's largest growth (default). "grew": one of the classes
   * must have grown and be named by the findings — for causes whose symptoms spread over several
   * classes on a machine whose page cache absorbs most I/O (checkpoints, WAL contention). */
  attribution?: "top" | "grew";
  setup?: (ctx: Ctx) => Promise<void>;
  baseline: (ctx: Ctx) => Promise<void>;
  faulty: (ctx: Ctx) => Promise<void>;
  teardown?: (ctx: Ctx) => Promise<void>;
}

export const sleep = (ms: number): Promise<void> => new Promise<void>((r) => setTimeout(r, ms));

async function reload(admin: Sql, setting: string, value: string | null): Promise<void> {
  if (value === null) await admin.unsafe(`alter system reset ${setting}`);
  else await admin.unsafe(`alter system set ${setting} = '${value}'`);
  await admin`select pg_reload_conf()`;
  await sleep(200);
}

/** `n` sessions each running `fn` with its own connection. */
async function workers(
  sql: Sql,
  n: number,
  fn: (conn: Sql, i: number) => Promise<void>,
): Promise<void> {
  const conns = await Promise.all(Array.from({ length: n }, () => sql.reserve()));
  try {
    await Promise.all(conns.map((c, i) => fn(c as unknown as Sql, i)));
  } finally {
    conns.forEach((c) => c.release());
  }
}

/** A transaction on its own connection: `hold` runs inside it, then it rolls back. */
async function holding(
  sql: Sql,
  begin: string[],
  hold: (conn: Sql) => Promise<void>,
): Promise<void> {
  const conn = await sql.reserve();
  try {
    await conn`begin`;
    for (const stmt of begin) await conn.unsafe(stmt);
    await hold(conn as unknown as Sql);
  } finally {
    await conn`rollback`.catch(() => {});
    conn.release();
  }
}

const hotUpdates = (sql: Sql, n = 3, each = 15) =>
  workers(sql, n, async (c, i) => {
    for (let k = 0; k < each; k++) {
      await c.unsafe(`update public.diag_hot set v = v + 1 where id = ${((i + k) % 10) + 1}`);
    }
  });

const HOT_SETUP = async ({ sql }: Ctx) => {
  await sql`create table if not exists public.diag_hot (id int primary key, v int not null default 0)`;
  await sql`insert into public.diag_hot select g, 0 from generate_series(1, 10) g on conflict do nothing`;
};

/** Pure CPU for about a second, without temp files (a generate_series in FROM would spill). */
const CPU_BURN =
  "do $$ declare s bigint := 0; begin for i in 1..6000000 loop s := s + i; end loop; end $$";

export const SCENARIOS: Scenario[] = [
  {
    name: "row-lock wait behind a long transaction",
    cause: "row_lock_wait",
    waitClass: "Lock",
    setup: HOT_SETUP,
    baseline: ({ sql }) => hotUpdates(sql),
    faulty: ({ sql }) =>
      holding(
        sql,
        ["update public.diag_hot set v = v where id between 1 and 10"],
        async (blocker) => {
          const batch = (async () => {
            await sleep(200);
            await hotUpdates(sql);
          })();
          // The long transaction keeps working (not idle) while it holds the rows.
          await blocker`select pg_sleep(2.5)`;
          await blocker`commit`;
          await batch;
        },
      ),
  },
  {
    name: "relation lock behind DDL",
    cause: "relation_lock_ddl",
    waitClass: "Lock",
    setup: HOT_SETUP,
    baseline: ({ sql }) => hotUpdates(sql),
    faulty: ({ sql }) =>
      holding(sql, ["alter table public.diag_hot add column ddl_probe int"], async (ddl) => {
        const batch = (async () => {
          await sleep(200);
          await hotUpdates(sql);
        })();
        await ddl`select pg_sleep(2.5)`;
        await ddl`rollback`;
        await batch;
      }),
  },
  {
    name: "idle-in-transaction blocker",
    cause: "idle_in_transaction_blocker",
    waitClass: "Lock",
    setup: HOT_SETUP,
    baseline: ({ sql }) => hotUpdates(sql),
    faulty: async ({ sql }) => {
      let batch: Promise<void> | undefined;
      await holding(
        sql,
        ["update public.diag_hot set v = v where id between 1 and 10"],
        async () => {
          batch = (async () => {
            await sleep(200);
            await hotUpdates(sql);
          })();
          await sleep(2500); // the application holds the transaction open and says nothing
        },
      );
      await batch;
    },
  },
  {
    name: "checkpoint pressure from a small max_wal_size",
    cause: "checkpoint_pressure",
    waitClass: ["IO", "LWLock"],
    attribution: "grew",
    setup: async ({ sql, admin }) => {
      await sql`create table if not exists public.diag_big (id bigint, payload text) with (autovacuum_enabled = false)`;
      await reload(admin, "fsync", "on");
    },
    baseline: async ({ sql }) => {
      await sql`insert into public.diag_big select g, repeat('x', 400) from generate_series(1, 150000) g`;
      await sql`update public.diag_big set payload = repeat('y', 400)`;
    },
    faulty: async ({ sql, admin }) => {
      await reload(admin, "max_wal_size", "32MB");
      try {
        await sql`insert into public.diag_big select g, repeat('x', 400) from generate_series(1, 150000) g`;
        await sql`update public.diag_big set payload = repeat('z', 400)`;
      } finally {
        await reload(admin, "max_wal_size", null);
      }
    },
    teardown: async ({ admin }) => await reload(admin, "fsync", "off"),
  },
  {
    name: "WAL and buffer pressure from concurrent writers",
    cause: "write_pressure",
    waitClass: ["LWLock", "IO"],
    attribution: "grew",
    setup: async ({ sql, admin }) => {
      await sql`create table if not exists public.diag_writes (id bigserial primary key, w int, payload text) with (autovacuum_enabled = false)`;
      await reload(admin, "fsync", "on");
    },
    baseline: ({ sql }) =>
      workers(sql, 1, async (c) => {
        for (
          let k = 0;
          k < 150;
          k++
        ) await c`insert into public.diag_writes (w, payload) values (0, repeat('b', 200))`;
      }),
    faulty: async ({ sql }) => {
      let stop = false;
      const noise = workers(sql, 4, async (c, i) => {
        while (!stop) {
          await c`insert into public.diag_writes (w, payload) select ${
            i + 1
          }, repeat('n', 200) from generate_series(1, 500)`;
        }
      });
      await sleep(200);
      await workers(sql, 1, async (c) => {
        for (let k = 0; k < 150; k++) {
          await c`insert into public.diag_writes (w, payload) values (0, repeat('b', 200))`;
        }
      });
      stop = true;
      await noise;
    },
    teardown: async ({ admin }) => await reload(admin, "fsync", "off"),
  },
  {
    name: "temp-file spills from a small work_mem",
    cause: "temp_spill",
    waitClass: ["CPU", "IO"],
    // The baseline reads the same rows without the sort: an in-memory sort of them can take as
    // long as the spilled one on this machine, which left nothing to attribute (CI saw the faulty
    // run 1.3 s faster than its baseline). The faulty batch adds the sort and spills it.
    baseline: ({ sql }) =>
      workers(sql, 1, async (c) => {
        await c`set work_mem = '256MB'`;
        for (
          let k = 0;
          k < 3;
          k++
        ) {
          await c`select count(*) from (select g from generate_series(1, 1500000) g) x`;
        }
      }),
    faulty: ({ sql }) =>
      workers(sql, 1, async (c) => {
        await c`set work_mem = '64kB'`;
        for (
          let k = 0;
          k < 3;
          k++
        ) {
          await c`select count(*) from (select g from generate_series(1, 1500000) g order by g desc) x`;
        }
        await c`select pg_stat_force_next_flush()`;
      }).then(async () => await sleep(200)),
  },
  {
    name: "autovacuum on a tracked table",
    cause: "autovacuum_on_tracked_table",
    waitClass: "Autovacuum",
    setup: async ({ sql }) => {
      await sql`create table if not exists public.diag_av (id bigint primary key, v text)
                with (autovacuum_enabled = false, autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0,
                      autovacuum_vacuum_cost_delay = 20, autovacuum_vacuum_cost_limit = 10)`;
      await sql`insert into public.diag_av select g, repeat('a', 100) from generate_series(1, 100000) g`;
      await sql`select telemetry.track_table('diag_av')`;
    },
    baseline: async ({ sql }) => {
      await workers(sql, 1, async (c) => {
        await c`update public.diag_av set v = repeat('b', 100) where id % 3 = 0`;
        await c`select pg_stat_force_next_flush()`;
      });
      await sleep(3000);
    },
    faulty: async ({ sql }) => {
      await sql`alter table public.diag_av set (autovacuum_enabled = true)`;
      try {
        await workers(sql, 1, async (c) => {
          await c`update public.diag_av set v = repeat('c', 100) where id % 3 = 1`;
          await c`select pg_stat_force_next_flush()`;
        });
        await sleep(3000);
      } finally {
        await sql`alter table public.diag_av set (autovacuum_enabled = false)`;
      }
    },
  },
  {
    name: "synchronous replication waits",
    cause: "sync_replication_wait",
    waitClass: "IPC",
    setup: async ({ sql }) => {
      await sql`create table if not exists public.diag_sync (id bigserial primary key, v text)`;
    },
    baseline: ({ sql }) =>
      workers(sql, 2, async (c) => {
        await c`insert into public.diag_sync (v) values ('baseline')`;
      }),
    faulty: async ({ sql, admin }) => {
      await reload(admin, "synchronous_standby_names", "no_such_standby");
      const batch = workers(sql, 2, async (c) => {
        await c`set synchronous_commit = on`;
        await c`insert into public.diag_sync (v) values ('waits for a standby')`;
      });
      await sleep(2500);
      await reload(admin, "synchronous_standby_names", null);
      await batch;
    },
  },
  {
    name: "client-side stall inside a transaction",
    cause: "client_stall_in_transaction",
    waitClass: "IdleInTransaction",
    setup: HOT_SETUP,
    baseline: ({ sql }) =>
      workers(sql, 1, async (c) => {
        await c`begin`;
        for (let k = 0; k < 5; k++) await c`update public.diag_hot set v = v + 1 where id = 1`;
        await c`commit`;
      }),
    faulty: ({ sql }) =>
      workers(sql, 1, async (c) => {
        await c`begin`;
        for (let k = 0; k < 5; k++) {
          await c`update public.diag_hot set v = v + 1 where id = 1`;
          await sleep(500); // the application does something else while the transaction stays open
        }
        await c`commit`;
      }),
  },
  {
    name: "concurrency above the CPU count",
    cause: "cpu_saturation",
    waitClass: "CPU",
    baseline: ({ sql }) =>
      workers(sql, 1, async (c) => {
        await c.unsafe(CPU_BURN);
      }),
    faulty: ({ sql }) =>
      workers(sql, 6, async (c) => {
        await c.unsafe(CPU_BURN);
      }),
  },
];

/** Runs `body` inside a telemetry run, sampling every `everyMs`; returns the run's bounds as text. */
export async function sampledRun(
  ctx: Ctx,
  name: string,
  body: () => Promise<void>,
  everyMs = 100,
): Promise<{ id: number; start: string; end: string }> {
  const [{ id }] = await ctx.sql`select telemetry.start_run(${name}) as id`;
  const sampler = await ctx.sql.reserve();
  // Like the cron commands: telemetry never waits for a synchronous standby.
  await sampler`set synchronous_commit = local`;
  let stop = false;
  const loop = (async () => {
    while (!stop) {
      await sampler`select telemetry.sample()`;
      await sleep(everyMs);
    }
  })();
  try {
    await body();
  } finally {
    stop = true;
    await loop;
    sampler.release();
  }
  await ctx.sql`select telemetry.end_run(${id})`;
  const [r] = await ctx
    .sql`select started_at::text as start, ended_at::text as "end" from telemetry.runs where id = ${id}`;
  return { id: Number(id), start: r.start, end: r.end };
}

/** Runs the scenarios (all, or those whose cause is named) on a fresh stack of the version. */
export async function runCorpus(
  t: Deno.TestContext,
  version: 15 | 17,
  names?: string[],
): Promise<void> {
  const opts = version === 15
    ? {
      name: `diagnosis-pg15`,
      primary: true,
      migrate: true,
      pgSettings: { autovacuum_naptime: "1s" },
    }
    : {
      name: `diagnosis-pg17`,
      versions: [17 as const],
      migrate: true,
      pgSettings: { autovacuum_naptime: "1s" },
    };
  await withStack(opts, async (stack) => {
    const cluster = version === 15 ? stack.primary! : stack.clusters.get(17)!;
    const ctx: Ctx = {
      cluster,
      sql: cluster.sql("postgres", { max: 16 }),
      admin: cluster.sql("supabase_admin", { max: 2 }),
    };
    if (version === 15) await ctx.sql`select telemetry.unschedule_jobs()`;
    await ctx.sql`update telemetry.config set value = '2' where key = 'cpu_count'`;
    for (const scenario of SCENARIOS.filter((s) => !names || names.includes(s.cause))) {
      await stack.step(
        t,
        `PG${version}: ${scenario.name} → ${scenario.cause}, attributed to ${scenario.waitClass}`,
        async () => {
          await scenario.setup?.(ctx);
          try {
            const base = await sampledRun(
              ctx,
              `${scenario.cause} baseline`,
              () => scenario.baseline(ctx),
            );
            const run = await sampledRun(
              ctx,
              `${scenario.cause} faulty`,
              () => scenario.faulty(ctx),
            );
            const [{ d }] = await ctx.sql`
            select telemetry.diagnose(${run.start}::text::timestamptz, ${run.end}::text::timestamptz,
                                      ${base.start}::text::timestamptz, ${base.end}::text::timestamptz) as d`;
            const causes = (d.findings as { cause: string }[]).map((f) => f.cause);
            const classes = (d.attribution.by_wait_class as {
              wait_class: string;
              delta_session_seconds: number;
            }[])
              .map((c) => `${c.wait_class}:${c.delta_session_seconds}`);
            console.log(
              `${scenario.cause}: findings ${JSON.stringify(causes)}; attribution ${
                classes.join(", ")
              }; ${d.summary}`,
            );
            assert.equal(
              causes[0],
              scenario.cause,
              `findings: ${JSON.stringify(d.findings, null, 1)}`,
            );
            const allowed = Array.isArray(scenario.waitClass)
              ? scenario.waitClass
              : [scenario.waitClass];
            const byClass = d.attribution.by_wait_class as {
              wait_class: string;
              delta_session_seconds: number;
              named_by_findings: boolean;
            }[];
            if ((scenario.attribution ?? "top") === "top") {
              // Classes tied (at the reported 0.1 s precision) for the largest growth all count as top.
              const top = byClass.filter((c) =>
                c.delta_session_seconds === byClass[0].delta_session_seconds
              ).map((c) => c.wait_class);
              assert.ok(
                top.some((c) => allowed.includes(c)),
                `attribution names ${top}: ${JSON.stringify(d.attribution)}`,
              );
              assert.ok(
                top.includes(d.findings[0].wait_class),
                `the attribution's top class (${top}) is the top finding's class (${
                  d.findings[0].wait_class
                })`,
              );
            } else {
              assert.ok(
                byClass.some((c) =>
                  allowed.includes(c.wait_class) && c.delta_session_seconds > 0 &&
                  c.named_by_findings
                ),
                `one of ${allowed} grew and is named: ${JSON.stringify(d.attribution)}`,
              );
            }
            const top = d.findings[0];
            assert.ok(
              top.evidence && Object.keys(top.evidence).length > 0,
              "the top finding cites evidence",
            );
            assert.ok(
              String(top.recommendation).length > 40,
              "the top finding recommends something concrete",
            );
          } finally {
            await scenario.teardown?.(ctx);
          }
        },
      );
    }
  });
}
