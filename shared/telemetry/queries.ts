/**
 * The telemetry function's domain: thin calls into the SQL API of the `telemetry` schema.
 * Times travel as text and are cast in SQL, because postgres.js would otherwise send timestamptz
 * parameters with millisecond precision only.
 */
import type { Sql } from "../db/mod.ts";
import { HttpError } from "../http/errors.ts";
import type { DiagnoseQuery, WindowQuery } from "./schemas.ts";

export interface Window {
  start: string;
  end: string;
  run?: { id: number; name: string; ended: boolean };
}

type Json = Record<string, unknown>;

/** A run id becomes its window (a run still going ends now); times are kept as given. */
export async function resolveWindow(sql: Sql, q: WindowQuery): Promise<Window> {
  if (q.run === undefined) return { start: q.start!, end: q.end! };
  const rows = await sql`
    select id, name, started_at::text as start, coalesce(ended_at, now())::text as "end", ended_at is not null as ended
    from telemetry.runs where id = ${q.run}`;
  if (rows.length === 0) throw new HttpError(404, "run_not_found", `Run ${q.run} does not exist.`);
  const r = rows[0];
  return { start: r.start, end: r.end, run: { id: Number(r.id), name: r.name, ended: r.ended } };
}

/** A window that starts before the retention horizon would read data that cleanup deleted. */
export async function checkRetention(sql: Sql, w: Window): Promise<void> {
  const [r] = await sql`
    select ${w.start}::text::timestamptz < now() - coalesce(
             (select nullif(value, '')::interval from telemetry.config where key = 'retention'), interval '7 days') as outside,
           coalesce((select value from telemetry.config where key = 'retention'), '7 days') as retention`;
  if (r.outside) {
    throw new HttpError(
      400,
      "window_outside_retention",
      `The window starts before the retention horizon (${r.retention}); its data has been deleted.`,
    );
  }
}

export async function compare(sql: Sql, w: Window): Promise<Json | null> {
  const rows = await sql`
    select to_jsonb(c) as c from telemetry.compare(${w.start}::text::timestamptz, ${w.end}::text::timestamptz) c`;
  return rows[0]?.c ?? null;
}

/** Resolves [schema.]table to a relation; a 400 when there is none. */
export async function resolveTable(
  sql: Sql,
  schema: string,
  table: string,
): Promise<{ schema: string; table: string }> {
  const rows = await sql`
    select n.nspname as schema, c.relname as table
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname = ${schema} and c.relname = ${table} and c.relkind in ('r', 'p', 'm')`;
  if (rows.length === 0) {
    throw new HttpError(400, "unknown_table", `There is no table ${schema}.${table}.`);
  }
  return { schema: rows[0].schema, table: rows[0].table };
}

export async function tableCompare(
  sql: Sql,
  w: Window,
  schema: string,
  table: string,
): Promise<Json | null> {
  const rows = await sql`
    select to_jsonb(c) as c
    from telemetry.table_compare(${table}, ${w.start}::text::timestamptz, ${w.end}::text::timestamptz, ${schema}) c`;
  return rows[0]?.c ?? null;
}

export async function waitSummary(sql: Sql, w: Window): Promise<{ samples: number; rows: Json[] }> {
  const [{ samples }] = await sql`
    select count(*)::int as samples from telemetry.samples
    where captured_at between ${w.start}::text::timestamptz and ${w.end}::text::timestamptz`;
  const rows = await sql`
    select to_jsonb(s) as s from telemetry.wait_summary(${w.start}::text::timestamptz, ${w.end}::text::timestamptz) s`;
  return { samples, rows: rows.map((r) => r.s) };
}

const RECENT_VIEWS = {
  waits: "telemetry.recent_waits",
  locks: "telemetry.recent_locks",
  activity: "telemetry.recent_activity",
  progress: "telemetry.recent_progress",
  replication: "telemetry.recent_replication",
} as const;

