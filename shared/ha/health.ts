/**
 * The probes behind the `health` function. Each returns whether the thing is healthy and a
 * Patroni-style body (role, state, epoch, lag, reason). Bodies name sites ("primary", "standby"
 * as configured), never hosts or connection strings. Every dependency is read under a hard
 * deadline, so a dead one yields `healthy: false` with a reason instead of a hang. Probes change
 * nothing, and read through the runtime's shared cache (`rt.shared`, about 1 s): monitors polling
 * a thousand times a second cost the databases what one poll does.
 */
import type { Logger } from "../http/logger.ts";
import { withDeadline } from "./deadline.ts";
import { type GuardGap } from "./fence.ts";
import {
  type Heartbeat,
  heartbeatOf,
  publicationTables,
  type SlotStatus,
  slotStatus,
  subscribedTables,
  type SubscriptionStatus,
  subscriptionStatus,
  tableLabel,
} from "./replication.ts";
import { siteGuardGaps } from "./setup.ts";
import type { HaRuntime, Observation } from "./runtime.ts";
import type { SiteName } from "./sites.ts";
import { probeError, type SiteView } from "./state.ts";

export interface ProbeResult {
  healthy: boolean;
  body: Record<string, unknown>;
}

export const PROBE_DEADLINE_MS = 1800;

function siteSummary(v: SiteView): Record<string, unknown> {
  return {
    site: v.name,
    state: v.reachable ? "running" : "unreachable",
    role: v.state?.role ?? "unknown",
    epoch: v.state?.epoch ?? null,
    fenced: v.state?.fenced ?? false,
    writable: v.fence?.writable ?? null,
    ...(v.fence && !v.fence.writable && v.fence.reason ? { write_refused: v.fence.reason } : {}),
    ...(v.fence?.leaseUntil ? { lease_until: v.fence.leaseUntil } : {}),
    in_recovery: v.inRecovery ?? null,
    read_only: v.readOnlyDefault ?? null,
    ...(v.error ? { error: v.error } : {}),
  };
}

/** Shared, deadline-bounded reads of one site (see the module comment). */
function sharedRead<T>(
  rt: HaRuntime,
  key: string,
  site: SiteName,
  read: () => Promise<T>,
): Promise<T> {
  return rt.shared.get(
    `${key}:${site}`,
    () => withDeadline(read(), PROBE_DEADLINE_MS, `site ${site}`),
  );
}

const readSubscription = (rt: HaRuntime, site: SiteName): Promise<SubscriptionStatus> =>
  sharedRead(rt, "subscription", site, () => subscriptionStatus(rt.sites.get(site).probe));
const readSlot = (rt: HaRuntime, site: SiteName, slot: string): Promise<SlotStatus> =>
  sharedRead(rt, `slot:${slot}`, site, () => slotStatus(rt.sites.get(site).probe, slot));
const readHeartbeat = (
  rt: HaRuntime,
  site: SiteName,
  of: SiteName,
): Promise<Heartbeat | undefined> =>
  sharedRead(rt, `heartbeat:${of}`, site, () => heartbeatOf(rt.sites.get(site).probe, of));
const readGuardGaps = (rt: HaRuntime, site: SiteName): Promise<GuardGap[]> =>
  sharedRead(rt, "guard_gaps", site, () => siteGuardGaps(rt.sites.get(site).probe));

/** Tables the publisher publishes that the subscriber's subscription does not list. */
const readUnsubscribed = (rt: HaRuntime, publisher: SiteName, subscriber: SiteName) =>
  rt.shared.get(`unsubscribed:${publisher}`, () =>
    withDeadline(
      (async () => {
        const [published, subscribed] = await Promise.all([
          publicationTables(rt.sites.get(publisher).probe),
          subscribedTables(rt.sites.get(subscriber).probe),
        ]);
        return published.filter((p) =>
          !subscribed.some((s) => s.schema === p.schema && s.name === p.name)
        ).map(tableLabel);
      })(),
      PROBE_DEADLINE_MS,
      `site ${publisher}`,
    ));

function gapsReason(site: SiteName, gaps: GuardGap[]): string {
  const shown = gaps.slice(0, 5).map((g) => `${g.table} (${g.problem})`).join(", ");
  return `site ${site} has ${gaps.length} replicated table(s) without a working write guard: ${shown}${
    gaps.length > 5 ? ", …" : ""
  } — re-run POST /failover/setup`;
}

