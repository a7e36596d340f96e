/** The `failover` function: planned switchover, emergency failover and failback, by curl. */
import { z } from "zod";
import type { FailoverConfig } from "../config/mod.ts";
import { mapDbError } from "../db/errors.ts";
import { type AppContext, FunctionApp } from "../http/app.ts";
import { constantTimeEqual, isUsableToken } from "../http/auth.ts";
import { HttpError } from "../http/errors.ts";
import { addInfoRoute } from "../http/info.ts";
import type { LogSink } from "../http/logger.ts";
import {
  checkResume,
  DEFAULT_LIMITS,
  FailoverMachine,
  type Faults,
  type Limits,
  newOperation,
  plan,
} from "./failover.ts";
import { DEFAULT_LEASE, renewLease } from "./lease.ts";
import {
  findOperation,
  type Operation,
  type OperationKind,
  OperationStore,
  recentOperations,
  runningOperation,
} from "./operations.ts";
import { HaRuntime, type HaRuntimeOptions } from "./runtime.ts";
import { withDeadline } from "./deadline.ts";
import { rejoinAsStandby, setupReplication, verifyData } from "./setup.ts";
import { bearerToken } from "../http/auth.ts";

export interface FailoverDeps extends HaRuntimeOptions {
  logSink?: LogSink;
  /** Lease length for a running operation (a crashed driver's operation is resumable after it). */
  leaseMs?: number;
  limits?: Partial<Limits>;
  /** Test hooks: where the driver "dies" or a step fails (see Faults). */
  faults?: Faults;
  /** Test hook, kept for older tests: the driver "dies" right after this step. */
  crashAfter?: string;
}

const IdempotencyKey = z.string().regex(
  /^[A-Za-z0-9._:-]{1,200}$/,
  "1-200 characters from A-Z a-z 0-9 . _ : -",
);

export const FailoverBody = z.object({
  mode: z.enum(["planned", "emergency"]),
  dry_run: z.boolean().optional(),
  idempotency_key: IdempotencyKey.optional(),
}).strict();
export const FailbackBody = z.object({
  dry_run: z.boolean().optional(),
  idempotency_key: IdempotencyKey.optional(),
}).strict();
export const OperationParams = z.object({ id: z.uuid() });
const Ident = z.string().min(1).max(63).refine((v) => !v.includes("\u0000"), "no NUL characters");
const TableName = z.union([
  z.string().regex(
    /^[a-z_][a-z0-9_]{0,62}\.[a-z_][a-z0-9_]{0,62}$/,
    "schema.table with simple lowercase names (use {schema, table} for others)",
  ).transform((v) => {
    const [schema, table] = v.split(".");
    return { schema, name: table };
  }),
  z.object({ schema: Ident, table: Ident }).strict().transform((v) => ({
    schema: v.schema,
    name: v.table,
  })),
]);
export const SetupBody = z.object({
  dry_run: z.boolean().optional(),
  copy_data: z.boolean().optional(),
  schemas: z.array(z.string().regex(/^[a-z_][a-z0-9_]{0,62}$/)).min(1).max(20).optional(),
  extra_tables: z.array(TableName).max(200).optional(),
  lease: z.union([
    z.literal(false),
    z.object({
      ttl_seconds: z.number().int().min(2).max(600).default(DEFAULT_LEASE.ttlSeconds!),
      renew_seconds: z.number().int().min(1).max(59).default(DEFAULT_LEASE.renewSeconds),
    }).strict(),
  ]).optional().describe(
    "The primary's write lease (default: 30 s, renewed every 5 s); false turns it off",
  ),
  lease_renewal: z.enum(["cron", "external"]).optional().describe(
    "cron (pg_cron 1.5+ runs ha.lease_tick()) or external (your own scheduler does)",
  ),
}).strict();
export const LeaseBody = z.object({
  site: z.enum(["primary", "standby"]),
  epoch: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER),
}).strict();
export const AbandonBody = z.object({
  reason: z.string().min(1).max(500).optional(),
}).strict();
export const RejoinBody = z.object({
  site: z.enum(["primary", "standby"]),
  discard_unreplicated: z.literal(true).describe(
    "Must be true: the site's copy of the published tables is replaced by the primary's",
  ),
}).strict();
const ChecksQuery = z.object({
  mode: z.enum(["planned", "emergency", "failback"]).default("planned"),
}).strict();
const ListQuery = z.object({ limit: z.coerce.number().int().min(1).max(100).default(20) }).strict();

