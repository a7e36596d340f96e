/**
 * The telemetry SQL suite, run against any cluster of the local stack (PostgreSQL 15 with
 * pg_cron, and 16/17/18 with the collectors called directly). Every signal is produced for real.
 */
import assert from "node:assert/strict";
import type { Sql } from "../../../shared/db/mod.ts";
import { type PgCluster, type Stack, waitFor } from "../../harness/mod.ts";

type Row = Record<string, unknown>;

/** Every numeric-looking field of a compare()/table_compare() row is >= 0. */
export function assertNoNegative(row: Row, label: string): void {
  for (const [k, v] of Object.entries(row)) {
    if (v === null || v === undefined || typeof v === "boolean") continue;
    if (k.endsWith("_offset_seconds")) continue;
    if (k.endsWith("_pretty") || k.startsWith("size_") || k.endsWith("_size_delta")) continue;
    const n = typeof v === "string" && /^-?\d+(\.\d+)?$/.test(v)
      ? Number(v)
      : typeof v === "number"
      ? v
      : NaN;
    if (!Number.isNaN(n)) assert.ok(n >= 0, `${label}: ${k} = ${v} is negative`);
  }
}

async function pidOf(conn: Sql): Promise<number> {
  const [{ pid }] = await conn`select pg_backend_pid() as pid`;
  return pid;
}

/** Lets a session's pending statistics reach the shared statistics right away (PG15+). */
async function flushStats(conn: Sql): Promise<void> {
  await conn`select pg_stat_force_next_flush()`;
  // The flush happens when the backend goes idle after the statement above.
  await new Promise((r) => setTimeout(r, 150));
}

async function run(sql: Sql, name: string): Promise<{ id: number; started: string }> {
  const [{ id }] = await sql`select telemetry.start_run(${name}) as id`;
  const [{ started }] =
    await sql`select started_at::text as started from telemetry.runs where id = ${id}`;
  return { id: Number(id), started };
}

async function endRun(sql: Sql, id: number): Promise<{ started: string; ended: string }> {
  await sql`select telemetry.end_run(${id})`;
  const [r] =
    await sql`select started_at::text as started, ended_at::text as ended from telemetry.runs where id = ${id}`;
  return r as { started: string; ended: string };
}

