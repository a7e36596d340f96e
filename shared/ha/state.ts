/** Reading each site's control row and working out who is primary now. */
import type { Sql } from "../db/mod.ts";
import { withDeadline } from "./deadline.ts";
import type { FenceStatus } from "./fence.ts";
import { SITE_NAMES, type SiteName, type Sites } from "./sites.ts";

export interface ControlState {
  site: string;
  role: "primary" | "standby" | "fenced";
  epoch: number;
  fenced: boolean;
  fencedReason: string | null;
}

export interface SiteView {
  name: SiteName;
  reachable: boolean;
  error?: string;
  state?: ControlState;
  inRecovery?: boolean;
  readOnlyDefault?: boolean;
  walLsn?: string;
  /** Whether the write guard lets application writes through now, and why not. */
  fence?: FenceStatus;
}

export interface Topology {
  sites: Record<SiteName, SiteView>;
  /** The highest epoch any reachable site knows: the routing authority's epoch. */
  routingEpoch: number | null;
  /** The site acting as primary: role primary, not fenced, holding the routing epoch. */
  primary: SiteName | null;
  standby: SiteName | null;
}

export async function readControlState(sql: Sql): Promise<ControlState | undefined> {
  const rows = await sql`select site, role, epoch, fenced, fenced_reason from ha.state where id`;
  if (rows.length === 0) return undefined;
  const r = rows[0];
  return {
    site: r.site,
    role: r.role,
    epoch: Number(r.epoch),
    fenced: r.fenced,
    fencedReason: r.fenced_reason,
  };
}

/**
 * Everything about one site in one round trip. `readOnlyDefault` is the database-level default
 * (pg_db_role_setting), which is what a freeze sets, not this session's value.
 */
export async function viewSite(sites: Sites, name: SiteName, deadlineMs = 2000): Promise<SiteView> {
  const sql = sites.get(name).probe;
  try {
    const [r] = await withDeadline(
      sql`
        select pg_is_in_recovery() as in_recovery,
               case when pg_is_in_recovery() then pg_last_wal_replay_lsn()::text else pg_current_wal_lsn()::text end as lsn,
               coalesce((select bool_or(s like 'default_transaction_read_only=on' or s like 'default_transaction_read_only=true')
                         from pg_db_role_setting d, unnest(d.setconfig) s
                         where d.setdatabase = (select oid from pg_database where datname = current_database())
                           and d.setrole = 0), false) as read_only_default,
               (select to_jsonb(x) from (select site, role, epoch, fenced, fenced_reason from ha.state where id) x) as state,
               (select to_jsonb(f) from ha.fence_status() f) as fence`,
      deadlineMs,
      `site ${name}`,
    );
    const s = r.state as Record<string, unknown> | null;
    const f = r.fence as Record<string, unknown> | null;
    return {
      name,
      reachable: true,
      inRecovery: r.in_recovery,
      readOnlyDefault: r.read_only_default,
      walLsn: r.lsn,
      state: s
        ? {
          site: String(s.site),
          role: s.role as ControlState["role"],
          epoch: Number(s.epoch),
          fenced: Boolean(s.fenced),
          fencedReason: (s.fenced_reason as string) ?? null,
        }
        : undefined,
      fence: f
        ? {
          writable: f.writable === true,
          reason: (f.reason as string) ?? null,
          leaseUntil: (f.lease_until as string) ?? null,
          leaseTtlSeconds: f.lease_ttl_seconds === null ? null : Number(f.lease_ttl_seconds),
        }
        : undefined,
    };
  } catch (e) {
    return { name, reachable: false, error: probeError(e) };
  }
}

/** A short, secret-free reason for a failed probe. */
export function probeError(e: unknown): string {
  if (e && typeof e === "object" && "code" in e) {
    const code = String((e as { code: unknown }).code);
    if (code === "ECONNREFUSED") return "connection refused";
    if (code === "CONNECT_TIMEOUT" || code === "ETIMEDOUT") return "connect timeout";
    if (code === "57014") return "statement timeout";
    if (code === "57P01" || code === "57P03") return "database shutting down or starting up";
    if (code === "42P01" || code === "3F000") return "ha schema not installed";
    if (code === "28P01") return "authentication failed";
  }
  if (e instanceof Error && e.name === "DeadlineError") return e.message;
  return "unreachable";
}

export async function topology(sites: Sites, deadlineMs = 2000): Promise<Topology> {
  const views = await Promise.all(SITE_NAMES.map((n) => viewSite(sites, n, deadlineMs)));
  const byName = Object.fromEntries(views.map((v) => [v.name, v])) as Record<SiteName, SiteView>;
  const epochs = views.filter((v) => v.state).map((v) => v.state!.epoch);
  const routingEpoch = epochs.length ? Math.max(...epochs) : null;
  const primary =
    views.find((v) =>
      v.reachable && v.state && v.state.role === "primary" && !v.state.fenced &&
      v.state.epoch === routingEpoch
    )?.name ?? null;
  // With the primary unreachable, the acting roles still follow the control rows we can read.
  let standby: SiteName | null = null;
  if (primary) standby = primary === "primary" ? "standby" : "primary";
  else {
    const s = views.find((v) => v.state?.role === "standby" && v.state.epoch === routingEpoch);
    if (s) standby = s.name;
  }
  return { sites: byName, routingEpoch, primary, standby };
}