const Any = z.record(z.string(), z.unknown());

/** What the API shows of an operation (no connection strings exist in it to begin with). */
export function operationBody(op: Operation, steps?: unknown[]): Record<string, unknown> {
  const { marker_token: _m, post_token: _p, ...data } = op.data as Record<string, unknown>;
  return {
    operation_id: op.id,
    kind: op.kind,
    state: op.state,
    step: op.step,
    source: op.source,
    target: op.target,
    epoch_from: op.epochFrom,
    epoch_to: op.epochTo,
    idempotency_key: op.idempotencyKey,
    error: op.error,
    created_at: op.createdAt,
    updated_at: op.updatedAt,
    finished_at: op.finishedAt,
    driver: op.state === "running" ? (op.leaseExpired ? "lost (resume it)" : "active") : null,
    data,
    ...(steps ? { steps } : {}),
  };
}

export function createFailoverApp(config: FailoverConfig, deps: FailoverDeps = {}): FunctionApp {
  const app = new FunctionApp({
    name: "failover",
    auth: { variable: "FAILOVER_TOKEN", token: config.failoverToken },
    logSink: deps.logSink,
  });
  const rt = new HaRuntime(config, "sa-toolkit/failover", deps);
  const owner = `failover-${crypto.randomUUID().slice(0, 8)}`;
  const leaseMs = deps.leaseMs ?? 30_000;
  const limits: Limits = { ...DEFAULT_LIMITS, ...deps.limits };
  const background = new Set<Promise<unknown>>();
  app.onClose(async () => {
    if (background.size) {
      await withDeadline(Promise.allSettled([...background]), 60_000, "running operations").catch(
        () => {},
      );
    }
    await rt.close();
  });

  const guard = async <T>(fn: () => Promise<T>): Promise<T> => {
    rt.requireSites();
    rt.router();
    try {
      return await fn();
    } catch (e) {
      mapDbError(e, "A site's database");
    }
  };

  /** Runs the machine in the background; the Edge Runtime keeps the worker alive for it. */
  const drive = (store: OperationStore, op: Operation) => {
    const machine = new FailoverMachine(rt, store, op, {
      owner,
      leaseMs,
      limits,
      log: app.log,
      faults: deps.faults ?? (deps.crashAfter ? { crashAfter: deps.crashAfter } : undefined),
    });
    const p = machine.run().finally(() => background.delete(p));
    background.add(p);
    const er =
      (globalThis as { EdgeRuntime?: { waitUntil?: (p: Promise<unknown>) => void } }).EdgeRuntime;
    er?.waitUntil?.(p);
    return p;
  };

  const accepted = (c: AppContext, op: Operation, extra: Record<string, unknown> = {}) =>
    c.json({
      operation_id: op.id,
      kind: op.kind,
      state: op.state,
      step: op.step,
      source: op.source,
      target: op.target,
      epoch_to: op.epochTo,
      status_url: `/failover/operations/${op.id}`,
      ...extra,
    }, 202);

  /**
   * Re-invocation with an idempotency key or id: resume if the driver is gone (after checking the
   * pair is still where the operation left it), else report.
   */
  const resumeOrReport = async (c: AppContext, store: OperationStore, op: Operation) => {
    if (op.state !== "running" && op.state !== "failed_closed") {
      return c.json(operationBody(op), 200);
    }
    if (op.state === "running" && !op.leaseExpired && op.leaseOwner !== owner) {
      return accepted(c, op, {
        resumed: false,
        note: "the operation is being driven by another invocation",
      });
    }
    await checkResume(rt, op, limits);
    const claimed = await store.claim(op.id, owner, leaseMs);
    if (!claimed) {
      if (op.state === "running") {
        return accepted(c, op, {
          resumed: false,
          note: "the operation is being driven by another invocation",
        });
      }
      throw new HttpError(
        409,
        "operation_in_progress",
        "Another invocation is resuming this operation.",
      );
    }
    await store.record(op.id, claimed.step, "info", {
      resumed_by: owner,
      previous_state: op.state,
    });
    drive(store, claimed);
    return accepted(c, claimed, { resumed: true });
  };

  const start = async (
    c: AppContext,
    kind: OperationKind,
    dryRun: boolean,
    key: string | undefined,
  ) => {
    if (key) {
      const found = await findOperation(rt.sites, { key });
      if (found) {
        if (found.op.kind !== kind) {
          throw new HttpError(
            409,
            "idempotency_conflict",
            `That idempotency key belongs to a ${found.op.kind} operation.`,
          );
        }
        return await resumeOrReport(c, found.store, found.op);
      }
    }
    const running = await runningOperation(rt.sites);
    if (running && !dryRun) {
      throw new HttpError(409, "operation_in_progress", "Another failover operation is running.", {
        operation_id: running.id,
      });
    }
    // A POST may fence what it finds stale (a GET never does); then plan on that observation.
    const obs = await rt.observe(2500);
    if (!dryRun) await rt.fenceStalePrimaries(obs, c.get("log"));
    const p = await plan(rt, kind, limits, c.get("log"), obs);
    if (dryRun) {
      return c.json({
        dry_run: true,
        ok: p.ok,
        kind,
        source: p.source,
        target: p.target,
        epoch_from: p.epochFrom,
        epoch_to: p.epochTo,
        checks: p.checks,
      }, 200);
    }
    if (!p.ok) {
      c.get("log").warn("failover_refused", {
        kind,
        failed: p.checks.filter((x) => !x.ok).map((x) => x.name),
      });
      throw new HttpError(412, "guardrail_failed", "A guardrail failed; nothing was changed.", {
        failed: p.checks.filter((x) => !x.ok).map((x) => x.name),
        checks: p.checks,
      });
    }
    const store = new OperationStore(rt.sites.get(p.target!).ops, p.target!);
    const op = await store.create(newOperation(p, key), owner, leaseMs);
    await store.record(op.id, "precheck", "done", { checks: p.checks });
    drive(store, op);
    return accepted(c, op);
  };

  addInfoRoute(app, config.problems);

  app.route(
    {
      method: "post",
      path: "/",
      summary: "Start a planned switchover or an emergency failover (202 with an operation id)",
      body: FailoverBody,
      responses: {
        202: { description: "Started (or resumed, for a known idempotency key)", schema: Any },
        200: {
          description: "Dry run, or a finished operation for a known idempotency key",
          schema: Any,
        },
        409: { description: "Another operation is running" },
        412: { description: "A guardrail failed; nothing changed" },
      },
    },
    ({ body }, c) =>
      guard(() =>
        start(
          c,
          body.mode === "planned" ? "switchover" : "emergency",
          body.dry_run ?? false,
          body.idempotency_key,
        )
      ),
  );
  app.route(
    {
      method: "post",
      path: "/failback",
      summary: "Move the primary role back to the site configured as primary (planned, zero loss)",
      body: FailbackBody,
      responses: {
        202: { description: "Started", schema: Any },
        200: { description: "Dry run or finished operation", schema: Any },
        409: { description: "Another operation is running" },
        412: { description: "A guardrail failed; nothing changed" },
      },
    },
    ({ body }, c) => guard(() => start(c, "failback", body.dry_run ?? false, body.idempotency_key)),
  );
  app.route(
    {
      method: "get",
      path: "/operations",
      summary: "Recent operations from both sites, newest first",
      query: ListQuery,
      responses: { 200: { description: "Operations", schema: Any } },
    },
    ({ query }, c) =>
      guard(async () =>
        c.json({
          operations: (await recentOperations(rt.sites, query.limit)).map((o) => operationBody(o)),
        })
      ),
  );
  app.route(
    {
      method: "get",
      path: "/operations/:id",
      summary: "An operation's state, current step and audit trail",
      params: OperationParams,
      responses: {
        200: { description: "The operation", schema: Any },
        404: { description: "Unknown operation" },
      },
    },
    ({ params }, c) =>
      guard(async () => {
        const found = await findOperation(rt.sites, { id: params.id });
        if (!found) {
          throw new HttpError(404, "not_found", "No operation with that id on a reachable site.");
        }
        return c.json(operationBody(found.op, await found.store.steps(found.op.id)));
      }),
  );
  app.route(
    {
      method: "post",
      path: "/operations/:id/resume",
      summary:
        "Resume an operation whose driver died (or that failed closed) from its current step",
      params: OperationParams,
      responses: {
        202: { description: "Resumed", schema: Any },
        200: { description: "Already finished", schema: Any },
        404: { description: "Unknown operation" },
        409: { description: "Another invocation drives it" },
      },
    },
    ({ params }, c) =>
      guard(async () => {
        const found = await findOperation(rt.sites, { id: params.id });
        if (!found) {
          throw new HttpError(404, "not_found", "No operation with that id on a reachable site.");
        }
        return await resumeOrReport(c, found.store, found.op);
      }),
  );
  app.route(
    {
      method: "post",
      path: "/operations/:id/abandon",
      summary:
        "Close an operation nobody drives (lease expired, or failed closed) without resuming it; undoes nothing",
      params: OperationParams,
      body: AbandonBody,
      responses: {
        200: { description: "Abandoned", schema: Any },
        404: { description: "Unknown operation" },
        409: { description: "It is being driven, or has already ended" },
      },
    },
    ({ params, body }, c) =>
      guard(async () => {
        const found = await findOperation(rt.sites, { id: params.id });
        if (!found) {
          throw new HttpError(404, "not_found", "No operation with that id on a reachable site.");
        }
        const done = await found.store.abandon(
          params.id,
          `abandoned by an operator${body.reason ? `: ${body.reason}` : ""}`,
        );
        if (!done) {
          throw new HttpError(
            409,
            "not_abandonable",
            `Operation ${params.id} is ${found.op.state}${
              found.op.state === "running" && !found.op.leaseExpired ? " and driven" : ""
            }: only an undriven running or failed_closed operation can be abandoned.`,
          );
        }
        return c.json(operationBody(done, await found.store.steps(done.id)));
      }),
  );
  app.route(
    {
      method: "post",
      path: "/lease",
      summary:
        "Renew the calling primary's write lease (HA_LEASE_TOKEN; called by ha.lease_tick() of the other region)",
      auth: false,
      authorize: (c) => requireLeaseToken(c, config),
      body: LeaseBody,
      responses: {
        200: { description: "Granted (or the lease is off)", schema: Any },
        409: {
          description: "Refused: not the primary at the current epoch (a stale one is fenced)",
        },
        503: { description: "A site is unreachable, or HA_LEASE_TOKEN is not configured" },
      },
    },
    ({ body }, c) =>
      guard(async () => c.json(await renewLease(rt, body.site, body.epoch, c.get("log")))),
  );
  app.route(
    {
      method: "get",
      path: "/checks",
      summary: "Evaluate every guardrail of a mode without changing anything",
      query: ChecksQuery,
      responses: { 200: { description: "Guardrails", schema: Any } },
    },
    ({ query }, c) =>
      guard(async () => {
        const kind: OperationKind = query.mode === "planned" ? "switchover" : query.mode;
        const p = await plan(rt, kind, limits, c.get("log"));
        return c.json({
          ok: p.ok,
          kind,
          source: p.source,
          target: p.target,
          epoch_from: p.epochFrom,
          epoch_to: p.epochTo,
          checks: p.checks,
        });
      }),
  );
  app.route(
    {
      method: "post",
      path: "/setup",
      summary: "Create (or complete) the control rows, publication, subscription and route",
      body: SetupBody,
      responses: {
        200: { description: "What was (or would be) done", schema: Any },
        412: { description: "Schemas differ or the standby has rows" },
      },
    },
    ({ body }, c) =>
      guard(async () =>
        c.json(
          await setupReplication(rt, {
            dryRun: body.dry_run,
            copyData: body.copy_data,
            schemas: body.schemas,
            extraTables: body.extra_tables,
            lease: body.lease === false
              ? { ttlSeconds: null, renewSeconds: DEFAULT_LEASE.renewSeconds }
              : body.lease
              ? { ttlSeconds: body.lease.ttl_seconds, renewSeconds: body.lease.renew_seconds }
              : undefined,
            leaseRenewal: body.lease_renewal,
          }),
        )
      ),
  );
  app.route(
    {
      method: "post",
      path: "/rejoin",
      summary:
        "Rebuild a fenced site as the standby of the current primary (discards its unreplicated rows)",
      body: RejoinBody,
      responses: {
        200: {
          description: "What was done; the initial copy then runs in the background",
          schema: Any,
        },
        412: { description: "No healthy primary, or the site is the primary / routed" },
      },
    },
    ({ body }, c) =>
      guard(async () => {
        const running = await runningOperation(rt.sites);
        if (running) {
          throw new HttpError(409, "operation_in_progress", "A failover operation is running.", {
            operation_id: running.id,
          });
        }
        return c.json(await rejoinAsStandby(rt, body.site));
      }),
  );
  app.route(
    {
      method: "get",
      path: "/verify",
      summary: "Row counts and sampled checksums of every published table on both sites",
      responses: { 200: { description: "Per-table comparison", schema: Any } },
    },
    (_input, c) =>
      guard(async () => {
        const obs = await rt.observe(2500);
        const from = obs.topology.primary;
        if (!from) throw new HttpError(503, "no_primary", "No healthy primary to compare from.");
        const tables = await verifyData(rt, from);
        return c.json({ primary: from, match: tables.every((t) => t.match), tables });
      }),
  );
  app.route(
    {
      method: "get",
      path: "/active",
      summary:
        "Which site is primary now, its epoch and the project URL apps should use (FAILOVER_TOKEN or HEALTH_TOKEN)",
      auth: false,
      authorize: (c) => requireEitherToken(c, config),
      responses: {
        200: { description: "The active site", schema: Any },
        503: { description: "No healthy primary" },
      },
    },
    async (_input, c) => {
      rt.requireSites();
      // Shared like the probes: applications poll this, and it changes nothing.
      const obs = await rt.observeShared(2000);
      const primary = obs.topology.primary;
      const urls = {
        primary: config.primarySupabaseUrl ?? null,
        standby: config.standbySupabaseUrl ?? null,
      };
      c.header("cache-control", "no-store");
      return c.json({
        primary,
        epoch: obs.epoch,
        supabase_url: primary ? urls[primary] : null,
        pgbouncer_routes_to: obs.routedSite,
        pgbouncer_paused: obs.route?.paused ?? null,
        ...(primary
          ? {}
          : { reason: "no healthy primary right now (a failover may be in progress)" }),
      }, primary ? 200 : 503);
    },
  );
  return app;
}

