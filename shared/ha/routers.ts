/**
 * Routers move the one application database in PgBouncer to a new upstream and persist that
 * target (with the epoch) so a restarted PgBouncer boots onto it.
 *
 *  - file: the PgBouncer we run next to the database (and the local stack): rewrite the
 *    `%include`d databases file atomically (temp file + rename), RELOAD through the admin console.
 *  - fly: the Fly.io app from deploy/fly-pgbouncer: every machine of the app is accounted for.
 *    Started machines are leased (409 when another failover holds a lease) and run the image's
 *    `entrypoint.sh route|pause|resume|show` through the Machines API exec endpoint; a machine
 *    that fails fails the operation closed, naming it. Stopped ones are reported, and reconcile
 *    their persisted route in the entrypoint's boot check before they serve again; machines
 *    between states are waited for, briefly, or named in a 503. The route command writes the
 *    databases file on the machine's volume, so restarts keep it.
 */
import type { HaConfig } from "../config/mod.ts";
import { HttpError } from "../http/errors.ts";
import * as pgb from "./pgbouncer.ts";

export interface RouteState {
  target?: pgb.RouteTarget;
  epoch: number | null;
  paused: boolean;
  disabled: boolean;
  /** Fly router: machines of the app that do not serve now (stopped, booting, ...). */
  notServing?: IdleMachine[];
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
  /** Routes at `epoch`; the fly router reports which machines it routed and which do not serve. */
  route(target: pgb.RouteTarget, epoch: number): Promise<RouteReport | void>;
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

/** A machine as GET /v1/apps/{app}/machines lists it. */
export interface FlyMachine {
  id: string;
  state: string;
  region?: string;
}

/** A machine of the app that PgBouncer does not serve from now, with the reason. */
export interface IdleMachine {
  id: string;
  /** The Fly state, or "booting" for a started machine still in its entrypoint's boot check. */
  state: string;
}

/** What a fly route did: the machines it routed and those that were not serving. */
export interface RouteReport {
  routed: string[];
  /** Each of these checks the persisted route against ACTIVE_URLS before it serves again. */
  notServing: IdleMachine[];
}

/**
 * Fly machine states (fly.io/docs/machines/machine-states). Only a `started` machine runs
 * PgBouncer. A stopped, created or failed one runs the entrypoint again when it starts, whose boot
 * check reconciles the persisted route before PgBouncer serves. A `suspended` one would resume
 * its memory image, PgBouncer included, without that check: routing fails closed on it. Destroyed
 * ones are gone. Every other state (starting, stopping, replacing, updating, suspending, ...) is
 * a machine on its way somewhere: the router waits for it to settle, briefly, or fails closed.
 */
const BOOTS_THROUGH_CHECK = new Set(["stopped", "created", "failed", "launch_failed"]);
const GONE = new Set(["destroying", "destroyed"]);

interface Fleet {
  started: FlyMachine[];
  idle: FlyMachine[];
  suspended: FlyMachine[];
  moving: FlyMachine[];
}

function classify(all: FlyMachine[]): Fleet {
  const fleet: Fleet = { started: [], idle: [], suspended: [], moving: [] };
  for (const m of all) {
    if (m.state === "started") fleet.started.push(m);
    else if (BOOTS_THROUGH_CHECK.has(m.state)) fleet.idle.push(m);
    else if (m.state === "suspended") fleet.suspended.push(m);
    else if (!GONE.has(m.state)) fleet.moving.push(m);
  }
  return fleet;
}

const named = (ms: { id: string; state: string }[]) =>
  ms.map((m) => `${m.id} (${m.state})`).join(", ");

/** What `entrypoint.sh show` says about one started machine. */
type MachineView =
  | { id: string; serving: true; route: RouteState; bootCheck: boolean }
  | { id: string; serving: false };

/** A machine's exec that failed, and why (the entrypoint's last stderr line). */
interface MachineFailure {
  id: string;
  reason: string;
  /** The entrypoint refused a route older than its persisted epoch (exit 3). */
  stale?: boolean;
}

function failureOf(id: string, r: ExecResult | Error): MachineFailure {
  if (r instanceof Error) return { id, reason: r.message };
  const last = r.stderr.trim().split("\n").pop()?.replace(/^entrypoint: /, "");
  return { id, reason: last || `exit ${r.code}`, stale: r.code === 3 };
}

interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Exit code of `entrypoint.sh show|pause|kill` while the machine is still in its boot check. */
const NOT_SERVING_YET = 4;

export interface FlyRouterOptions {
  /** How long a route waits for machines in a transitional state to settle (default 30 s). */
  settleMs?: number;
  /** How often it lists the machines meanwhile (default 1 s). */
  pollMs?: number;
}

export class FlyRouter implements Router {
  readonly kind = "fly" as const;
  readonly #fetch: typeof fetch;
  readonly #settleMs: number;
  readonly #pollMs: number;