/** No site holds the role the probe asks about. */
function unavailable(
  base: Record<string, unknown>,
  reason: string,
  extra: Record<string, unknown> = {},
): ProbeResult {
  return {
    healthy: false,
    body: { ...base, role: "unknown", state: "unavailable", reason, ...extra },
  };
}

function pickSite(
  obs: Observation,
  requested: SiteName | undefined,
  role: "primary" | "standby",
): SiteName | null {
  if (requested) return requested;
  return role === "primary" ? obs.topology.primary : obs.topology.standby;
}

/** Config loaded and at least one site's control row readable. */
export async function readiness(rt: HaRuntime, problems: string[]): Promise<ProbeResult> {
  if (problems.length) {
    return {
      healthy: false,
      body: {
        probe: "readiness",
        state: "not_configured",
        reason: `missing configuration: ${problems.join(", ")}`,
      },
    };
  }
  const obs = await rt.observeShared(PROBE_DEADLINE_MS);
  const views = Object.values(obs.topology.sites);
  const readable = views.filter((v) => v.state);
  const healthy = readable.length > 0;
  return {
    healthy,
    body: {
      probe: "readiness",
      state: healthy ? "running" : "unavailable",
      epoch: obs.epoch,
      sites: views.map(siteSummary),
      ...(healthy ? {} : { reason: "no site's control state (ha.state) is readable" }),
    },
  };
}

/**
 * The site is the writable primary: reachable, not in recovery, not read-only by default, role
 * primary at the newest epoch (sites and router agree), its write guard lifted (the token is its
 * own and its lease is running) and present on every replicated table. A site whose guard is
 * lifted although another holds the newest epoch is reported as lifted out of turn.
 */
export async function primary(
  rt: HaRuntime,
  site: SiteName | undefined,
  _log?: Logger,
): Promise<ProbeResult> {
  const obs = await rt.observeShared(PROBE_DEADLINE_MS);
  const name = pickSite(obs, site, "primary");
  const base = { probe: "primary", epoch: obs.epoch };
  if (!name) {
    return unavailable(base, noPrimaryReason(obs), {
      sites: Object.values(obs.topology.sites).map(siteSummary),
    });
  }
  const v = obs.topology.sites[name];
  const body = { ...base, ...siteSummary(v) };
  const outOfTurn = v.fence?.writable && obs.topology.primary !== name;
  let reason = !v.reachable
    ? `site ${name} is unreachable (${v.error})`
    : !v.state
    ? `site ${name} has no ha.state row (run the setup)`
    : outOfTurn
    ? `site ${name} accepts writes out of turn: it is not the primary at epoch ${obs.epoch}`
    : v.state.fenced
    ? `site ${name} is fenced (${v.state.fencedReason ?? "no reason recorded"})`
    : v.inRecovery
    ? `site ${name} is in recovery`
    : v.state.role !== "primary"
    ? `site ${name} has role ${v.state.role}`
    : v.fence && !v.fence.writable
    ? `site ${name} refuses writes: ${v.fence.reason}`
    : v.readOnlyDefault
    ? `site ${name} is read-only by default (frozen)`
    : obs.epoch !== null && v.state.epoch < obs.epoch
    ? `site ${name} holds epoch ${v.state.epoch} but the newest is ${obs.epoch}`
    : obs.route?.target && obs.routedSite !== name
    ? `PgBouncer routes to ${obs.routedSite}, not to site ${name}`
    : undefined;
  if (!reason) {
    const gaps = await readGuardGaps(rt, name).catch((e) => e as Error);
    if (gaps instanceof Error) reason = `site ${name}: ${probeError(gaps)}`;
    else if (gaps.length) reason = gapsReason(name, gaps);
  }
  return { healthy: reason === undefined, body: reason ? { ...body, reason } : body };
}

function noPrimaryReason(obs: Observation): string {
  const views = Object.values(obs.topology.sites);
  if (views.every((v) => !v.reachable)) return "no site is reachable";
  const p = views.find((v) => v.state?.role === "primary");
  if (!p) return "no reachable site holds the primary role";
  return `site ${p.name} claims primary but is not the healthy primary at epoch ${obs.epoch}`;
}

export interface StandbyLimits {
  lagBytes: number;
  maxStalenessSeconds: number;
}

/** Apply-error counts seen per site, so a probe can tell new errors from old ones. */
const seenApplyErrors = new Map<string, { count: number; changedAt: number }>();
const APPLY_ERROR_WINDOW_MS = 5 * 60_000;