/** POST /failover/lease opens only with HA_LEASE_TOKEN (the one secret stored in the databases). */
async function requireLeaseToken(c: AppContext, config: FailoverConfig): Promise<void> {
  if (!isUsableToken(config.leaseToken)) {
    throw new HttpError(503, "not_configured", "This route is not configured: set HA_LEASE_TOKEN.");
  }
  const presented = bearerToken(c.req.header("authorization"));
  if (presented === undefined || !(await constantTimeEqual(presented, config.leaseToken))) {
    throw new HttpError(401, "unauthorized", "A valid bearer token is required.", undefined, {
      "WWW-Authenticate": 'Bearer realm="sa-toolkit"',
    });
  }
}

/** /failover/active is read-only: the failover token or the (read-only) health token opens it. */
async function requireEitherToken(c: AppContext, config: FailoverConfig): Promise<void> {
  const tokens = [config.failoverToken, config.healthToken].filter(isUsableToken);
  if (tokens.length === 0) {
    throw new HttpError(
      503,
      "not_configured",
      "This function is not configured: set FAILOVER_TOKEN.",
    );
  }
  const presented = bearerToken(c.req.header("authorization"));
  let ok = false;
  for (const t of tokens) {
    if (presented !== undefined && (await constantTimeEqual(presented, t))) ok = true;
  }
  if (!ok) {
    throw new HttpError(401, "unauthorized", "A valid bearer token is required.", undefined, {
      "WWW-Authenticate": 'Bearer realm="sa-toolkit"',
    });
  }
}