export async function recent(
  sql: Sql,
  kind: keyof typeof RECENT_VIEWS,
  limit: number,
): Promise<Json[]> {
  const view = RECENT_VIEWS[kind];
  // The view name comes from the fixed map above, never from the request.
  const rows = await sql.unsafe(
    `select to_jsonb(v) as v from ${view} v order by v.captured_at desc limit $1`,
    [limit],
  );
  return rows.map((r) => r.v);
}

export interface DiagnoseInput {
  window: Window;
  baseline?: Window;
  cpuCount?: number;
}

export async function resolveBaseline(sql: Sql, q: DiagnoseQuery): Promise<Window | undefined> {
  if (q.baseline_run !== undefined) return await resolveWindow(sql, { run: q.baseline_run });
  if (q.baseline_start && q.baseline_end) return { start: q.baseline_start, end: q.baseline_end };
  return undefined;
}

export async function diagnose(sql: Sql, input: DiagnoseInput): Promise<Json> {
  const b = input.baseline;
  const [{ d }] = await sql`
    select telemetry.diagnose(
      ${input.window.start}::text::timestamptz, ${input.window.end}::text::timestamptz,
      ${b?.start ?? null}::text::timestamptz, ${b?.end ?? null}::text::timestamptz,
      ${input.cpuCount ?? null}::int) as d`;
  return d;
}

export async function timeline(sql: Sql, w: Window, buckets: number): Promise<Json[]> {
  const rows = await sql`
    select to_jsonb(t) as t
    from telemetry.aas_timeline(${w.start}::text::timestamptz, ${w.end}::text::timestamptz, ${buckets}) t`;
  return rows.map((r) => r.t);
}

export async function walTimeline(sql: Sql, w: Window, buckets: number): Promise<Json[]> {
  const rows = await sql`
    select to_jsonb(t) as t
    from telemetry.wal_timeline(${w.start}::text::timestamptz, ${w.end}::text::timestamptz, ${buckets}) t`;
  return rows.map((r) => r.t);
}

export async function locks(sql: Sql, w: Window, limit: number): Promise<Json[]> {
  const rows = await sql`
    select to_jsonb(l) as l
    from telemetry.locks(${w.start}::text::timestamptz, ${w.end}::text::timestamptz) l
    order by l.blocked_duration desc nulls last, l.captured_at desc
    limit ${limit}`;
  return rows.map((r) => r.l);
}

export async function listTracked(sql: Sql): Promise<Json[]> {
  const rows = await sql`select to_jsonb(t) as t from telemetry.list_tracked_tables() t`;
  return rows.map((r) => r.t);
}

export async function track(sql: Sql, schema: string, table: string): Promise<string> {
  const [{ m }] = await sql`select telemetry.track_table(${table}, ${schema}) as m`;
  return m;
}

/** Stops tracking; a 404 when the table was not tracked. */
export async function untrack(sql: Sql, schema: string, table: string): Promise<string> {
  const [{ m }] = await sql`select telemetry.untrack_table(${table}, ${schema}) as m`;
  if (/was not being tracked/.test(m)) throw new HttpError(404, "not_tracked", m);
  return m;
}

export async function startRun(sql: Sql, name: string, meta: Json | undefined): Promise<Json> {
  const [{ id }] = await sql`select telemetry.start_run(${name}, ${
    sql.json((meta ?? {}) as never)
  }) as id`;
  return await getRun(sql, Number(id));
}

export async function endRun(sql: Sql, id: number): Promise<Json> {
  await sql`select telemetry.end_run(${id})`;
  return await getRun(sql, id);
}

async function getRun(sql: Sql, id: number): Promise<Json> {
  const [r] = await sql`
    select to_jsonb(x) as r
    from (select id, name, started_at, ended_at, ended_at - started_at as duration, meta from telemetry.runs where id = ${id}) x`;
  return r.r;
}

export async function listRuns(sql: Sql, limit: number): Promise<Json[]> {
  const rows = await sql`select to_jsonb(r) as r from telemetry.list_runs(${limit}) r`;
  return rows.map((r) => r.r);
}