  constructor(
    readonly apiUrl: string,
    readonly appName: string,
    readonly apiToken: string,
    readonly database: string,
    fetchImpl: typeof fetch = fetch,
    readonly entrypoint = "/app/entrypoint.sh",
    options: FlyRouterOptions = {},
  ) {
    this.#fetch = fetchImpl;
    this.#settleMs = options.settleMs ?? 30_000;
    this.#pollMs = options.pollMs ?? 1000;
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

  /** Every machine of the app, whatever its state. */
  async machines(): Promise<FlyMachine[]> {
    const res = await this.#call("GET", "/machines");
    if (!res.ok) {
      await res.body?.cancel();
      throw new HttpError(503, "fly_error", `Listing Fly machines failed (HTTP ${res.status}).`);
    }
    return ((await res.json()) as FlyMachine[]).map((m) => ({
      id: String(m.id),
      state: String(m.state),
      region: m.region,
    }));
  }

  /**
   * The app's machines once none is in a transitional state, listing again every `pollMs` for up
   * to `settleMs`; then 503 naming those still moving. A suspended machine is refused outright.
   */
  async #settled(): Promise<Fleet> {
    const deadline = Date.now() + this.#settleMs;
    for (;;) {
      const fleet = classify(await this.machines());
      if (fleet.suspended.length) {
        throw new HttpError(
          503,
          "fly_machine_suspended",
          `Fly machine ${
            named(fleet.suspended)
          } would resume without checking its route: stop it (fly machine stop) or destroy it, then retry.`,
          { machines: fleet.suspended },
        );
      }
      if (fleet.moving.length === 0) return fleet;
      if (Date.now() >= deadline) {
        throw new HttpError(
          503,
          "fly_machines_unsettled",
          `Fly machine ${named(fleet.moving)} did not settle within ${
            Math.round(this.#settleMs / 1000)
          } s; nothing was changed on it. Retry once it is started or stopped.`,
          { machines: fleet.moving },
        );
      }
      await new Promise((r) => setTimeout(r, this.#pollMs));
    }
  }

  async #exec(machine: string, cmd: string, timeoutSeconds = 15): Promise<ExecResult> {
    const res = await this.#call("POST", `/machines/${encodeURIComponent(machine)}/exec`, {
      cmd,
      timeout: timeoutSeconds,
    });
    if (!res.ok) {
      await res.body?.cancel();
      throw new Error(`exec failed (HTTP ${res.status})`);
    }
    const r = await res.json() as { exit_code?: number; stdout?: string; stderr?: string };
    return { code: r.exit_code ?? 0, stdout: r.stdout ?? "", stderr: r.stderr ?? "" };
  }

  /** Runs `cmd` on each machine in turn; returns the failures (none: every machine exited 0). */
  async #execEach(ids: string[], cmd: string, stopAtFirst = false): Promise<MachineFailure[]> {
    const failures: MachineFailure[] = [];
    for (const id of ids) {
      const r = await this.#exec(id, cmd).catch((e: Error) => e);
      if (r instanceof Error || r.code !== 0) {
        failures.push(failureOf(id, r));
        if (stopAtFirst) break;
      }
    }
    return failures;
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

