/** Request schemas of the telemetry function (also the source of its OpenAPI document). */
import { z } from "zod";

/** ISO-8601 date-time with an explicit offset: 2026-11-27T01:00:00Z, 2026-11-27T01:00:00.123456+02:00. */
const ISO_WITH_OFFSET = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})$/;

export const IsoDateTime = z
  .string()
  .regex(ISO_WITH_OFFSET, "must be an ISO-8601 date-time with an offset, e.g. 2026-11-27T01:00:00Z")
  .refine((v) => !Number.isNaN(Date.parse(v)), "is not a valid date-time")
  .describe("ISO-8601 date-time with offset");

const RunId = z.coerce.number().int().positive().max(Number.MAX_SAFE_INTEGER);

/** A window: start and end, or a run id (its start and end). */
export const WindowQuery = z
  .object({
    start: IsoDateTime.optional(),
    end: IsoDateTime.optional(),
    run: RunId.optional().describe("A run id: use the run's start and end."),
  })
  .superRefine((v, ctx) => {
    if (v.run !== undefined) {
      if (v.start !== undefined || v.end !== undefined) {
        ctx.addIssue({
          code: "custom",
          message: "give either run or start and end, not both",
          path: ["run"],
        });
      }
      return;
    }
    if (v.start === undefined) {
      ctx.addIssue({ code: "custom", message: "is required", path: ["start"] });
    }
    if (v.end === undefined) {
      ctx.addIssue({ code: "custom", message: "is required", path: ["end"] });
    }
    if (v.start && v.end && Date.parse(v.end) <= Date.parse(v.start)) {
      ctx.addIssue({ code: "custom", message: "must be after start", path: ["end"] });
    }
  });
export type WindowQuery = z.infer<typeof WindowQuery>;

const IDENT = "[A-Za-z_][A-Za-z0-9_$]{0,62}";
export const TableName = z
  .string()
  .regex(
    new RegExp(`^(?:${IDENT}\\.)?${IDENT}$`),
    "must be [schema.]table made of letters, digits, _ and $",
  )
  .describe("[schema.]table (unquoted names, matched as stored)");

export function splitTable(name: string): { schema: string; table: string } {
  const i = name.indexOf(".");
  return i < 0
    ? { schema: "public", table: name }
    : { schema: name.slice(0, i), table: name.slice(i + 1) };
}

export const TableCompareQuery = z.intersection(WindowQuery, z.object({ table: TableName }));

export const DiagnoseQuery = z.intersection(
  WindowQuery,
  z
    .object({
      baseline_start: IsoDateTime.optional(),
      baseline_end: IsoDateTime.optional(),
      baseline_run: RunId.optional().describe("A run id to use as the baseline window."),
      cpu_count: z.coerce.number().int().min(1).max(1024).optional()
        .describe("vCPUs of the database server (else telemetry.config cpu_count)."),
    })
    .superRefine((v, ctx) => {
      const times = v.baseline_start !== undefined || v.baseline_end !== undefined;
      if (times && v.baseline_run !== undefined) {
        ctx.addIssue({
          code: "custom",
          message: "give either baseline_run or baseline_start and baseline_end",
          path: ["baseline_run"],
        });
      }
      if (times && (v.baseline_start === undefined || v.baseline_end === undefined)) {
        ctx.addIssue({
          code: "custom",
          message: "a baseline needs both baseline_start and baseline_end",
          path: ["baseline_start"],
        });
      }
      if (
        v.baseline_start && v.baseline_end &&
        Date.parse(v.baseline_end) <= Date.parse(v.baseline_start)
      ) {
        ctx.addIssue({
          code: "custom",
          message: "must be after baseline_start",
          path: ["baseline_end"],
        });
      }
    }),
);
export type DiagnoseQuery = z.infer<typeof DiagnoseQuery>;

export const RecentKind = z.enum(["waits", "locks", "activity", "progress", "replication"]);
export const RecentParams = z.object({ kind: RecentKind });
export const LimitQuery = z.object({
  limit: z.coerce.number().int().min(1).max(1000).default(200),
});

export const TrackTableBody = z.object({ table: TableName }).strict();
export const UntrackParams = z.object({
  schema: z.string().regex(new RegExp(`^${IDENT}$`), "is not a valid schema name"),
  table: z.string().regex(new RegExp(`^${IDENT}$`), "is not a valid table name"),
});

export const StartRunBody = z
  .object({
    name: z.string().trim().min(1).max(200),
    meta: z.record(z.string(), z.unknown()).optional().describe(
      "Free-form labels stored with the run.",
    ),
  })
  .strict();
export const RunParams = z.object({ id: RunId });
