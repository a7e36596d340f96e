/** The `telemetry` function: compare windows, summarise waits, diagnose slow batches, report. */
import { z } from "zod";
import { requireConfigured, type TelemetryConfig } from "../config/mod.ts";
import { mapDbError } from "../db/errors.ts";
import { lazySql, type Sql } from "../db/mod.ts";
import { FunctionApp } from "../http/app.ts";
import { HttpError } from "../http/errors.ts";
import { addInfoRoute } from "../http/info.ts";
import type { LogSink } from "../http/logger.ts";
import * as q from "./queries.ts";
import { renderReport } from "./report.ts";
import { SELF_CONTAINED_CSP } from "../http/html.ts";
import {
  DiagnoseQuery,
  LimitQuery,
  RecentParams,
  RunParams,
  splitTable,
  StartRunBody,
  TableCompareQuery,
  TrackTableBody,
  UntrackParams,
  WindowQuery,
} from "./schemas.ts";

export interface TelemetryDeps {
  logSink?: LogSink;
  /** Overrides the database client (tests). */
  sql?: Sql;
}

const Any = z.record(z.string(), z.unknown());

export function createTelemetryApp(config: TelemetryConfig, deps: TelemetryDeps = {}): FunctionApp {
  const app = new FunctionApp({
    name: "telemetry",
    auth: { variable: "TOOLKIT_API_TOKEN", token: config.apiToken },
    logSink: deps.logSink,
  });
  const client = lazySql(() => config.dbUrl!, {
    applicationName: "sa-toolkit/telemetry",
    max: 3,
    statementTimeoutMs: 30_000,
  });
  app.onClose(client.close);

  /** Runs `fn` with the database, mapping database failures to the error shape. */
  const withDb = async <T>(fn: (sql: Sql) => Promise<T>): Promise<T> => {
    if (!deps.sql) requireConfigured(config, ["SUPABASE_DB_URL"]);
    try {
      return await fn(deps.sql ?? client.get());
    } catch (e) {
      mapDbError(e, "The telemetry database");
    }
  };

  const window = async (sql: Sql, query: WindowQuery) => {
    const w = await q.resolveWindow(sql, query);
    await q.checkRetention(sql, w);
    return w;
  };

  addInfoRoute(app, config.problems);

  app.route(
    {
      method: "get",
      path: "/compare",
      summary: "Counters between the snapshots nearest a window (reset-aware deltas)",
      query: WindowQuery,
      responses: {
        200: { description: "The window and its deltas", schema: Any },
        404: { description: "No snapshots around the window" },
      },
    },
    ({ query }, c) =>
      withDb(async (sql) => {
        const w = await window(sql, query);
        const compare = await q.compare(sql, w);
        if (!compare) {
          throw new HttpError(
            404,
            "no_data",
            "Fewer than two snapshots lie around this window; use a run, or take snapshots with telemetry.snapshot().",
          );
        }
        return c.json({ window: w, compare });
      }),
  );

  app.route(
    {
      method: "get",
      path: "/table-compare",
      summary: "A tracked table between the snapshots nearest a window",
      query: TableCompareQuery,
      responses: {
        200: { description: "The table's deltas", schema: Any },
        400: { description: "Unknown table" },
        404: { description: "Not tracked in this window" },
      },
    },
    ({ query }, c) =>
      withDb(async (sql) => {
        const { schema, table } = splitTable(query.table);
        const rel = await q.resolveTable(sql, schema, table);
        const w = await window(sql, query);
        const compare = await q.tableCompare(sql, w, rel.schema, rel.table);
        if (!compare) {
          throw new HttpError(
            404,
            "no_data",
            `No snapshots of ${rel.schema}.${rel.table} lie around this window: track it (POST /tracked-tables) before the batch.`,
          );
        }
        return c.json({ window: w, table: `${rel.schema}.${rel.table}`, compare });
      }),
  );

  app.route(
    {
      method: "get",
      path: "/wait-summary",
      summary: "Average active sessions per wait event over a window",
      query: WindowQuery,
      responses: { 200: { description: "Wait events, busiest first", schema: Any } },
    },
    ({ query }, c) =>
      withDb(async (sql) => {
        const w = await window(sql, query);
        return c.json({ window: w, ...(await q.waitSummary(sql, w)) });
      }),
  );

  app.route(
    {
      method: "get",
      path: "/recent/:kind",
      summary: "The last two hours of waits, locks, activity, progress or replication",
      params: RecentParams,
      query: LimitQuery,
      responses: { 200: { description: "Rows, newest first", schema: Any } },
    },
    ({ params, query }, c) =>
      withDb(async (sql) =>
        c.json({ kind: params.kind, rows: await q.recent(sql, params.kind, query.limit) })
      ),
  );

  app.route(
    {
      method: "get",
      path: "/diagnose",
      summary:
        "Ranked causes of a slow window, with evidence, recommendations and (with a baseline) attribution",
      query: DiagnoseQuery,
      responses: { 200: { description: "The diagnosis", schema: Any } },
    },
    ({ query }, c) =>
      withDb(async (sql) => {
        const w = await window(sql, query);
        const baseline = await q.resolveBaseline(sql, query);
        if (baseline) await q.checkRetention(sql, baseline);
        return c.json(await q.diagnose(sql, { window: w, baseline, cpuCount: query.cpu_count }));
      }),
  );

  app.route(
    {
      method: "get",
      path: "/report",
      summary:
        "A self-contained HTML report: diagnosis, load by wait class, WAL and checkpoints, locks",
      query: DiagnoseQuery,
      responses: { 200: { description: "HTML page", contentType: "text/html" } },
    },
    ({ query }, c) =>
      withDb(async (sql) => {
        const w = await window(sql, query);
        const baseline = await q.resolveBaseline(sql, query);
        if (baseline) await q.checkRetention(sql, baseline);
        const [diagnosis, timeline, wal, locks] = await Promise.all([
          q.diagnose(sql, { window: w, baseline, cpuCount: query.cpu_count }),
          q.timeline(sql, w, 120),
          q.walTimeline(sql, w, 60),
          q.locks(sql, w, 50),
        ]);
        const title = w.run
          ? `Batch telemetry: run ${w.run.id} (${w.run.name})`
          : "Batch telemetry report";
        const html = renderReport({
          title,
          generatedAt: new Date().toISOString(),
          diagnosis,
          timeline,
          wal,
          locks,
        });
        c.header(
          "content-security-policy",
          SELF_CONTAINED_CSP,
        );
        return c.html(html);
      }),
  );

  app.route(
    {
      method: "get",
      path: "/tracked-tables",
      summary: "Tables whose size and counters every snapshot records",
      responses: { 200: { description: "Tracked tables", schema: Any } },
    },
    (_i, c) => withDb(async (sql) => c.json({ tables: await q.listTracked(sql) })),
  );

  app.route(
    {
      method: "post",
      path: "/tracked-tables",
      summary: "Start tracking a table",
      body: TrackTableBody,
      responses: {
        201: { description: "Now tracked", schema: Any },
        400: { description: "Unknown table" },
      },
    },
    ({ body }, c) =>
      withDb(async (sql) => {
        const { schema, table } = splitTable(body.table);
        const rel = await q.resolveTable(sql, schema, table);
        const message = await q.track(sql, rel.schema, rel.table);
        return c.json({ table: `${rel.schema}.${rel.table}`, message }, 201);
      }),
  );

  app.route(
    {
      method: "delete",
      path: "/tracked-tables/:schema/:table",
      summary: "Stop tracking a table",
      params: UntrackParams,
      responses: {
        200: { description: "No longer tracked", schema: Any },
        404: { description: "It was not tracked" },
      },
    },
    ({ params }, c) =>
      withDb(async (sql) =>
        c.json({
          table: `${params.schema}.${params.table}`,
          message: await q.untrack(sql, params.schema, params.table),
        })
      ),
  );

  app.route(
    {
      method: "post",
      path: "/runs",
      summary: "Mark a batch start: takes a snapshot and a sample now",
      body: StartRunBody,
      responses: { 201: { description: "The run", schema: Any } },
    },
    ({ body }, c) =>
      withDb(async (sql) => c.json({ run: await q.startRun(sql, body.name, body.meta) }, 201)),
  );

  app.route(
    {
      method: "post",
      path: "/runs/:id/end",
      summary: "Mark a batch end: takes a snapshot and a sample now",
      params: RunParams,
      responses: {
        200: { description: "The ended run", schema: Any },
        404: { description: "No such run" },
        409: { description: "Already ended" },
      },
    },
    ({ params }, c) => withDb(async (sql) => c.json({ run: await q.endRun(sql, params.id) })),
  );

  app.route(
    {
      method: "get",
      path: "/runs",
      summary: "Runs, newest first",
      query: LimitQuery,
      responses: { 200: { description: "Runs", schema: Any } },
    },
    ({ query }, c) => withDb(async (sql) => c.json({ runs: await q.listRuns(sql, query.limit) })),
  );

  return app;
}
