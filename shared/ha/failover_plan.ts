/**
 * Planning a failover: who is source and target, which epochs, and every guardrail, evaluated
 * against an observation of both sites and the router. Planning changes nothing.
 */
import type { Sql } from "../db/mod.ts";
import type { Logger } from "../http/logger.ts";
import { guardGaps } from "./fence.ts";
import { type OperationKind, OperationStore } from "./operations.ts";
import {
  isToolkitTable,
  publicationMembers,
  publicationTables,
  replicaIdentityProblems,
  sameTable,
  scopeTables,
  slotStatus,
  subscribedTables,
  subscriptionStatus,
  tableLabel,
  type TableRef,
} from "./replication.ts";
import type { HaRuntime, Observation } from "./runtime.ts";
import { schemaDrift, storedScope } from "./setup.ts";
import type { SiteName } from "./sites.ts";
import { probeError } from "./state.ts";

export interface Limits {
  /** Guardrail: the largest replication lag a planned switchover starts with. */
  maxLagBytes: number;
  /** wait_lag: the lag to reach before pausing, and how long to wait for it. */
  lowLagBytes: number;
  lagWaitMs: number;
  pauseTimeoutMs: number;
  /** Emergency: how long PAUSE may wait for connections stuck on the dead primary. */
  emergencyPauseTimeoutMs: number;
  freezeTimeoutMs: number;
  markerTimeoutMs: number;
  /** Added above the largest used value when sequences are set on the new primary. */
  sequenceMargin: number;
  prebumpMargin: number;
  emergencySequenceMargin: number;
  /** Schemas whose sequences follow the primary. */
  sequenceSchemas: string[];
  /** Emergency: the longest wait for the old primary's last lease to run out. */
  leaseWaitMs: number;
}

export const DEFAULT_LIMITS: Limits = {
  maxLagBytes: 16 * 1024 * 1024,
  lowLagBytes: 1024 * 1024,
  lagWaitMs: 30_000,
  pauseTimeoutMs: 10_000,
  emergencyPauseTimeoutMs: 15_000,
  freezeTimeoutMs: 10_000,
  markerTimeoutMs: 30_000,
  sequenceMargin: 1_000,
  prebumpMargin: 100_000,
  emergencySequenceMargin: 1_000_000,
  sequenceSchemas: ["public"],
  leaseWaitMs: 120_000,
};

export interface Check {
  name: string;
  ok: boolean;
  detail: string;
}

export interface Plan {
  kind: OperationKind;
  source: SiteName | null;
  target: SiteName | null;
  epochFrom: number | null;
  epochTo: number | null;
  checks: Check[];
  ok: boolean;
}

async function privileges(sql: Sql) {
  const [r] = await sql`
    select r.rolsuper as superuser,
           r.rolsuper or d.datdba = r.oid as can_alter_database,
           r.rolsuper or exists (select 1 from pg_roles g where g.rolname = 'pg_create_subscription'
                                   and pg_has_role(r.oid, g.oid, 'member')) as can_subscribe,
           r.rolsuper or r.rolreplication as can_replicate
    from pg_roles r, pg_database d
    where r.rolname = current_user and d.datname = current_database()`;
  return r;
}

/**
 * Works out source/target/epochs and evaluates every guardrail; changes nothing. Pass `obs` to
 * plan against an observation already made (a POST route that fenced a stale primary first).
 */
