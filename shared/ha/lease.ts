/**
 * The primary's write lease (supabase/migrations/20261203100200_ha_write_lease.sql), granted by
 * the failover function of the other region. A grant is recorded on the granting site first and
 * only then extends the primary's lease, so the granting site always knows the latest instant the
 * primary may still accept a write; an emergency failover waits for that instant (plus a margin)
 * before it promotes.
 */
import type { Sql } from "../db/mod.ts";
import type { Logger } from "../http/logger.ts";
import { HttpError } from "../http/errors.ts";
import { withDeadline } from "./deadline.ts";
import { endClientSessions, setFence } from "./fence.ts";
import type { HaRuntime } from "./runtime.ts";
import type { SiteName } from "./sites.ts";
import { readControlState } from "./state.ts";

export interface LeaseSettings {
  /** Lease length; null turns the lease off. */
  ttlSeconds: number | null;
  /** How often the primary asks for a renewal (pg_cron, or an external scheduler). */
  renewSeconds: number;
}

export const DEFAULT_LEASE: LeaseSettings = { ttlSeconds: 30, renewSeconds: 5 };

/**
 * The longest time a granter allows between recording a grant and extending the primary's
 * lease; the recorded grant covers it, and a slower extension is rolled back. A quarter of the
 * TTL, at most 10 s: room for a few cross-region round trips (and a cold connection's TLS and
 * SCRAM) without making an emergency wait much longer.
 */
export function grantWindowMs(ttlSeconds: number): number {
  return Math.min(ttlSeconds * 250, 10_000);
}

/**
 * Added to the last grant before an emergency promotes. Each site only measures durations on its
 * own clock, so this covers clock-rate drift over one TTL and the commit latency of a
 * transaction the primary checked just before its lease ran out, not an offset between clocks.
 * The emergency also waits one lease-tick interval more: the tick is what ends a transaction that
 * could still commit after the lease (ha.end_writers_after_lease).
 */
export const LEASE_MARGIN_MS = 1_000;

export interface LeaseAnswer {
  site: SiteName;
  epoch: number;
  lease: "granted" | "off";
  granted_until?: string;
  lease_until?: string | null;
}

function sqlstate(e: unknown): string | undefined {
  return (e as { code?: string } | null)?.code;
}

/**
 * Answers a renewal from `requester` (which says it is the primary at `epoch`): refuses and fences
 * it when the granting site knows a newer epoch; records the grant and extends the lease
 * otherwise. Throws HttpError 409 (refused), 503 (a site is unreachable).
 */
export async function renewLease(
  rt: HaRuntime,
  requester: SiteName,
  epoch: number,
  log?: Logger,
): Promise<LeaseAnswer> {
  const granter = rt.sites.other(requester);
  const g = rt.sites.get(granter).ops;
  const r = rt.sites.get(requester).ops;
  const granterState = await withDeadline(readControlState(g), 3000, `site ${granter}`).catch(
    () => {
      throw new HttpError(503, "site_unreachable", `Site ${granter} cannot grant a lease now.`);
    },
  );
  if (!granterState) {
    throw new HttpError(409, "not_set_up", `Site ${granter} has no HA control row.`);
  }
  if (granterState.epoch > epoch) {
    await fenceStaleRequester(r, requester, epoch, granterState.epoch, granter, log);
    throw new HttpError(
      409,
      "stale_epoch",
      `Site ${requester} is at epoch ${epoch} but site ${granter} knows epoch ${granterState.epoch}: it was fenced.`,
    );
  }
  const [{ ttl }] = await g`select lease_ttl_seconds as ttl from ha.state where id`;
  if (ttl === null) return { site: requester, epoch, lease: "off" };
  const ttlSeconds = Number(ttl);
  const windowMs = grantWindowMs(ttlSeconds);
  await r`select 1`.catch(() => {}); // a cold connection's set-up is not spent inside the window
  const started = performance.now();
  let grantedUntil: Date;
  try {
    const [row] = await g.begin(
      "read write",
      (tx) =>
        tx`select ha.record_lease_grant(${requester}, ${epoch}::bigint,
             ${ttlSeconds + windowMs / 1000}::numeric) as until`,
    );
    grantedUntil = new Date(row.until);
  } catch (e) {
    if (sqlstate(e) === "55000") {
      log?.warn("lease_refused", { site: requester, epoch, reason: (e as Error).message });
      throw new HttpError(409, "lease_refused", (e as Error).message);
    }
    throw e;
  }
  let leaseUntil: string | null = null;
  try {
    await withDeadline(
      r.begin("read write", async (tx) => {
        const [row] =
          await tx`select ha.extend_lease(${epoch}::bigint, ${ttlSeconds}::numeric) as until`;
        if (performance.now() - started > windowMs) {
          throw new Error("the extension came later than the recorded grant covers");
        }
        leaseUntil = row.until ? new Date(row.until).toISOString() : null;
      }),
      windowMs,
      `site ${requester}`,
    );
  } catch (e) {
    log?.warn("lease_extension_failed", {
      site: requester,
      error: e instanceof Error ? e.message : String(e),
    });
    throw new HttpError(
      503,
      "site_unreachable",
      `The grant was recorded on site ${granter}, but site ${requester}'s lease could not be extended in time.`,
    );
  }
  return {
    site: requester,
    epoch,
    lease: "granted",
    granted_until: grantedUntil.toISOString(),
    lease_until: leaseUntil,
  };
}