function newApplyErrors(site: SiteName, count: number): boolean {
  const prev = seenApplyErrors.get(site);
  const now = Date.now();
  if (!prev) {
    seenApplyErrors.set(site, { count, changedAt: 0 });
    return false;
  }
  if (count > prev.count) {
    seenApplyErrors.set(site, { count, changedAt: now });
    return true;
  }
  if (count < prev.count) seenApplyErrors.set(site, { count, changedAt: 0 });
  return prev.changedAt > 0 && now - prev.changedAt < APPLY_ERROR_WINDOW_MS;
}

/**
 * The site is a standby that applies: subscription enabled, apply worker running, tables synced,
 * no new apply errors, and lag within the bound — in bytes against the primary's current WAL
 * position when the primary is reachable, otherwise by seconds since the last message received.
 */
export async function standby(
  rt: HaRuntime,
  site: SiteName | undefined,
  limits: StandbyLimits,
  _log?: Logger,
): Promise<ProbeResult> {
  const obs = await rt.observeShared(PROBE_DEADLINE_MS);
  const name = pickSite(obs, site, "standby");
  const base = {
    probe: "standby",
    epoch: obs.epoch,
    limits: { lag_bytes: limits.lagBytes, max_staleness_seconds: limits.maxStalenessSeconds },
  };
  if (!name) return unavailable(base, "no site holds the standby role at the current epoch");
  const v = obs.topology.sites[name];
  const body: Record<string, unknown> = { ...base, ...siteSummary(v) };
  const fail = (reason: string): ProbeResult => ({ healthy: false, body: { ...body, reason } });
  if (!v.reachable) return fail(`site ${name} is unreachable (${v.error})`);
  if (!v.state) return fail(`site ${name} has no ha.state row (run the setup)`);
  if (v.state.fenced) {
    return fail(`site ${name} is fenced (${v.state.fencedReason ?? "no reason recorded"})`);
  }
  if (v.state.role !== "standby") return fail(`site ${name} has role ${v.state.role}`);
  if (v.fence?.writable) {
    return fail(`site ${name} accepts application writes: its fence is lifted`);
  }

  let sub: SubscriptionStatus;
  let gaps: GuardGap[];
  try {
    [sub, gaps] = await Promise.all([readSubscription(rt, name), readGuardGaps(rt, name)]);
  } catch (e) {
    return fail(`site ${name}: ${probeError(e)}`);
  }
  if (gaps.length) return fail(gapsReason(name, gaps));
  body.subscription = subscriptionBody(sub);
  if (!sub.exists) return fail("the subscription does not exist");
  if (!sub.enabled) return fail("the subscription is disabled");
  if ((sub.tablesNotReady ?? 0) > 0) {
    return fail(`${sub.tablesNotReady} table(s) still in initial sync`);
  }
  const publisher = rt.sites.other(name);
  const pv = obs.topology.sites[publisher];
  // With the publisher down the worker cannot run and its connection errors count as apply
  // errors; then only the age of what the standby holds matters.
  const errorsNow = newApplyErrors(name, sub.applyErrors ?? 0);
  if (pv.reachable) {
    if (!sub.workerRunning) return fail("the apply worker is not running");
    if (errorsNow) return fail("the apply worker reported new errors in the last 5 minutes");
  }
  let slot: SlotStatus | undefined;
  if (pv.reachable && sub.slotName) {
    slot = await readSlot(rt, publisher, sub.slotName).catch(() => undefined);
  }
  if (pv.reachable) {
    // A table the publisher publishes but this subscription does not apply (added without a
    // refresh) would be lost at a switchover.
    const missing = await readUnsubscribed(rt, publisher, name).catch(() => undefined);
    if (missing?.length) {
      return fail(
        `${missing.length} published table(s) do not replicate: ${missing.slice(0, 5).join(", ")}${
          missing.length > 5 ? ", …" : ""
        } — re-run POST /failover/setup`,
      );
    }
  }
  if (slot?.exists && slot.lagBytes !== null && slot.lagBytes !== undefined) {
    body.lag = { measured: "bytes", bytes: slot.lagBytes, seconds: slot.replayLagSeconds ?? null };
    if (slot.lagBytes > limits.lagBytes) {
      return fail(`lag ${slot.lagBytes} bytes exceeds ${limits.lagBytes}`);
    }
  } else {
    // The primary cannot be asked: judge by the newest heartbeat the standby has applied (a bound
    // on what it has), or by the last message from the publisher.
    const beat = await readHeartbeat(rt, name, publisher).catch(() => undefined);
    const stale = beat?.ageSeconds ?? sub.secondsSinceMessage;
    body.lag = {
      measured: beat ? "heartbeat" : "staleness",
      seconds_since_heartbeat: beat?.ageSeconds ?? null,
      seconds_since_message: sub.secondsSinceMessage ?? null,
    };
    if (stale === null || stale === undefined) {
      return fail("nothing received from the publisher yet");
    }
    if (stale > limits.maxStalenessSeconds) {
      return fail(
        `newest data from the publisher is ${stale} s old, over ${limits.maxStalenessSeconds} s`,
      );
    }
  }
  return { healthy: true, body };
}