export async function plan(
  rt: HaRuntime,
  kind: OperationKind,
  limits: Limits,
  _log?: Logger,
  observed?: Observation,
): Promise<Plan> {
  const obs = observed ?? await rt.observe(2500);
  const checks: Check[] = [];
  const add = (name: string, ok: boolean, detail: string) => checks.push({ name, ok, detail });
  const topo = obs.topology;
  let source: SiteName | null = null;
  let target: SiteName | null = null;

  add(
    "router_reachable",
    !!obs.route,
    obs.route
      ? `PgBouncer (${rt.router().kind} router) answers`
      : `PgBouncer cannot be read: ${obs.routeError}`,
  );

  if (kind === "emergency") {
    target = topo.standby;
    source = target ? rt.sites.other(target) : null;
    const tv = target ? topo.sites[target] : undefined;
    add(
      "standby_ready",
      !!tv?.reachable && tv.state?.role === "standby" && !tv.state.fenced &&
        tv.state.epoch === obs.epoch,
      tv?.reachable
        ? `site ${target} is ${tv.state?.role ?? "uninitialised"} at epoch ${
          tv.state?.epoch ?? "?"
        } (newest ${obs.epoch})`
        : "no reachable standby at the newest epoch",
    );
    const sv = source ? topo.sites[source] : undefined;
    add(
      "primary_unreachable",
      !!sv && !sv.reachable,
      !sv
        ? "no primary site known"
        : sv.reachable
        ? `site ${source} is reachable: use mode "planned", which loses nothing`
        : `site ${source} is unreachable (${sv.error})`,
    );
    if (obs.route && source) {
      add(
        "router_routes_to_primary",
        obs.routedSite === source || obs.routedSite === target,
        `PgBouncer routes to ${obs.routedSite ?? "nothing"}`,
      );
    }
  } else {
    source = topo.primary;
    target = source ? rt.sites.other(source) : null;
    add(
      "primary_healthy",
      !!source,
      source
        ? `site ${source} is primary at epoch ${obs.epoch}`
        : "no healthy primary at the newest epoch",
    );
    if (kind === "failback") {
      add(
        "away_from_home",
        source === "standby",
        source === "standby"
          ? "the primary role is on site standby; failback moves it to site primary"
          : "the primary role is already on site primary",
      );
    }
    const tv = target ? topo.sites[target] : undefined;
    add(
      "standby_ready",
      !!tv?.reachable && tv.state?.role === "standby" && !tv.state.fenced,
      tv?.reachable
        ? `site ${target} is ${tv.state?.role ?? "uninitialised"}${
          tv.state?.fenced ? " (fenced)" : ""
        }`
        : `site ${target ?? "?"} is unreachable`,
    );
    if (obs.route) {
      add(
        "router_routes_to_primary",
        !!source && obs.routedSite === source && !obs.route.paused && !obs.route.disabled &&
          (obs.route.epoch === null || obs.route.epoch === obs.epoch),
        `PgBouncer routes to ${obs.routedSite ?? "nothing"}${obs.route.paused ? " (paused)" : ""}${
          obs.route.disabled ? " (disabled)" : ""
        } at epoch ${obs.route.epoch ?? "none"}`,
      );
    }
    if (source && target && tv?.reachable) {
      await plannedChecks(rt, source, target, limits, add).catch((e) =>
        add("inspection", false, `could not inspect the sites: ${probeError(e)}`)
      );
    }
  }
  if (target && topo.sites[target].reachable) {
    // A failed-closed operation counts: it must be resumed or abandoned before another starts
    // (it may still promote, and an emergency one stops the lease grants).
    const open = await Promise.all(
      (source && topo.sites[source].reachable ? [target, source] : [target]).map((site) =>
        new OperationStore(rt.sites.get(site).ops, site).unfinished().catch(() => undefined)
      ),
    );
    const running = open.find((o) => o);
    add(
      "no_running_operation",
      !running,
      running
        ? `operation ${running.id} is ${running.state}${
          running.state === "failed_closed" ? ": resume or abandon it first" : ""
        }`
        : "no operation is running or failed closed",
    );
    const priv = await privileges(rt.sites.get(target).ops).catch(() => undefined);
    add(
      "target_privileges",
      !!priv?.can_alter_database,
      priv?.can_alter_database
        ? "the target's role can change database defaults"
        : "the target's role must own the database (or be superuser) to lift the read-only default",
    );
  }
  const epochFrom = obs.epoch;
  return {
    kind,
    source,
    target,
    epochFrom,
    epochTo: epochFrom === null ? null : epochFrom + 1,
    checks,
    ok: checks.every((c) => c.ok) && !!source && !!target && epochFrom !== null,
  };
}

