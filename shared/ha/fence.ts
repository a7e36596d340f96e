/**
 * The write fence (supabase/migrations/20261203100100_ha_write_fence.sql) from TypeScript: the
 * guard trigger on every replicated table, revoking and lifting a site's right to accept writes,
 * and ending the sessions of a site that was fenced. Only the guard decides whether a write
 * commits; the database's read-only default and the terminated sessions are the fast path that
 * well-behaved clients notice first.
 */
import type { Sql } from "../db/mod.ts";
import { pairs, tableLabel, type TableRef } from "./replication.ts";

/** CREATE TRIGGER holds a SHARE ROW EXCLUSIVE lock to the end of the transaction: batch. */
const GUARD_BATCH = 400;

/** Installs (or repairs) the guard on each table and its partitions; returns how many changed. */
export async function installGuards(sql: Sql, tables: TableRef[]): Promise<number> {
  let changed = 0;
  for (let i = 0; i < tables.length; i += GUARD_BATCH) {
    const [schemas, names] = pairs(tables.slice(i, i + GUARD_BATCH));
    const [{ n }] = await sql.begin(
      "read write",
      (tx) => tx`select ha.install_write_guards(${schemas}::text[], ${names}::text[]) as n`,
    );
    changed += Number(n);
  }
  return changed;
}

export interface GuardGap {
  table: string;
  problem: string;
}

/** Tables (or partitions) of `tables` whose guard is missing, disabled or altered. */
export async function guardGaps(sql: Sql, tables: TableRef[]): Promise<GuardGap[]> {
  if (tables.length === 0) return [];
  const [schemas, names] = pairs(tables);
  const rows = await sql`
    select * from ha.write_guard_gaps(${schemas}::text[], ${names}::text[])`;
  return rows.map((r) => ({
    table: tableLabel({ schema: r.schemaname, name: r.tablename }),
    problem: r.problem,
  }));
}

export type FenceKind = "frozen" | "standby" | "fenced";

/**
 * Revokes the site's writes at once (a non-transactional token: not undone if anything after it
 * fails) and records the new role. `frozen` keeps the role (a switchover's freeze, undone by a
 * rollback's lift); `standby` demotes; `fenced` marks a stale or cut-off primary.
 */
export async function setFence(
  sql: Sql,
  kind: FenceKind,
  epoch: number | null,
  reason?: string,
  operationId?: string,
): Promise<void> {
  await sql.begin(
    "read write",
    (tx) =>
      tx`select ha.set_fence(${kind}, ${epoch}::bigint, ${reason ?? null}, ${
        operationId ?? null
      }::uuid)`,
  );
}

/** How a lift sets the lease (ignored when the lease is off). */
export type LiftLease =
  /** `seconds` from now on the site's clock; the grant covering it was recorded `grantedAt` (performance.now()). */
  | { seconds: number; grantedAt: number; windowMs: number }
  /** No standby can grant one (after an emergency) until a site is rejoined. */
  | "infinity"
  /** As it is (a rollback's unfreeze: the grant that covers it is already recorded). */
  | "keep";

/**
 * Makes the site the writable primary at `epoch`. The fresh token is drawn inside this
 * transaction, so the site refuses writes until it commits; a lease lift that comes later than
 * its recorded grant covers is rolled back.
 */
export async function liftFence(sql: Sql, epoch: number, lease: LiftLease): Promise<void> {
  const seconds = typeof lease === "object" ? lease.seconds : null;
  await sql.begin("read write", async (tx) => {
    await tx`select ha.lift_fence(${epoch}::bigint, ${seconds}::numeric, ${lease === "infinity"})`;
    if (typeof lease === "object" && performance.now() - lease.grantedAt > lease.windowMs) {
      throw new Error("the lease grant is older than its window: lift again");
    }
  });
}

export interface FenceStatus {
  writable: boolean;
  reason: string | null;
  /** UTC ISO-8601, "infinity" (no standby can grant one), or null (lease off / none yet). */
  leaseUntil: string | null;
  leaseTtlSeconds: number | null;
}

