/**
 * What the `health` and `failover` functions share: the two sites' pools, the router, and one
 * way to observe both sites and the router. Observing changes nothing: fencing a stale primary
 * is a separate act (`fenceStalePrimaries`) that only POST routes and the lease endpoint take.
 * Probes read through a short single-flight cache, so a thousand monitor requests per second cost
 * the databases what one does.
 */
import { type HaConfig, requireConfigured } from "../config/mod.ts";
import type { Logger } from "../http/logger.ts";
import { withDeadline } from "./deadline.ts";
import { endClientSessions, setFence } from "./fence.ts";
import { createRouter, type Router, type RouteState } from "./routers.ts";
import { type SiteName, Sites } from "./sites.ts";
import { type Topology, topology } from "./state.ts";

export interface HaRuntimeOptions {
  /** Replaces the router built from the configuration (tests, the Fly stand-in). */
  router?: Router;
  fetch?: typeof fetch;
  /** How long probe reads are shared (ms); default 1000. */
  probeCacheMs?: number;
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
  /** When the reads were made (ms since epoch). */
  at: number;
}

/** Single-flight memo: one computation per key at a time, its result shared for `ttlMs`. */
export class SharedReads {
  readonly #entries = new Map<string, { at: number; value: Promise<unknown> }>();
  constructor(readonly ttlMs: number) {}

  get<T>(key: string, compute: () => Promise<T>): Promise<T> {
    const now = Date.now();
    const hit = this.#entries.get(key);
    if (hit && now - hit.at < this.ttlMs) return hit.value as Promise<T>;
    const value = compute();
    this.#entries.set(key, { at: now, value });
    // A failed read is not kept: the next caller asks again.
    value.catch(() => {
      if (this.#entries.get(key)?.value === value) this.#entries.delete(key);
    });
    return value;
  }

  clear(): void {
    this.#entries.clear();
  }
}

export class HaRuntime {
  readonly sites: Sites;
  /** Reads probes share (see SharedReads). */
  readonly shared: SharedReads;
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
    this.shared = new SharedReads(options.probeCacheMs ?? 1000);
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

  /** Reads both sites and (when configured) the router in parallel, each under a deadline. */
  async observe(deadlineMs = 2000): Promise<Observation> {
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
    // A primary whose epoch is behind the router's is not the primary.
    if (topo.primary && epoch !== null && topo.sites[topo.primary].state!.epoch < epoch) {
      topo.primary = null;
    }
    return {
      topology: topo,
      route: r.route,
      routeError: r.error,
      epoch,
      routedSite: this.siteAt(r.route?.target),
      at: Date.now(),
    };
  }

  /** `observe` shared across concurrent probes for `probeCacheMs`. */
  observeShared(deadlineMs = 2000): Promise<Observation> {
    return this.shared.get("observe", () => this.observe(deadlineMs));
  }

  /**
   * Fences every reachable site that still says primary under an older epoch than a witness
   * knows (the write token is revoked, sessions ended, the row marked). POST routes only.
   */
  async fenceStalePrimaries(obs: Observation, log?: Logger): Promise<SiteName[]> {
    const fenced: SiteName[] = [];
    if (obs.epoch === null) return fenced;
    for (const view of Object.values(obs.topology.sites)) {
      const s = view.state;
      if (!view.reachable || !s || s.role !== "primary" || s.fenced || s.epoch >= obs.epoch) {
        continue;
      }
      const reason = `stale epoch ${s.epoch} < ${obs.epoch}`;
      try {
        const sql = this.sites.get(view.name).ops;
        await setFence(sql, "fenced", obs.epoch, reason);
        await endClientSessions(sql);
        fenced.push(view.name);
        log?.warn("fenced_stale_primary", {
          site: view.name,
          site_epoch: s.epoch,
          epoch: obs.epoch,
        });
        view.state = { ...s, role: "fenced", fenced: true, fencedReason: reason, epoch: obs.epoch };
        view.fence = { writable: false, reason, leaseUntil: null, leaseTtlSeconds: null };
      } catch (e) {
        log?.error("fence_failed", {
          site: view.name,
          error: e instanceof Error ? e.message : String(e),
        });
      }
    }
    this.shared.clear();
    return fenced;
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
