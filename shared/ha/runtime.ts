/**
 * What the `health` and `failover` functions share: the two sites' pools, the router, and
 * "fence on sight" — a reachable site that still calls itself primary under an older epoch than
 * the routing authority knows is made read-only and its sessions are ended, whoever notices first.
 */
import { type HaConfig, requireConfigured } from "../config/mod.ts";
import type { Logger } from "../http/logger.ts";
import { withDeadline } from "./deadline.ts";
import { createRouter, type Router, type RouteState } from "./routers.ts";
import { type SiteName, Sites } from "./sites.ts";
import { type Topology, topology } from "./state.ts";

export interface HaRuntimeOptions {
  /** Replaces the router built from the configuration (tests, the Fly stand-in). */
  router?: Router;
  fetch?: typeof fetch;
}

export interface Observation {
  topology: Topology;
  /** What the router reports, or why it could not be read. */
  route?: RouteState;
  routeError?: string;
  /** The highest epoch any witness (either site, the router) knows. */
  epoch: number | null;
  /** The site PgBouncer routes to, by endpoint ("other" when it matches neither). */
  routedSite: SiteName | "other" | null;
  /** Sites fenced by this observation. */
  fenced: SiteName[];
}

export class HaRuntime {
  readonly sites: Sites;
  #router?: Router;
  #routerError?: unknown;

  constructor(
    readonly config: HaConfig,
    applicationName: string,
    readonly options: HaRuntimeOptions = {},
  ) {
    this.sites = new Sites(
      {
        primary: config.primaryDbUrl ?? "postgresql://unset@invalid/none",
        standby: config.standbyDbUrl ?? "postgresql://unset@invalid/none",
      },
      applicationName,
    );
    if (options.router) this.#router = options.router;
  }

  /** Throws 503 not_configured unless both database URLs are set. */
  requireSites(): void {
    requireConfigured(this.config, ["PRIMARY_DB_URL", "STANDBY_DB_URL"]);
  }

  /** The router, or a 503 `not_configured` naming what is missing. */
  router(): Router {
    if (this.#router) return this.#router;
    if (this.#routerError) throw this.#routerError;
    try {
      this.#router = createRouter(this.config, this.options.fetch);
      return this.#router;
    } catch (e) {
      this.#routerError = e;
      throw e;
    }
  }

  routerConfigured(): boolean {
    try {
      this.router();
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Reads both sites and (when configured) the router in parallel, each under a deadline, and
   * fences a stale primary it finds.
   */
  async observe(deadlineMs = 2000, log?: Logger): Promise<Observation> {
    const routeP = this.routerConfigured()
      ? withDeadline(this.router().current(), deadlineMs, "PgBouncer").then(
        (route) => ({ route, error: undefined as string | undefined }),
        (e) => ({ route: undefined, error: e instanceof Error ? e.message : "unreachable" }),
      )
      : Promise.resolve({ route: undefined, error: "router not configured" });
    const [topo, r] = await Promise.all([topology(this.sites, deadlineMs), routeP]);
    const epochs = [topo.routingEpoch, r.route?.epoch ?? null].filter((e): e is number =>
      e !== null
    );
    const epoch = epochs.length ? Math.max(...epochs) : null;
    const fenced: SiteName[] = [];
    for (const view of Object.values(topo.sites)) {
      const s = view.state;
      if (!view.reachable || !s || epoch === null) continue;
      if (s.role === "primary" && !s.fenced && s.epoch < epoch) {
        try {
          await fenceSite(
            this.sites.get(view.name).ops,
            epoch,
            `stale epoch ${s.epoch} < ${epoch}`,
          );
          fenced.push(view.name);
          log?.warn("fenced_stale_primary", { site: view.name, site_epoch: s.epoch, epoch });
          view.state = {
            ...s,
            role: "fenced",
            fenced: true,
            fencedReason: `stale epoch ${s.epoch} < ${epoch}`,
          };
          view.readOnlyDefault = true;
        } catch (e) {
          log?.error("fence_failed", {
            site: view.name,
            error: e instanceof Error ? e.message : String(e),
          });
        }
      }
    }
    // A primary whose epoch is behind the router's is not the primary, fenced or not.
    if (topo.primary && epoch !== null && topo.sites[topo.primary].state!.epoch < epoch) {
      topo.primary = null;
    }
    return {
      topology: topo,
      route: r.route,
      routeError: r.error,
      epoch,
      fenced,
      routedSite: this.siteAt(r.route?.target),
    };
  }

  /** Which configured site an upstream endpoint is. */
  siteAt(t: RouteState["target"]): SiteName | "other" | null {
    if (!t) return null;
    for (const n of ["primary", "standby"] as SiteName[]) {
      const e = this.sites.get(n).endpoint;
      if (t.host === e.host && t.port === e.port && t.dbname === e.database) return n;
    }
    return "other";
  }

  async close(): Promise<void> {
    await this.sites.close();
    await this.#router?.close?.();
  }
}

/**
 * Makes a site read-only for every new session, ends the application sessions it has, and marks
 * its control row fenced. Idempotent. Our own session writes the control row in an explicit
 * READ WRITE transaction, since the database default is read-only from then on.
 */
export async function fenceSite(
  sql: import("../db/mod.ts").Sql,
  epoch: number,
  reason: string,
): Promise<void> {
  const [{ db }] = await sql`select current_database() as db`;
  await sql.unsafe(
    `alter database "${String(db).replaceAll('"', '""')}" set default_transaction_read_only = on`,
  );
  await sql`
    select pg_terminate_backend(pid) from pg_stat_activity
    where datname = current_database() and pid <> pg_backend_pid() and backend_type = 'client backend'
      and coalesce(application_name, '') not like 'sa-toolkit/%'
      and (not (select rolsuper from pg_roles where oid = usesysid)
           or (select rolsuper from pg_roles where rolname = current_user))`;
  await sql.begin(
    "read write",
    (tx) =>
      tx`update ha.state set role = 'fenced', fenced = true, fenced_reason = ${reason},
           epoch = greatest(epoch, ${epoch}), updated_at = now() where id`,
  );
}
