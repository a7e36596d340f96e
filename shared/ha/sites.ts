/**
 * The two sites of the HA pair, named after their configuration (PRIMARY_DB_URL is site
 * "primary", STANDBY_DB_URL is site "standby"). Those are the roles at deployment; the roles they
 * hold now come from each site's ha.state (the epoch decides). Each site has a small, reused pool
 * for probes (2 s connect timeout, short statement timeout) and one for operations.
 */
import { healingSql, live, type Sql } from "../db/mod.ts";

export type SiteName = "primary" | "standby";
export const SITE_NAMES: SiteName[] = ["primary", "standby"];

export interface SiteEndpoint {
  host: string;
  port: number;
  database: string;
}

export function endpointOf(url: string): SiteEndpoint {
  const u = new URL(url);
  return {
    host: u.hostname,
    port: Number(u.port || 5432),
    database: decodeURIComponent(u.pathname.replace(/^\//, "")) || "postgres",
  };
}

export interface SiteClients {
  name: SiteName;
  endpoint: SiteEndpoint;
  /** For probes: fails fast. */
  probe: Sql;
  /** For failover steps: longer statements, still bounded. */
  ops: Sql;
}

interface SiteHandles {
  name: SiteName;
  endpoint: SiteEndpoint;
  probe: ReturnType<typeof healingSql>;
  ops: ReturnType<typeof healingSql>;
}

/** Connections of a site's `ops` pool. */
export const OPS_CONNECTIONS = 2;

export class Sites {
  readonly #urls: Record<SiteName, string>;
  readonly #handles = new Map<SiteName, SiteHandles>();
  readonly #app: string;

  constructor(urls: Record<SiteName, string>, applicationName: string) {
    this.#urls = urls;
    this.#app = applicationName;
  }

  /** The site's pools; a pool one of whose connections closed is replaced (see healingSql). */
  get(name: SiteName): SiteClients {
    let h = this.#handles.get(name);
    if (!h) {
      const url = this.#urls[name];
      h = {
        name,
        endpoint: endpointOf(url),
        probe: healingSql(() => url, {
          applicationName: this.#app,
          max: 2,
          // Under the probes' 1.8 s deadline, so a silent host fails the attempt by itself.
          connectTimeout: 1.5,
          idleTimeout: 120,
          statementTimeoutMs: 1500,
        }),
        ops: healingSql(() => url, {
          applicationName: `${this.#app}-ops`,
          max: OPS_CONNECTIONS,
          connectTimeout: 5,
          idleTimeout: 60,
          statementTimeoutMs: 30_000,
        }),
      };
      this.#handles.set(name, h);
    }
    // Live handles: whoever keeps one (a failover step, a rejoin) follows the pool when it is
    // renewed after a dropped connection — ending a site's sessions drops our own too.
    return { name, endpoint: h.endpoint, probe: live(h.probe), ops: live(h.ops) };
  }

  other(name: SiteName): SiteName {
    return name === "primary" ? "standby" : "primary";
  }

  async close(): Promise<void> {
    const all = [...this.#handles.values()];
    this.#handles.clear();
    await Promise.all(
      all.flatMap((h) => [h.probe.close(), h.ops.close()]).map((p) => p.catch(() => {})),
    );
  }
}