async function fenceStaleRequester(
  r: Sql,
  requester: SiteName,
  epoch: number,
  newest: number,
  granter: SiteName,
  log?: Logger,
): Promise<void> {
  try {
    const mine = await withDeadline(readControlState(r), 2000, `site ${requester}`);
    if (!mine || mine.role !== "primary" || mine.epoch >= newest) return;
    const reason = `stale epoch ${mine.epoch} < ${newest} (seen by site ${granter})`;
    await setFence(r, "fenced", newest, reason);
    await endClientSessions(r);
    log?.warn("fenced_stale_primary", { site: requester, site_epoch: epoch, epoch: newest });
  } catch (e) {
    log?.error("fence_failed", {
      site: requester,
      error: e instanceof Error ? e.message : String(e),
    });
  }
}

/**
 * For an emergency failover, on the site taking over: the last instant a lease it granted to
 * `grantee` can last (its own clock), after any grant in flight has committed. Grants stop from
 * here on, because the emergency operation is recorded on this site.
 */
export async function lastLeaseGranted(sql: Sql, grantee: SiteName): Promise<Date | null> {
  const [row] = await sql.begin(
    "read write",
    (tx) => tx`select ha.last_lease_granted(${grantee}) as until`,
  );
  return row.until ? new Date(row.until) : null;
}

/**
 * Milliseconds until `sql`'s clock passes `until`, plus the margin and one lease-tick interval
 * (≤ 0: already passed).
 */
export async function msUntilExpired(sql: Sql, until: Date): Promise<number> {
  const [row] = await sql`
    select extract(epoch from (${until.toISOString()}::timestamptz - clock_timestamp()))::float8 * 1000 as ms,
           coalesce((select lease_renew_seconds from ha.state where id), 5) as tick`;
  return Number(row.ms) + LEASE_MARGIN_MS + Number(row.tick) * 1000;
}

/**
 * Records, on `granter`, the grant for a site about to be made primary at `epoch`; the lift that
 * follows must come within the grant window of `grantedAt`. "off" when the lease is off.
 */
export async function recordInitialGrant(
  granter: Sql,
  grantee: SiteName,
  epoch: number,
): Promise<{ seconds: number; grantedAt: number; windowMs: number } | "off"> {
  const [{ ttl }] = await granter`select lease_ttl_seconds as ttl from ha.state where id`;
  if (ttl === null) return "off";
  const seconds = Number(ttl);
  const windowMs = grantWindowMs(seconds);
  const grantedAt = performance.now();
  await granter.begin(
    "read write",
    (tx) =>
      tx`select ha.record_lease_grant(${grantee}, ${epoch}::bigint,
           ${seconds + windowMs / 1000}::numeric)`,
  );
  return { seconds, grantedAt, windowMs };
}
