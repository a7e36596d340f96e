/**
 * Routers move the one application database in PgBouncer to a new upstream and persist that
 * target (with the epoch) so a restarted PgBouncer boots onto it.
 *
 *  - file: the PgBouncer we run next to the database (and the local stack): rewrite the
 *    `%include`d databases file atomically (temp file + rename), RELOAD through the admin console.
 *  - fly: the Fly.io app from deploy/fly-pgbouncer: lease every machine (409 when another
 *    failover holds a lease), run the image's `entrypoint.sh route|pause|resume|show` in each
 *    machine through the Machines API exec endpoint, all-or-nothing, then release the leases.
 *    The route command writes the databases file on the machine's volume, so restarts keep it.
 */
import type { HaConfig } from "../config/mod.ts";
import { HttpError } from "../http/errors.ts";
import * as pgb from "./pgbouncer.ts";

export interface RouteState {
  target?: pgb.RouteTarget;
  epoch: number | null;
  paused: boolean;
  disabled: boolean;
}

/**
 * Every router refuses (409 `stale_epoch`) a route at an epoch lower than the one it holds, or a
 * different target at the same epoch: an epoch names one primary, and a replayed or stale
 * operation must not move the endpoint back.
 */
export function checkEpochOrder(
  current: { target?: pgb.RouteTarget; epoch: number | null },
  target: pgb.RouteTarget,
  epoch: number,
): void {
  if (current.epoch === null) return;
  const same = current.target?.host === target.host && current.target?.port === target.port &&
    current.target?.dbname === target.dbname;
  if (epoch < current.epoch || (epoch === current.epoch && !same)) {
    throw new HttpError(
      409,
      "stale_epoch",
      `PgBouncer holds epoch ${current.epoch}; a route at epoch ${epoch}${
        epoch === current.epoch ? " to another upstream" : ""
      } is refused.`,
    );
  }
}

export interface Router {
  readonly kind: "file" | "fly";
  pause(timeoutMs: number): Promise<void>;
  resume(): Promise<void>;
  /** Where every PgBouncer routes the database now (they must agree), and the epoch it carries. */
  current(): Promise<RouteState>;
  route(target: pgb.RouteTarget, epoch: number): Promise<void>;
  close?(): Promise<void>;
}

export class FileRouter implements Router {
  readonly kind = "file" as const;
  constructor(
    readonly adminUrl: string,
    readonly database: string,
    readonly databasesFile: string,
  ) {}

  pause(timeoutMs: number): Promise<void> {
    return pgb.pause(this.adminUrl, this.database, timeoutMs);
  }

  resume(): Promise<void> {
    return pgb.resume(this.adminUrl, this.database);
  }

  #probe?: ReturnType<typeof pgb.adminClient>;

  /** Reads the file and SHOW DATABASES on one reused admin connection (probes poll this). */
  async current(): Promise<RouteState> {
    const text = await Deno.readTextFile(this.databasesFile).catch(() => "");
    const file = pgb.parseDatabasesFile(text, this.database);
    this.#probe ??= pgb.adminClient(this.adminUrl);
    let row: pgb.DatabaseRow | undefined;
    try {
      row = await pgb.routedDatabase(this.#probe, this.database);
    } catch (e) {
      const probe = this.#probe;
      this.#probe = undefined;
      probe.end({ timeout: 0 }).catch(() => {});
      throw e;
    }
    return {
      target: row ? { host: row.host, port: row.port, dbname: row.database } : file.target,
      epoch: file.epoch,
      paused: row?.paused ?? false,
      disabled: row?.disabled ?? false,
    };
  }

  async close(): Promise<void> {
    const probe = this.#probe;
    this.#probe = undefined;
    await probe?.end({ timeout: 1 }).catch(() => {});
  }

  async route(target: pgb.RouteTarget, epoch: number): Promise<void> {
    const text = pgb.renderDatabasesFile(this.database, target, epoch);
    const held = pgb.parseDatabasesFile(
      await Deno.readTextFile(this.databasesFile).catch(() => ""),
      this.database,
    );
    checkEpochOrder(held, target, epoch);
    const tmp = `${this.databasesFile}.tmp.${crypto.randomUUID().slice(0, 8)}`;
    const info = await Deno.stat(this.databasesFile).catch(() => undefined);
    await Deno.writeTextFile(tmp, text, { mode: 0o640 });
    if (info?.uid !== undefined && info.uid !== null && Deno.uid() === 0) {
      await Deno.chown(tmp, info.uid, info.gid);
    }
    await Deno.rename(tmp, this.databasesFile);
    await pgb.reload(this.adminUrl);
  }
}

interface FlyMachine {
  id: string;
  state: string;
  region?: string;
}

export class FlyRouter implements Router {
  readonly kind = "fly" as const;
  readonly #fetch: typeof fetch;