export async function telemetrySuite(
  t: Deno.TestContext,
  stack: Stack,
  cluster: PgCluster,
): Promise<void> {
  const v = cluster.version;
  // Restarts close every client of the cluster; these are re-opened after each restart.
  let sql = cluster.sql("postgres", { max: 6 });
  let admin = cluster.sql("supabase_admin", { max: 2 });
  const step = (name: string, fn: () => Promise<void>) => stack.step(t, `PG${v}: ${name}`, fn);

  await step(
    "the collectors run as the non-superuser postgres role and record full coverage",
    async () => {
      const [{ su }] = await sql`select rolsuper as su from pg_roles where rolname = current_user`;
      assert.equal(su, false);
      await sql`select telemetry.snapshot()`;
      await sql`select telemetry.sample()`;
      const [snap] =
        await sql`select coverage, pg_version from telemetry.snapshots order by id desc limit 1`;
      assert.equal(snap.pg_version, v);
      // Only notes about where a column now comes from, never an error message.
      for (const [k, note] of Object.entries(snap.coverage as Record<string, string>)) {
        assert.match(
          note,
          /^(from pg_stat_io|rebuilt from pg_stat_io|not available before)/,
          `${k}: ${note}`,
        );
      }
      const [sample] =
        await sql`select privileged, backends from telemetry.samples order by id desc limit 1`;
      assert.equal(sample.privileged, true);
      assert.ok(sample.backends > 0);
    },
  );

  await step(
    "a lock wait between two sessions appears in recent_locks with blocker, mode and wait time",
    async () => {
      await sql`create table public.lock_probe (id int primary key, v int)`;
      await sql`insert into public.lock_probe values (1, 0)`;
      const holder = await sql.reserve();
      const waiter = await sql.reserve();
      try {
        const holderPid = await pidOf(holder);
        const waiterPid = await pidOf(waiter);
        await holder`begin`;
        await holder`update public.lock_probe set v = 1 where id = 1`;
        const blocked = waiter`update public.lock_probe set v = 2 where id = 1`.execute();
        await waitFor("the waiter to wait on the lock", async () => {
          const r =
            await sql`select 1 from pg_stat_activity where pid = ${waiterPid} and wait_event_type = 'Lock'`;
          return r.length === 1;
        }, 10_000);
        await new Promise((r) => setTimeout(r, 300));
        await sql`select telemetry.sample()`;
        const rows = await sql`
        select blocked_pid, blocking_pid, lock_type, lock_mode, blocked_duration > interval '0' as waited,
               blocking_state, blocking_query_preview, blocked_query_preview, blocking_pids
        from telemetry.recent_locks where blocked_pid = ${waiterPid} order by captured_at desc limit 1`;
        assert.equal(rows.length, 1);
        const l = rows[0];
        assert.equal(l.blocking_pid, holderPid);
        assert.deepEqual(l.blocking_pids, [holderPid]);
        assert.equal(l.lock_type, "transactionid");
        assert.equal(l.lock_mode, "ShareLock");
        assert.equal(l.waited, true);
        assert.equal(l.blocking_state, "idle in transaction");
        assert.match(String(l.blocking_query_preview), /update public\.lock_probe set v = 1/);
        assert.match(String(l.blocked_query_preview), /update public\.lock_probe set v = 2/);
        const act = await sql`
        select state from telemetry.recent_activity where pid = ${holderPid} order by captured_at desc limit 1`;
        assert.equal(act[0]?.state, "idle in transaction");
        await holder`rollback`;
        await blocked;
      } finally {
        holder.release();
        waiter.release();
      }
    },
  );

  await step(
    "a relation lock behind DDL names the relation and the AccessExclusiveLock holder",
    async () => {
      const ddl = await sql.reserve();
      const reader = await sql.reserve();
      try {
        const ddlPid = await pidOf(ddl);
        const readerPid = await pidOf(reader);
        await ddl`begin`;
        await ddl`alter table public.lock_probe add column extra int`;
        const read = reader`select count(*) from public.lock_probe`.execute();
        await waitFor(
          "the reader to wait",
          async () =>
            (await sql`select 1 from pg_stat_activity where pid = ${readerPid} and wait_event_type = 'Lock'`)
              .length === 1,
          10_000,
        );
        await sql`select telemetry.sample()`;
        const [l] = await sql`
        select blocking_pid, lock_type, lock_mode, locked_relation from telemetry.recent_locks
        where blocked_pid = ${readerPid} order by captured_at desc limit 1`;
        assert.equal(l.blocking_pid, ddlPid);
        assert.equal(l.lock_type, "relation");
        assert.equal(l.lock_mode, "AccessShareLock");
        assert.equal(l.locked_relation, "public.lock_probe");
        await ddl`rollback`;
        await read;
      } finally {
        ddl.release();
        reader.release();
      }
    },
  );

  await step(
    "a snapshot never waits behind DDL: a tracked table under AccessExclusiveLock is not sized",
    async () => {
      await sql`select telemetry.track_table('lock_probe')`;
      const ddl = await sql.reserve();
      try {
        await ddl`begin`;
        await ddl`lock table public.lock_probe in access exclusive mode`;
        const started = performance.now();
        await sql`select telemetry.snapshot()`;
        const ms = performance.now() - started;
        assert.ok(ms < 5000, `snapshot returned after ${ms} ms`);
        const [row] = await sql`
        select size_skipped, pg_relation_size from telemetry.table_snapshots ts
        join telemetry.tracked_tables t using (relid)
        where t.relname = 'lock_probe' order by snapshot_id desc limit 1`;
        assert.equal(row.size_skipped, true);
        assert.equal(row.pg_relation_size, null);
        await ddl`rollback`;
      } finally {
        ddl.release();
      }
      await sql`select telemetry.untrack_table('lock_probe')`;
    },
  );

  await step("a sort with a small work_mem inside a run gives temp_files_delta > 0", async () => {
    const r = await run(sql, "temp spill");
    const conn = await sql.reserve();
    try {
      await conn`set work_mem = '64kB'`;
      await conn`select count(*) from (select g from generate_series(1, 200000) g order by g desc) x`;
      await flushStats(conn);
    } finally {
      conn.release();
    }
    const w = await endRun(sql, r.id);
    const [c] = await sql`select * from telemetry.compare(${w.started}, ${w.ended})`;
    assert.ok(Number(c.temp_files_delta) > 0, `temp_files_delta = ${c.temp_files_delta}`);
    assert.ok(Number(c.temp_bytes_delta) > 0);
    // postgres.js sends timestamptz parameters with millisecond precision; snapshots carry microseconds.
    assert.ok(
      Math.abs(Number(c.start_offset_seconds)) <= 0.001,
      `start offset ${c.start_offset_seconds}`,
    );
    assert.ok(
      Math.abs(Number(c.end_offset_seconds)) <= 0.001,
      `end offset ${c.end_offset_seconds}`,
    );
    assertNoNegative(c, "temp spill");
  });

  await step("a CHECKPOINT inside a run gives checkpoint_occurred", async () => {
    const r = await run(sql, "checkpoint");
    await admin`checkpoint`;
    const w = await endRun(sql, r.id);
    const [c] =
      await sql`select checkpoint_occurred, ckpt_requested_delta from telemetry.compare(${w.started}, ${w.ended})`;
    assert.equal(c.checkpoint_occurred, true);
    assert.ok(Number(c.ckpt_requested_delta) >= 1);
  });

  await step("writes to a tracked table show in table_compare", async () => {
    await sql`create table public.batch_target (id bigint primary key, payload text)`;
    assert.match(
      (await sql`select telemetry.track_table('batch_target') as m`)[0].m,
      /Now tracking/,
    );
    const r = await run(sql, "tracked writes");
    const conn = await sql.reserve();
    try {
      await conn`insert into public.batch_target select g, repeat('x', 200) from generate_series(1, 5000) g`;
      await conn`update public.batch_target set payload = 'y' where id <= 100`;
      await conn`delete from public.batch_target where id > 4900`;
      await flushStats(conn);
    } finally {
      conn.release();
    }
    const w = await endRun(sql, r.id);
    const [tc] =
      await sql`select * from telemetry.table_compare('batch_target', ${w.started}, ${w.ended})`;
    assert.equal(tc.table_name, "public.batch_target");
    assert.equal(Number(tc.inserts_delta), 5000);
    assert.equal(Number(tc.updates_delta), 100);
    assert.equal(Number(tc.deletes_delta), 100);
    assert.ok(Number(tc.size_delta_bytes) > 0);
    assert.equal(tc.reset_detected, false);
    const listed = await sql`select relname from telemetry.list_tracked_tables()`;
    assert.ok(listed.some((x) => x.relname === "batch_target"));
  });

  await step("an autovacuum on a tracked table shows autovacuum_ran", async () => {
    await sql`create table public.av_target (id bigint primary key, v text)
              with (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0.0,
                    autovacuum_vacuum_insert_threshold = 0, autovacuum_vacuum_insert_scale_factor = 0.0)`;
    await sql`select telemetry.track_table('av_target')`;
    const r = await run(sql, "autovacuum");
    const conn = await sql.reserve();
    try {
      await conn`insert into public.av_target select g, 'v' from generate_series(1, 2000) g`;
      await conn`delete from public.av_target where id % 2 = 0`;
      await flushStats(conn);
    } finally {
      conn.release();
    }
    await waitFor(
      "autovacuum to process av_target",
      async () => {
        const [x] =
          await sql`select autovacuum_count from pg_stat_all_tables where relname = 'av_target'`;
        return Number(x.autovacuum_count) > 0;
      },
      60_000,
      250,
    );
    const w = await endRun(sql, r.id);
    const [tc] =
      await sql`select autovacuum_ran, autovacuum_count_delta from telemetry.table_compare('av_target', ${w.started}, ${w.ended})`;
    assert.equal(tc.autovacuum_ran, true);
    assert.ok(Number(tc.autovacuum_count_delta) >= 1);
  });

  await step("pg_stat_reset() inside a window is flagged and gives no negative delta", async () => {
    const pre = await sql.reserve();
    try {
      await pre`insert into public.batch_target select g, 'z' from generate_series(10001, 12000) g`;
      await flushStats(pre);
    } finally {
      pre.release();
    }
    const r = await run(sql, "reset db");
    await admin`select pg_stat_reset()`;
    const conn = await sql.reserve();
    try {
      await conn`insert into public.batch_target select g, 'z' from generate_series(20001, 20010) g`;
      await flushStats(conn);
    } finally {
      conn.release();
    }
    const w = await endRun(sql, r.id);
    const [c] = await sql`select * from telemetry.compare(${w.started}, ${w.ended})`;
    assert.ok((c.resets as string[]).includes("database"), JSON.stringify(c.resets));
    assertNoNegative(c, "pg_stat_reset");
    const [tc] =
      await sql`select * from telemetry.table_compare('batch_target', ${w.started}, ${w.ended})`;
    assert.equal(tc.reset_detected, true);
    assert.equal(Number(tc.inserts_delta), 10);
    assertNoNegative(tc, "pg_stat_reset table");
  });

  const shared = [
    "bgwriter",
    "wal",
    ...(v >= 16 ? ["io"] : []),
    ...(v >= 17 ? ["checkpointer"] : []),
  ];
  for (const [i, target] of shared.entries()) {
    await step(
      `pg_stat_reset_shared('${target}') inside a window is flagged and gives no negative delta`,
      async () => {
        const base = 100_000 * (i + 1);
        await sql`insert into public.batch_target select g, 'w' from generate_series(${base}::int, ${
          base + 3000
        }::int) g`;
        await admin`checkpoint`;
        const r = await run(sql, `reset ${target}`);
        await admin`select pg_stat_reset_shared(${target})`;
        await sql`insert into public.batch_target select g, 'w' from generate_series(${
          base + 5000
        }::int, ${base + 5100}::int) g`;
        const w = await endRun(sql, r.id);
        const [c] = await sql`select * from telemetry.compare(${w.started}, ${w.ended})`;
        assert.ok(
          (c.resets as string[]).includes(target),
          `${target} not in ${JSON.stringify(c.resets)}`,
        );
        assertNoNegative(c, `reset_shared(${target})`);
      },
    );
  }

  for (const mode of ["fast", "immediate"] as const) {
    await step(
      `a ${mode} restart inside a window is flagged as a restart and gives no negative delta`,
      async () => {
        await sql`insert into public.batch_target select g, 'r' from generate_series(50001, 52000) g on conflict do nothing`;
        const r = await run(sql, `restart ${mode}`);
        await cluster.restart(mode);
        sql = cluster.sql("postgres", { max: 6 });
        admin = cluster.sql("supabase_admin", { max: 2 });
        const fresh = sql;
        await fresh`insert into public.batch_target select g, 'r' from generate_series(60001, 60010) g on conflict do nothing`;
        const w = await endRun(fresh, r.id);
        const [c] = await fresh`select * from telemetry.compare(${w.started}, ${w.ended})`;
        assert.equal(c.restarted, true);
        if (mode === "immediate") {
          assert.ok((c.resets as string[]).length > 0, "crash recovery resets statistics");
        }
        assertNoNegative(c, `${mode} restart`);
        const deltas = await fresh`select * from telemetry.deltas order by id desc limit 3`;
        for (const d of deltas) assertNoNegative(d, `deltas after ${mode} restart`);
      },
    );
  }

  await step(
    "pg_stat_statements is captured and statement_compare ranks the window's statements",
    async () => {
      const db = sql;
      const r = await run(db, "statements");
      const conn = await db.reserve();
      try {
        for (let i = 0; i < 5; i++) {
          await conn.unsafe(
            "select count(*) from generate_series(1, 300000) as slow_statement_probe",
          );
        }
        await flushStats(conn);
      } finally {
        conn.release();
      }
      const w = await endRun(db, r.id);
      const top =
        await db`select query, calls_delta from telemetry.statement_compare(${w.started}, ${w.ended}, 5)`;
      const probe = top.find((x) => String(x.query).includes("slow_statement_probe"));
      assert.ok(probe, JSON.stringify(top.map((x) => x.query)));
      assert.equal(Number(probe.calls_delta), 5);
    },
  );

  await step(
    "wait_summary reports average active sessions without idle background loops",
    async () => {
      const db = cluster.sql("postgres", { max: 4 });
      const sleepers = [1, 2, 3].map(() => db`select pg_sleep(1.5)`.execute());
      await new Promise((r) => setTimeout(r, 400));
      const before = new Date(Date.now() - 100).toISOString();
      await db`select telemetry.sample()`;
      await new Promise((r) => setTimeout(r, 50));
      await db`select telemetry.sample()`;
      const after = new Date(Date.now() + 100).toISOString();
      await Promise.all(sleepers);
      const rows = await db`select * from telemetry.wait_summary(${before}, ${after})`;
      const sleep = rows.find((x) => x.wait_event === "PgSleep");
      assert.ok(sleep, JSON.stringify(rows));
      assert.equal(sleep.wait_class, "Timeout");
      assert.equal(Number(sleep.avg_waiters), 3);
      assert.equal(sleep.max_waiters, 3);
      assert.ok(
        !rows.some((x) => x.wait_event_type === "Activity"),
        "idle background loops are excluded",
      );
    },
  );

  await step("anon and authenticated can neither call nor read anything in telemetry", async () => {
    for (const role of ["anon", "authenticated"]) {
      const [r] = await admin`
        select has_schema_privilege(${role}, 'telemetry', 'usage') as schema_usage,
               (select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                where n.nspname = 'telemetry' and has_function_privilege(${role}, p.oid, 'execute')) as callable,
               (select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace
                where n.nspname = 'telemetry' and c.relkind in ('r', 'v')
                  and has_table_privilege(${role}, c.oid, 'select')) as readable`;
      assert.deepEqual({ ...r }, { schema_usage: false, callable: "0", readable: "0" }, role);
      const conn = await admin.reserve();
      try {
        await conn.unsafe(`set role ${role}`);
        await assert.rejects(conn`select telemetry.sample()`, /permission denied/);
        await assert.rejects(conn`select * from telemetry.samples`, /permission denied/);
      } finally {
        await conn.unsafe("reset role");
        conn.release();
      }
    }
  });

  await step("a sampler without pg_read_all_stats is flagged, and preflight says why", async () => {
    const low = `telemetry_low_${v}`;
    await admin.unsafe(`create role ${low} login password 'x'`);
    await admin.unsafe(`grant usage on schema telemetry to ${low}`);
    await admin.unsafe(`grant select, insert, update on all tables in schema telemetry to ${low}`);
    await admin.unsafe(`grant execute on all functions in schema telemetry to ${low}`);
    const conn = await admin.reserve();
    try {
      await conn.unsafe(`set role ${low}`);
      const [{ id }] = await conn`select telemetry._sample(true) as id`;
      const [row] = await conn`select privileged from telemetry.samples where id = ${id}`;
      assert.equal(row.privileged, false);
      const checks = await conn`select check_name, status, detail from telemetry.preflight()`;
      const stats = checks.find((c) => c.check_name === "pg_read_all_stats");
      assert.equal(stats?.status, "fail");
      assert.match(String(stats?.detail), /lacks pg_read_all_stats/);
    } finally {
      await conn.unsafe("reset role");
      conn.release();
    }
    await admin.unsafe(`drop owned by ${low}`);
    await admin.unsafe(`drop role ${low}`);
  });

  await step("cleanup() deletes what is older than the retention, and only that", async () => {
    const [{ id: oldSample }] = await sql`
      insert into telemetry.samples (captured_at, privileged, backends, wait_keys, wait_counts)
      values (now() - interval '8 days', true, 1, '{}', '{}') returning id`;
    const recent =
      (await sql`select id from telemetry.samples where captured_at > now() - interval '1 day'`)
        .map((x) => x.id);
    assert.ok(recent.length > 0);
    const [res] = await sql`select * from telemetry.cleanup()`;
    assert.ok(Number(res.deleted_samples) >= 1);
    const gone = await sql`select 1 from telemetry.samples where id = ${oldSample}`;
    assert.equal(gone.length, 0);
    const kept =
      await sql`select count(*)::int as n from telemetry.samples where id = any(${recent}::bigint[])`;
    assert.equal(kept[0].n, recent.length);
  });
}
