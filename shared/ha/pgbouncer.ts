/**
 * PgBouncer: the admin console (simple query protocol only; PAUSE wrapped in our own timeout
 * with an explicit RESUME, since a PAUSE outlives a disconnected admin) and the `%include`d
 * databases file that routes the one application database.
 */
import { createSql, type Sql } from "../db/mod.ts";
import { DeadlineError, withDeadline } from "./deadline.ts";

export interface RouteTarget {
  host: string;
  port: number;
  dbname: string;
}

/** The databases file, in the same format as deploy/fly-pgbouncer/entrypoint.sh writes it. */
export function renderDatabasesFile(
  database: string,
  target: RouteTarget,
  epoch: number | null,
): string {
  for (const v of [database, target.host, String(target.port), target.dbname]) {
    if (!/^[A-Za-z0-9_.:-]+$/.test(v)) {
      throw new Error("Refusing to write a databases line with unsafe characters.");
    }
  }
  const lines = [";; routed database, written by entrypoint.sh or the failover router"];
  if (epoch !== null) lines.push(`;; epoch=${epoch}`);
  lines.push(`${database} = host=${target.host} port=${target.port} dbname=${target.dbname}`);
  return lines.join("\n") + "\n";
}

export function parseDatabasesFile(
  text: string,
  database: string,
): { target?: RouteTarget; epoch: number | null } {
  const epoch = /^;; epoch=(\d+)$/m.exec(text);
  const line = new RegExp(
    `^${database.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")} = host=(\\S+) port=(\\d+) dbname=(\\S+)$`,
    "m",
  ).exec(text);
  return {
    epoch: epoch ? Number(epoch[1]) : null,
    target: line ? { host: line[1], port: Number(line[2]), dbname: line[3] } : undefined,
  };
}

export interface DatabaseRow {
  name: string;
  host: string;
  port: number;
  database: string;
  paused: boolean;
  disabled: boolean;
}

/** A connection to the admin console (one at a time: PgBouncer must never see overlapping admin commands). */
export function adminClient(url: string): Sql {
  return createSql(url, { adminConsole: true, max: 1, connectTimeout: 2, idleTimeout: 60 });
}

export async function showDatabases(admin: Sql, deadlineMs = 2000): Promise<DatabaseRow[]> {
  const rows = await withDeadline(
    admin.unsafe("SHOW DATABASES").simple(),
    deadlineMs,
    "PgBouncer admin console",
  );
  return rows.map((r: Record<string, unknown>) => ({
    name: String(r.name),
    host: String(r.host ?? ""),
    port: Number(r.port),
    database: String(r.database ?? ""),
    paused: Number(r.paused) === 1 || r.paused === true,
    disabled: Number(r.disabled) === 1 || r.disabled === true,
  }));
}

export async function routedDatabase(
  admin: Sql,
  database: string,
  deadlineMs = 2000,
): Promise<DatabaseRow | undefined> {
  return (await showDatabases(admin, deadlineMs)).find((d) => d.name === database);
}

function adminMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/**
 * PAUSE <db> with our own timeout. "already suspended/paused" counts as success. On timeout the
 * pause is undone with RESUME on a fresh connection and a DeadlineError is thrown.
 */
export async function pause(adminUrl: string, database: string, timeoutMs: number): Promise<void> {
  const admin = adminClient(adminUrl);
  try {
    await withDeadline(admin.unsafe(`PAUSE ${quoteIdent(database)}`).simple(), timeoutMs, "PAUSE");
  } catch (e) {
    if (/already (suspended|paused)/i.test(adminMessage(e))) return;
    if (e instanceof DeadlineError) {
      await resume(adminUrl, database).catch(() => {});
    }
    throw e;
  } finally {
    await admin.end({ timeout: 1 }).catch(() => {});
  }
}

/** RESUME <db>; "not paused" counts as success. */
export async function resume(adminUrl: string, database: string): Promise<void> {
  const admin = adminClient(adminUrl);
  try {
    await withDeadline(admin.unsafe(`RESUME ${quoteIdent(database)}`).simple(), 5000, "RESUME");
  } catch (e) {
    if (/not paused|is not paused|pooler is not paused/i.test(adminMessage(e))) return;
    throw e;
  } finally {
    await admin.end({ timeout: 1 }).catch(() => {});
  }
}

export async function reload(adminUrl: string): Promise<void> {
  const admin = adminClient(adminUrl);
  try {
    await withDeadline(admin.unsafe("RELOAD").simple(), 5000, "RELOAD");
  } finally {
    await admin.end({ timeout: 1 }).catch(() => {});
  }
}

function quoteIdent(name: string): string {
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) throw new Error("Unsafe PgBouncer database name.");
  return name;
}