function subscriptionBody(sub: SubscriptionStatus): Record<string, unknown> {
  if (!sub.exists) return { exists: false };
  return {
    exists: true,
    enabled: sub.enabled,
    worker_running: sub.workerRunning,
    tables_not_ready: sub.tablesNotReady,
    apply_errors: sub.applyErrors,
    sync_errors: sub.syncErrors,
    seconds_since_message: sub.secondsSinceMessage,
    last_message_at: sub.lastMessageAt,
  };
}

/** Always healthy: metrics for graphs, per direction of replication that exists. */
export async function replication(rt: HaRuntime, _log?: Logger): Promise<ProbeResult> {
  const obs = await rt.observeShared(PROBE_DEADLINE_MS);
  const streams: Record<string, unknown>[] = [];
  for (const subscriber of ["primary", "standby"] as SiteName[]) {
    const sv = obs.topology.sites[subscriber];
    if (!sv.reachable) continue;
    const sub = await readSubscription(rt, subscriber).catch(() => undefined);
    if (!sub?.exists) continue;
    const publisher = rt.sites.other(subscriber);
    const slot = obs.topology.sites[publisher].reachable && sub.slotName
      ? await readSlot(rt, publisher, sub.slotName).catch(() => undefined)
      : undefined;
    streams.push({
      publisher,
      subscriber,
      subscription: subscriptionBody(sub),
      lag_bytes: slot?.lagBytes ?? null,
      lag_seconds: slot?.replayLagSeconds ?? null,
      slot: slot?.exists
        ? { active: slot.active, wal_status: slot.walStatus, retained_bytes: slot.retainedBytes }
        : { exists: slot ? false : null },
    });
  }
  return {
    healthy: true,
    body: {
      probe: "replication",
      epoch: obs.epoch,
      primary: obs.topology.primary,
      sites: Object.values(obs.topology.sites).map(siteSummary),
      streams,
      pgbouncer: obs.route ? routeBody(obs) : { error: obs.routeError },
    },
  };
}

function routeBody(obs: Observation): Record<string, unknown> {
  return {
    paused: obs.route?.paused ?? null,
    disabled: obs.route?.disabled ?? null,
    epoch: obs.route?.epoch ?? null,
    routes_to: obs.routedSite,
  };
}

/** PgBouncer answers, the routed database is not paused or disabled, and it points at the primary. */
export async function pgbouncer(rt: HaRuntime, _log?: Logger): Promise<ProbeResult> {
  const obs = await rt.observeShared(PROBE_DEADLINE_MS);
  const base = { probe: "pgbouncer", epoch: obs.epoch, primary: obs.topology.primary };
  if (!obs.route) {
    return {
      healthy: false,
      body: { ...base, state: "unreachable", reason: `PgBouncer admin console: ${obs.routeError}` },
    };
  }
  const body = { ...base, state: "running", ...routeBody(obs) };
  const routed = obs.routedSite;
  const reason = obs.route.disabled
    ? "the routed database is disabled"
    : obs.route.paused
    ? "the routed database is paused"
    : !obs.topology.primary
    ? "no healthy primary to compare the route with"
    : routed !== obs.topology.primary
    ? `PgBouncer routes to ${routed ?? "nothing"} but the primary is ${obs.topology.primary}`
    : obs.route.epoch !== null && obs.epoch !== null && obs.route.epoch < obs.epoch
    ? `PgBouncer's route carries epoch ${obs.route.epoch}, older than ${obs.epoch}`
    : undefined;
  return { healthy: reason === undefined, body: reason ? { ...body, reason } : body };
}