export async function fenceStatus(sql: Sql): Promise<FenceStatus> {
  const [r] = await sql`select * from ha.fence_status()`;
  return {
    writable: r.writable === true,
    reason: r.reason ?? null,
    leaseUntil: r.lease_until ?? null,
    leaseTtlSeconds: r.lease_ttl_seconds === null ? null : Number(r.lease_ttl_seconds),
  };
}

/**
 * The read-only database default: the fast path, so a well-behaved client fails on its first
 * statement instead of at the guard. Not a fence by itself (any client can lift it for itself).
 */
export async function setReadOnlyDefault(sql: Sql, on: boolean): Promise<void> {
  await sql.begin("read write", async (tx) => {
    const [{ db }] = await tx`select current_database() as db`;
    const ident = `"${String(db).replaceAll('"', '""')}"`;
    await tx.unsafe(
      on
        ? `alter database ${ident} set default_transaction_read_only = on`
        : `alter database ${ident} reset default_transaction_read_only`,
    );
  });
}

/**
 * Ends the client sessions that could still be writing here: every session of another role, and
 * any session (ours excepted) holding a transaction id. Sessions of our own role that are not
 * writing — our pools, the role's pg_cron jobs — are left alone, so the toolkit never cuts the
 * ground from under its own next statement; nothing is exempt by application_name, and the guard
 * refuses whatever a surviving session tries anyway. Superusers' sessions are left alone unless
 * we are one (PostgreSQL would refuse). Waits until the ended backends are gone.
 */
export async function endClientSessions(sql: Sql): Promise<number> {
  const session = await sql.reserve();
  try {
    // Client sessions of other roles, and anything — client or background worker (a pg_cron
    // job) — that holds a transaction id.
    const rows = await session`
      select a.pid, pg_terminate_backend(a.pid) as ended from pg_stat_activity a
      where a.datname = current_database() and a.pid <> pg_backend_pid()
        and ((a.backend_type = 'client backend'
              and a.usesysid <> (select oid from pg_roles where rolname = current_user))
             or a.backend_xid is not null)
        and a.backend_type not like 'logical replication%' and a.backend_type <> 'walsender'
        and (not coalesce((select rolsuper from pg_roles where oid = a.usesysid), false)
             or (select rolsuper from pg_roles where rolname = current_user))`;
    const pids = rows.filter((r) => r.ended).map((r) => Number(r.pid));
    const until = Date.now() + 2000;
    while (pids.length && Date.now() < until) {
      const [{ n }] = await session`
        select count(*)::int as n from pg_stat_activity where pid = any(${pids}::int[])`;
      if (Number(n) === 0) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    return pids.length;
  } finally {
    session.release();
  }
}

/** Sessions other than ours — clients and background workers — that hold a transaction id. */
export async function openWriters(sql: Sql): Promise<number> {
  const [{ n }] = await sql`
    select count(*)::int as n from pg_stat_activity
    where datname = current_database() and backend_xid is not null and pid <> pg_backend_pid()
      and backend_type not like 'logical replication%' and backend_type <> 'walsender'`;
  return Number(n);
}

/**
 * Runs `fn` in one READ WRITE transaction that the guard lets through although the site is
 * fenced: a row in ha.write_passes keyed by this transaction's id, which only the owner of the ha
 * schema can insert and which is gone when the transaction ends. Used to empty a site that is
 * being rebuilt as a standby.
 */
export async function withWritePass<T>(
  sql: Sql,
  reason: string,
  fn: (tx: import("../db/mod.ts").TransactionSql) => Promise<T>,
): Promise<T> {
  return await sql.begin("read write", async (tx) => {
    await tx`insert into ha.write_passes (xid, reason) values (pg_current_xact_id(), ${reason})`;
    const result = await fn(tx);
    await tx`delete from ha.write_passes where xid = pg_current_xact_id()`;
    return result;
  }) as T;
}