  /** Runs `fn` holding a lease on each of `ids`. */
  async #leased<T>(ids: string[], fn: () => Promise<T>): Promise<T> {
    const nonces = await this.#lease(ids);
    try {
      return await fn();
    } finally {
      await this.#release(nonces);
    }
  }

  /** `entrypoint.sh show` on each machine; 503 naming every machine that cannot be read. */
  async #read(ids: string[]): Promise<MachineView[]> {
    const views: MachineView[] = [];
    const failures: MachineFailure[] = [];
    for (const id of ids) {
      const r = await this.#exec(id, `${this.entrypoint} show`).catch((e: Error) => e);
      if (!(r instanceof Error) && r.code === NOT_SERVING_YET) {
        views.push({ id, serving: false });
        continue;
      }
      // show prints: host port dbname paused disabled epoch boot_check
      const fields = r instanceof Error ? [] : r.stdout.trim().split(/\s+/);
      if (r instanceof Error || r.code !== 0 || fields.length < 6) {
        failures.push(failureOf(id, r));
        continue;
      }
      const [host, port, dbname, paused, disabled, epoch, bootCheck] = fields;
      views.push({
        id,
        serving: true,
        bootCheck: bootCheck === "1",
        route: {
          target: { host, port: Number(port), dbname },
          epoch: epoch !== "-" ? Number(epoch) : null,
          paused: paused === "1",
          disabled: disabled === "1",
        },
      });
    }
    if (failures.length) throw machinesFailed("fly_machine_unreadable", "cannot be read", failures);
    return views;
  }

  /**
   * Where every serving machine routes the database, at the oldest epoch any of them holds;
   * 503 naming them when they route to different upstreams, or when none serves.
   */
  async current(): Promise<RouteState> {
    // No waiting here: probes poll this under a deadline. Machines not serving are reported.
    const fleet = classify(await this.machines());
    const views = await this.#read(fleet.started.map((m) => m.id));
    const notServing: IdleMachine[] = [
      ...[...fleet.idle, ...fleet.suspended, ...fleet.moving].map(({ id, state }) => ({
        id,
        state,
      })),
      ...views.filter((v) => !v.serving).map(({ id }) => ({ id, state: "booting" })),
    ];
    const serving = views.filter((v) => v.serving);
    if (serving.length === 0) {
      throw new HttpError(
        503,
        "fly_no_machine_serving",
        `No PgBouncer machine of the Fly app serves now${
          notServing.length ? `: ${named(notServing)}` : ""
        }.`,
        { machines: notServing },
      );
    }
    const key = (v: typeof serving[number]) => JSON.stringify(v.route.target);
    if (serving.some((v) => key(v) !== key(serving[0]))) {
      const where = serving.map((v) =>
        `${v.id} → ${v.route.target!.host}:${v.route.target!.port} at epoch ${v.route.epoch ?? "-"}`
      );
      throw new HttpError(
        503,
        "pgbouncer_disagree",
        `The PgBouncer machines route the database to different upstreams: ${where.join("; ")}.`,
        { machines: serving.map((v) => ({ id: v.id, ...v.route })) },
      );
    }
    // Same upstream, different epochs: the oldest is reported, so health probes flag the machine
    // that lags and setup or the failover's repoint routes it forward.
    const epochs = serving.map((v) => v.route.epoch);
    return {
      target: serving[0].route.target,
      epoch: epochs.includes(null) ? null : Math.min(...(epochs as number[])),
      paused: serving.some((v) => v.route.paused),
      disabled: serving.some((v) => v.route.disabled),
      notServing,
    };
  }

  /** PAUSE on every started machine, all-or-nothing: on a failure the paused ones are resumed. */
  async pause(timeoutMs: number): Promise<void> {
    const seconds = Math.max(1, Math.ceil(timeoutMs / 1000));
    const ids = requireStarted(await this.#settled());
    await this.#leased(ids, async () => {
      const failures = await this.#execEach(ids, `${this.entrypoint} pause ${seconds}`, true);
      if (failures.length === 0) return;
      const paused = ids.slice(0, ids.indexOf(failures[0].id));
      await this.#execEach(paused, `${this.entrypoint} resume`);
      throw machinesFailed("fly_pause_failed", "could not be paused", failures);
    });
  }

  /** RESUME on every started machine (all are tried; the ones that failed are named). */
  async resume(): Promise<void> {
    const ids = requireStarted(await this.#settled());
    await this.#leased(ids, async () => {
      const failures = await this.#execEach(ids, `${this.entrypoint} resume`);
      if (failures.length) throw machinesFailed("fly_resume_failed", "could not resume", failures);
    });
  }

  /**
   * Routes every started machine at `epoch`, then lists the machines again and routes any that
   * started meanwhile. There is no undo: a route only moves forward in epoch, so a machine that
   * fails makes the route fail closed (503 naming it) after the others were routed, and a retry
   * routes the rest forward at the same epoch. Machines that do not serve are reported; each
   * reconciles its route in the boot check before it serves, which every serving machine must
   * have configured (ACTIVE_URLS) when some are stopped.
   */
  async route(target: pgb.RouteTarget, epoch: number): Promise<RouteReport> {
    pgb.renderDatabasesFile(this.database, target, epoch); // validates the values
    const routed: string[] = [];
    let fleet = await this.#settled();
    requireStarted(fleet);
    for (let round = 0;; round++) {
      const todo = fleet.started.map((m) => m.id).filter((id) => !routed.includes(id));
      if (todo.length === 0) break;
      if (round === 5) {
        throw new HttpError(
          503,
          "fly_machines_churn",
          `Fly machines keep starting while routing (${todo.join(", ")}); retry.`,
        );
      }
      await this.#leased(todo, () => this.#routeMachines(todo, fleet.idle, target, epoch));
      routed.push(...todo);
      fleet = await this.#settled();
    }
    return {
      routed,
      notServing: fleet.idle.map(({ id, state }) => ({ id, state })),
    };
  }

  /** One round of `route`, under the machines' leases: check every machine, then route each. */
  async #routeMachines(
    ids: string[],
    idle: FlyMachine[],
    target: pgb.RouteTarget,
    epoch: number,
  ): Promise<void> {
    const views = await this.#read(ids);
    for (const v of views) {
      if (!v.serving) continue; // booting: its entrypoint decides under its route lock
      try {
        checkEpochOrder(v.route, target, epoch); // each machine's entrypoint refuses too
      } catch (e) {
        if (e instanceof HttpError) {
          throw new HttpError(e.status, e.code, `Fly machine ${v.id}: ${e.message}`);
        }
        throw e;
      }
    }
    if (idle.length && views.some((v) => v.serving && !v.bootCheck)) {
      throw new HttpError(
        503,
        "fly_boot_check_off",
        `Fly machine ${
          named(idle)
        } is not running and the app's machines have no boot check (ACTIVE_URLS): it would serve its old route when started. Set ACTIVE_URLS and HEALTH_TOKEN, or destroy it, then retry.`,
        { machines: idle.map(({ id, state }) => ({ id, state })) },
      );
    }
    const cmd = `${this.entrypoint} route ${target.host} ${target.port} ${target.dbname} ${epoch}`;
    const failures = await this.#execEach(ids, cmd);
    if (failures.length) {
      const stale = failures.some((f) => f.stale);
      throw machinesFailed(
        stale ? "stale_epoch" : "fly_route_failed",
        `could not be routed to ${target.host}:${target.port} at epoch ${epoch} (the others were; a retry routes the rest)`,
        failures,
        stale ? 409 : 503,
      );
    }
  }
}

function requireStarted(fleet: Fleet): string[] {
  if (fleet.started.length === 0) {
    throw new HttpError(
      503,
      "fly_no_machine_serving",
      `No started PgBouncer machine in the Fly app${
        fleet.idle.length ? ` (${named(fleet.idle)})` : ""
      }.`,
      { machines: fleet.idle.map(({ id, state }) => ({ id, state })) },
    );
  }
  return fleet.started.map((m) => m.id);
}

function machinesFailed(
  code: string,
  what: string,
  failures: MachineFailure[],
  status: 409 | 503 = 503,
): HttpError {
  const list = failures.map((f) => `${f.id} (${f.reason})`).join(", ");
  return new HttpError(
    status,
    code,
    `Fly machine${failures.length > 1 ? "s" : ""} ${list} ${what}.`,
    { machines: failures.map(({ id, reason }) => ({ id, reason })) },
  );
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