  constructor(
    readonly apiUrl: string,
    readonly appName: string,
    readonly apiToken: string,
    readonly database: string,
    fetchImpl: typeof fetch = fetch,
    readonly entrypoint = "/app/entrypoint.sh",
  ) {
    this.#fetch = fetchImpl;
  }

  #headers(extra: Record<string, string> = {}): Record<string, string> {
    // Deploy and org tokens (macaroons) are sent as "FlyV1 <token>"; others as Bearer.
    const t = this.apiToken.trim();
    const auth = t.startsWith("FlyV1 ")
      ? t
      : /^(fm1r_|fm2_)/.test(t)
      ? `FlyV1 ${t}`
      : `Bearer ${t}`;
    return { authorization: auth, "content-type": "application/json", ...extra };
  }

  async #call(
    method: string,
    path: string,
    body?: unknown,
    headers: Record<string, string> = {},
  ): Promise<Response> {
    let res: Response;
    try {
      res = await this.#fetch(`${this.apiUrl}/v1/apps/${encodeURIComponent(this.appName)}${path}`, {
        method,
        headers: this.#headers(headers),
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(15_000),
      });
    } catch {
      throw new HttpError(503, "fly_unreachable", "The Fly Machines API cannot be reached.");
    }
    return res;
  }

  async machines(): Promise<FlyMachine[]> {
    const res = await this.#call("GET", "/machines");
    if (!res.ok) {
      await res.body?.cancel();
      throw new HttpError(503, "fly_error", `Listing Fly machines failed (HTTP ${res.status}).`);
    }
    const all = (await res.json()) as FlyMachine[];
    return all.filter((m) => m.state === "started");
  }

  async #exec(
    machine: string,
    cmd: string,
    timeoutSeconds = 15,
  ): Promise<{ code: number; stdout: string; stderr: string }> {
    const res = await this.#call("POST", `/machines/${encodeURIComponent(machine)}/exec`, {
      cmd,
      timeout: timeoutSeconds,
    });
    if (!res.ok) {
      await res.body?.cancel();
      throw new Error(`exec on machine ${machine} failed (HTTP ${res.status})`);
    }
    const r = await res.json() as { exit_code?: number; stdout?: string; stderr?: string };
    return { code: r.exit_code ?? 0, stdout: r.stdout ?? "", stderr: r.stderr ?? "" };
  }

  /** Leases every machine; 409 if another failover holds one. Returns the nonces. */
  async #lease(ids: string[]): Promise<Map<string, string>> {
    const nonces = new Map<string, string>();
    try {
      for (const id of ids) {
        const res = await this.#call("POST", `/machines/${encodeURIComponent(id)}/lease`, {
          ttl: 120,
          description: "sa-toolkit failover",
        });
        if (res.status === 409) {
          await res.body?.cancel();
          throw new HttpError(
            409,
            "operation_in_progress",
            `Fly machine ${id} is leased by another operation.`,
          );
        }
        if (!res.ok) {
          await res.body?.cancel();
          throw new HttpError(
            503,
            "fly_error",
            `Leasing Fly machine ${id} failed (HTTP ${res.status}).`,
          );
        }
        const body = await res.json() as { data?: { nonce?: string }; nonce?: string };
        nonces.set(id, body.data?.nonce ?? body.nonce ?? "");
      }
      return nonces;
    } catch (e) {
      await this.#release(nonces);
      throw e;
    }
  }

  async #release(nonces: Map<string, string>): Promise<void> {
    for (const [id, nonce] of nonces) {
      const res = await this.#call(
        "DELETE",
        `/machines/${encodeURIComponent(id)}/lease`,
        undefined,
        {
          "fly-machine-lease-nonce": nonce,
        },
      ).catch(() => undefined);
      await res?.body?.cancel();
    }
  }

  async #onAll(cmd: (id: string) => string, undo?: (id: string) => string): Promise<void> {
    const ids = (await this.machines()).map((m) => m.id);
    if (ids.length === 0) {
      throw new HttpError(503, "fly_error", "No started PgBouncer machine in the Fly app.");
    }
    const nonces = await this.#lease(ids);
    const done: string[] = [];
    try {
      for (const id of ids) {
        const r = await this.#exec(id, cmd(id));
        if (r.code !== 0) throw new Error(`machine ${id}: ${r.stderr.trim() || `exit ${r.code}`}`);
        done.push(id);
      }
    } catch (e) {
      if (undo) { for (const id of done) await this.#exec(id, undo(id)).catch(() => {}); }
      throw e;
    } finally {
      await this.#release(nonces);
    }
  }

  pause(timeoutMs: number): Promise<void> {
    const seconds = Math.max(1, Math.ceil(timeoutMs / 1000));
    return this.#onAll(
      () => `${this.entrypoint} pause ${seconds}`,
      () => `${this.entrypoint} resume`,
    );
  }

  resume(): Promise<void> {
    return this.#onAll(() => `${this.entrypoint} resume`);
  }

  async current(): Promise<RouteState> {
    const ids = (await this.machines()).map((m) => m.id);
    const seen: RouteState[] = [];
    for (const id of ids) {
      const r = await this.#exec(id, `${this.entrypoint} show`);
      // show prints: host port dbname paused disabled epoch
      const [host, port, dbname, paused, disabled, epoch] = r.stdout.trim().split(/\s+/);
      seen.push({
        target: host ? { host, port: Number(port), dbname } : undefined,
        epoch: epoch && epoch !== "-" ? Number(epoch) : null,
        paused: paused === "1",
        disabled: disabled === "1",
      });
    }
    if (seen.length === 0) return { epoch: null, paused: false, disabled: false };
    const first = JSON.stringify(seen[0].target);
    if (seen.some((s) => JSON.stringify(s.target) !== first)) {
      throw new HttpError(
        503,
        "pgbouncer_disagree",
        "The PgBouncer machines route the database to different upstreams.",
      );
    }
    return {
      target: seen[0].target,
      epoch: Math.min(...seen.map((s) => s.epoch ?? -1)) < 0
        ? null
        : Math.min(...seen.map((s) => s.epoch!)),
      paused: seen.some((s) => s.paused),
      disabled: seen.some((s) => s.disabled),
    };
  }

  async route(target: pgb.RouteTarget, epoch: number): Promise<void> {
    pgb.renderDatabasesFile(this.database, target, epoch); // validates the values
    const before = await this.current();
    checkEpochOrder(before, target, epoch); // each machine's entrypoint refuses too
    // No undo: a route only moves forward in epoch. If a machine fails, the operation fails
    // closed (PgBouncer stays paused) and resuming it routes the rest at the same epoch.
    await this.#onAll(
      () => `${this.entrypoint} route ${target.host} ${target.port} ${target.dbname} ${epoch}`,
    );
  }
}

export function createRouter(config: HaConfig, fetchImpl: typeof fetch = fetch): Router {
  if (config.router === "fly") {
    if (!config.fly.appName || !config.fly.apiToken) {
      throw new HttpError(
        503,
        "not_configured",
        "The fly router needs FLY_APP_NAME and FLY_API_TOKEN.",
      );
    }
    return new FlyRouter(
      config.fly.apiUrl,
      config.fly.appName,
      config.fly.apiToken,
      config.pgbouncerDatabase,
      fetchImpl,
    );
  }
  if (!config.pgbouncerAdminUrl || !config.databasesFile) {
    throw new HttpError(
      503,
      "not_configured",
      "The file router needs PGBOUNCER_ADMIN_URL and PGBOUNCER_DATABASES_FILE.",
    );
  }
  return new FileRouter(config.pgbouncerAdminUrl, config.pgbouncerDatabase, config.databasesFile);
}