async function plannedChecks(
  rt: HaRuntime,
  source: SiteName,
  target: SiteName,
  limits: Limits,
  add: (name: string, ok: boolean, detail: string) => void,
): Promise<void> {
  const src = rt.sites.get(source).ops;
  const tgt = rt.sites.get(target).ops;
  const sub = await subscriptionStatus(tgt);
  const subOk = sub.exists && sub.enabled && sub.workerRunning && (sub.tablesNotReady ?? 0) === 0;
  add(
    "subscription_healthy",
    !!subOk,
    !sub.exists
      ? `no subscription on site ${target}`
      : `enabled=${sub.enabled}, worker=${
        sub.workerRunning ? "running" : "stopped"
      }, tables not ready=${sub.tablesNotReady}, apply errors=${sub.applyErrors}`,
  );
  if (sub.exists && sub.slotName) {
    const slot = await slotStatus(src, sub.slotName);
    const lag = slot.lagBytes ?? null;
    add(
      "lag_under_threshold",
      slot.exists && lag !== null && lag <= limits.maxLagBytes,
      slot.exists
        ? `lag ${lag} bytes (limit ${limits.maxLagBytes})`
        : `slot ${sub.slotName} is missing on site ${source}`,
    );
  }
  const published = await publicationTables(src);
  const tables = published.filter((t) => !isToolkitTable(t));
  const hasMarkers = published.some((t) => t.schema === "ha" && t.name === "markers");
  add(
    "markers_published",
    hasMarkers,
    hasMarkers ? "ha.markers is published" : "ha.markers is not in the publication: re-run setup",
  );
  const drift = await schemaDrift(src, tgt, tables);
  add(
    "schema_equal",
    drift.length === 0,
    drift.length
      ? `schema differs for: ${drift.join(", ")}`
      : `${tables.length} published tables have the same shape`,
  );
  await fenceChecks(src, tgt, source, target, await publicationMembers(src), add);
  const identity = await replicaIdentityProblems(src);
  add(
    "replica_identity",
    identity.length === 0,
    identity.length
      ? `cannot replicate updates/deletes of: ${identity.map((i) => i.table).join(", ")}`
      : "every published table has a replica identity",
  );
  await replicationChecks(src, tgt, add);
  const [ps, ts] = await Promise.all([privileges(src), privileges(tgt)]);
  add(
    "source_privileges",
    !!ps.can_alter_database && !!ps.can_subscribe,
    `freeze (own the database): ${ps.can_alter_database}; reverse subscription (superuser or pg_create_subscription): ${ps.can_subscribe}`,
  );
  add(
    "target_can_subscribe",
    !!ts.can_subscribe && !!ts.can_replicate,
    `rollback subscription: ${ts.can_subscribe}; replication: ${ts.can_replicate}`,
  );
}

/**
 * `fence_complete`: every table of the replication scope is published and carries a working
 * guard on both sites. A table created after setup is named, so a switchover never leaves one
 * writable on a fenced site.
 */
async function fenceChecks(
  src: Sql,
  tgt: Sql,
  source: SiteName,
  target: SiteName,
  published: TableRef[],
  add: (name: string, ok: boolean, detail: string) => void,
): Promise<void> {
  const scope = await scopeTables(src, await storedScope(src));
  const unpublished = scope.filter((t) => !published.some((p) => sameTable(p, t)));
  const [gs, gt] = await Promise.all([guardGaps(src, scope), guardGaps(tgt, scope)]);
  const problems = [
    ...unpublished.map((t) => `${tableLabel(t)}: not published (created after setup?)`),
    ...gs.map((g) => `${g.table} on site ${source}: ${g.problem}`),
    ...gt.map((g) => `${g.table} on site ${target}: ${g.problem}`),
  ];
  add(
    "fence_complete",
    problems.length === 0,
    problems.length
      ? `${problems.slice(0, 20).join("; ")}${
        problems.length > 20 ? ` (+${problems.length - 20} more)` : ""
      } — re-run POST /failover/setup`
      : `all ${scope.length} tables of the scope are published and guarded on both sites`,
  );
}

/**
 * `subscription_covers_publication`: every table the source publishes is replicating on the
 * target (a table added to the publication is only applied after the subscription is refreshed,
 * which setup does); `no_two_phase_commit`: prepared transactions are off on both sites, because a
 * prepared transaction can be committed later with no check at all (COMMIT PREPARED runs no
 * trigger), on a site that was fenced meanwhile.
 */
async function replicationChecks(
  src: Sql,
  tgt: Sql,
  add: (name: string, ok: boolean, detail: string) => void,
): Promise<void> {
  const [published, subscribed] = await Promise.all([
    publicationTables(src),
    subscribedTables(tgt),
  ]);
  const missing = published.filter((p) =>
    !subscribed.some((s) => s.schema === p.schema && s.name === p.name)
  );
  add(
    "subscription_covers_publication",
    missing.length === 0,
    missing.length
      ? `not replicating yet: ${
        missing.slice(0, 20).map(tableLabel).join(", ")
      } — re-run POST /failover/setup (it refreshes the subscription)`
      : `all ${published.length} published tables replicate`,
  );
  const settings = await Promise.all([src, tgt].map(async (sql) => {
    const [r] = await sql`select current_setting('max_prepared_transactions')::int as n`;
    return Number(r.n);
  }));
  add(
    "no_two_phase_commit",
    settings.every((n) => n === 0),
    settings.every((n) => n === 0)
      ? "max_prepared_transactions is 0 on both sites"
      : `max_prepared_transactions is ${
        settings.join(" / ")
      }: a prepared transaction can commit on a fenced site; set it to 0`,
  );
}
