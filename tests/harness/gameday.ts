/**
 * The randomized game day: switchovers, failbacks and emergency failovers back to back while
 * writers of every kind run, one injected fault per iteration, and the HA invariants checked
 * after each iteration:
 *
 *   - every acknowledged write exists on the final primary, except writes an emergency may lose
 *     by design: on the old primary, after the last heartbeat the standby applied and before the
 *     promotion (the RPO window the operation reports);
 *   - no write is ever accepted by a fenced site or by the standby (such a write could never reach
 *     the final primary, so the first invariant catches it; an acknowledgement on an emergency's
 *     old primary after the promotion is a violation even inside the window);
 *   - PgBouncer never routes to a fenced site while it is not paused (sampled every 100 ms);
 *   - every operation ends succeeded, rolled back, or failed closed with a reason (then resumed).
 *
 * Writers: through PgBouncer (the application path); the Data API's transaction against each
 * site; `SET default_transaction_read_only = off` sessions against each site; and one long-lived
 * pooled connection to the original primary opened before the first fence. A seeded PRNG picks
 * the operations and faults, so a failing seed reproduces (GAMEDAY_SEED).
 */
import { createSql, healingSql } from "../../shared/db/mod.ts";
import { sleep } from "../../shared/ha/deadline.ts";
import { EMERGENCY_STEPS, PLANNED_STEPS } from "../../shared/ha/failover.ts";
import { parseDatabasesFile } from "../../shared/ha/pgbouncer.ts";
import type { SiteName } from "../../shared/ha/sites.ts";
import { DataApi } from "./data_api.ts";
import { failoverClient, healthClient } from "./ha_client.ts";
import { haPlatform, type OperationView, waitOperation, waitReplicating, Writers } from "./ha.ts";
import { serveFunctions } from "./functions.ts";
import type { PgCluster } from "./postgres.ts";
import { waitFor } from "./process.ts";
import type { Stack } from "./stack.ts";
import type { Env } from "../../shared/config/mod.ts";
import type { FlyStandIn } from "./fly.ts";
import type { PgBouncer } from "./pgbouncer.ts";

/** The game day through the Fly router: two PgBouncer machines behind the Machines API stand-in. */
export interface FlyFleet {
  fly: FlyStandIn;
  machines: PgBouncer[];
  /** The functions' environment with PGBOUNCER_ROUTER=fly. */
  env: Env;
  /** Functions served with that environment. */
  failoverUrl: string;
  healthUrl: string;
}

/** mulberry32: small, seedable, good enough to pick faults. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export const FAULTS = [
  "driver_killed",
  "partition_emergency",
  "pgbouncer_restart",
  "lease_expiry",
  "two_drivers",
  "replayed_key",
  "standby_stopped",
  "fly_machine_stopped",
] as const;
export type FaultKind = typeof FAULTS[number];

interface Ack {
  writer: number;
  n: number;
  at: number;
  site: SiteName | "pgbouncer";
}

/** A loop of single-row writes straight to one site, recording acknowledgements. */
class SiteWriter {
  readonly acks: Ack[] = [];
  refused = 0;
  #stop = false;
  #task?: Promise<void>;
  #n = 0;

  constructor(
    readonly site: SiteName,
    readonly writer: number,
    readonly write: (sql: string) => Promise<boolean>,
    readonly close: () => Promise<void>,
  ) {}

  start(): this {
    this.#task = (async () => {
      while (!this.#stop) {
        const n = ++this.#n;
        let ok = false;
        try {
          ok = await this.write(
            `insert into public.ledger (writer, n) values (${this.writer}, ${n})`,
          );
        } catch {
          ok = false;
        }
        if (ok) this.acks.push({ writer: this.writer, n, at: Date.now(), site: this.site });
        else this.refused++;
        await sleep(40);
      }
    })();
    return this;
  }

  async stop(): Promise<void> {
    this.#stop = true;
    await this.#task;
    await this.close();
  }
}

function dataApiWriter(c: PgCluster, site: SiteName, writer: number): SiteWriter {
  const api = DataApi.for(c);
  return new SiteWriter(site, writer, async (sql) => (await api.write(sql)).ok, () => api.close());
}

/**
 * A client that lifts the read-only default for its session before each write (its own
 * statement: in one multi-statement query the INSERT would still run in the read-only
 * transaction the SET started in, and only the read-only default would be tested).
 */
function readOnlyOffWriter(c: PgCluster, site: SiteName, writer: number): SiteWriter {
  const pool = healingSql(() => c.url("app_writer"), { max: 1, connectTimeout: 2 });
  return new SiteWriter(site, writer, async (sql) => {
    const session = await pool.get().reserve();
    try {
      await session`set default_transaction_read_only = off`;
      await session.unsafe(sql);
    } finally {
      session.release();
    }
    return true;
  }, () => pool.close());
}

/** A pooled connection opened before the first fence, reused for every write (reconnecting). */
function longLivedWriter(c: PgCluster, site: SiteName, writer: number): SiteWriter {
  const sql = createSql(c.url("app_writer"), {
    max: 1,
    connectTimeout: 2,
    applicationName: "sa-toolkit/failover", // a name that used to exempt sessions from the fence
  });
  return new SiteWriter(site, writer, async (q) => {
    await sql`set default_transaction_read_only = off`;
    await sql.unsafe(q);
    return true;
  }, () => sql.end({ timeout: 1 }));
}

export interface EmergencyWindow {
  source: SiteName;
  /** Acknowledged on the source after this (the last heartbeat the standby applied) may be lost. */
  heartbeatAt: number;
  /** The new primary was lifted no earlier than this. */
  promotedAt: number;
}

export interface GameDayReport {
  seed: number;
  iterations: number;
  operations: Record<string, number>;
  outcomes: Record<string, number>;
  faults: Record<string, number>;
  acknowledged: number;
  lostInEmergencyWindows: number;
  violations: string[];
  log: string[];
}

/** Runs the game day on an HA stack (ha, functions, partitionable) after setupHa. */
export class GameDay {
  readonly rand: () => number;
  readonly report: GameDayReport;
  readonly #stack: Stack;
  readonly #f: ReturnType<typeof failoverClient>;
  readonly #h: ReturnType<typeof healthClient>;
  #app: Writers;
  #site: SiteWriter[] = [];
  #windows: EmergencyWindow[] = [];
  #keys: string[] = [];
  #monitor?: Promise<void>;
  #monitoring = false;
  #primary: SiteName = "primary";

  readonly #fleet?: FlyFleet;
  readonly #order: FaultKind[];
  #extraApp?: Writers;

  constructor(stack: Stack, readonly seed: number, fleet?: FlyFleet) {
    this.#stack = stack;
    this.#fleet = fleet;
    this.rand = prng(seed);
    this.#f = fleet ? clientAt(fleet.failoverUrl, stack.tokens.failover) : failoverClient(stack);
    this.#h = fleet ? healthAt(fleet.healthUrl, stack.tokens.health) : healthClient(stack);
    this.#app = new Writers(stack.pgbouncer!.url(), 2, 20, 1);
    if (fleet && fleet.machines[1]) this.#extraApp = new Writers(fleet.machines[1].url(), 1, 20, 3);
    // Every fault kind once (in a seeded order), then at random.
    const kinds = FAULTS.filter((k) => fleet || k !== "fly_machine_stopped");
    this.#order = kinds.map((k) => ({ k, r: this.rand() })).sort((a, b) => a.r - b.r).map((x) =>
      x.k
    );
    this.report = {
      seed,
      iterations: 0,
      operations: {},
      outcomes: {},
      faults: {},
      acknowledged: 0,
      lostInEmergencyWindows: 0,
      violations: [],
      log: [],
    };
  }

  #pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.rand() * xs.length)];
  }

  #count(map: Record<string, number>, key: string): void {
    map[key] = (map[key] ?? 0) + 1;
  }

  #note(line: string): void {
    this.report.log.push(`[${this.report.iterations}] ${line}`);
  }

  #cluster(site: SiteName): PgCluster {
    return site === "primary" ? this.#stack.primary! : this.#stack.standby!;
  }

  #other(site: SiteName): SiteName {
    return site === "primary" ? "standby" : "primary";
  }

  async start(): Promise<void> {
    const s = this.#stack;
    // The long-lived pooled connection is opened now, before the first fence.
    this.#site = [
      longLivedWriter(s.primary!, "primary", 300),
      dataApiWriter(s.primary!, "primary", 100),
      dataApiWriter(s.standby!, "standby", 200),
      readOnlyOffWriter(s.primary!, "primary", 110),
      readOnlyOffWriter(s.standby!, "standby", 210),
    ];
    this.#app.start();
    this.#extraApp?.start();
    for (const w of this.#site) w.start();
    this.#monitoring = true;
    this.#monitor = this.#watchRouting();
    await this.#app.progress(50);
  }

  /** PgBouncer never routes, unpaused, to a fenced site. */
  async #watchRouting(): Promise<void> {
    const s = this.#stack;
    const clients = new Map<string, ReturnType<typeof createSql>>();
    const client = (name: string, url: string, admin = false) => {
      if (!clients.has(name)) {
        clients.set(name, createSql(url, { max: 1, connectTimeout: 1, adminConsole: admin }));
      }
      return clients.get(name)!;
    };
    const drop = async (name: string) => {
      await clients.get(name)?.end({ timeout: 1 }).catch(() => {});
      clients.delete(name);
    };
    while (this.#monitoring) {
      for (const [i, bouncer] of this.#bouncers().entries()) {
        const admin = `pgbouncer-${i}`;
        try {
          if (!bouncer.running) continue;
          const file = parseDatabasesFile(
            await Deno.readTextFile(bouncer.databasesFile),
            "postgres",
          );
          const rows = await client(admin, bouncer.adminUrl(), true).unsafe("SHOW DATABASES")
            .simple();
          const row = rows.find((r: Record<string, unknown>) => r.name === "postgres");
          const paused = Number(row?.paused) === 1;
          for (const c of [s.primary!, s.standby!]) {
            const ports = [c.port, s.proxies?.[c.name as SiteName]?.port];
            if (!ports.includes(file.target?.port)) continue;
            const [st] = await client(
              c.name,
              c.url("supabase_admin"),
            )`select role, epoch from ha.state`
              .catch(async () => {
                await drop(c.name);
                return [];
              });
            if (st && st.role === "fenced" && !paused) {
              this.report.violations.push(
                `PgBouncer ${i} routed (unpaused) to fenced site ${c.name} at epoch ${file.epoch}`,
              );
            }
          }
        } catch {
          // PgBouncer or a site is down at this instant (a fault): nothing to judge.
          await drop(admin);
        }
      }
      await sleep(100);
    }
    for (const name of [...clients.keys()]) await drop(name);
  }

  /** One iteration: an operation with one fault, then settle and check. */
  async iterate(): Promise<void> {
    this.report.iterations++;
    const fault = this.#order[this.report.iterations - 1] ?? this.#pick(this.#order);
    this.#count(this.report.faults, fault);
    this.#note(`fault ${fault}, primary is site ${this.#primary}`);
    switch (fault) {
      case "driver_killed":
        await this.#driverKilled();
        break;
      case "partition_emergency":
        await this.#partitionEmergency();
        break;
      case "pgbouncer_restart":
        await this.#pgbouncerRestart();
        break;
      case "lease_expiry":
        await this.#leaseExpiry();
        break;
      case "two_drivers":
        await this.#twoDrivers();
        break;
      case "replayed_key":
        await this.#replayedKey();
        break;
      case "standby_stopped":
        await this.#standbyStopped();
        break;
      case "fly_machine_stopped":
        await this.#flyMachineStopped();
        break;
    }
    await this.#settle();
    await this.check();
  }

  async #post(base: string, path: string, body: unknown) {
    const res = await fetch(`${base}${path}`, {
      method: "POST",
      headers: {
        authorization: `Bearer ${this.#stack.tokens.failover}`,
        "content-type": "application/json",
      },
      body: JSON.stringify(body),
    });
    return { status: res.status, body: await res.json() };
  }

  /** Drives an operation to an end; a failed_closed one is resumed (the operator's move). */
  async #finish(id: string, key?: string): Promise<OperationView> {
    for (let attempt = 0; attempt < 4; attempt++) {
      const op = await waitOperation(this.#f.base, this.#f.token, id, { timeoutMs: 90_000 });
      if (op.state !== "failed_closed") return this.#outcome(op);
      this.#count(this.report.outcomes, "failed_closed");
      if (!op.error) this.report.violations.push(`operation ${id} failed closed without a reason`);
      this.#note(`failed closed at ${op.step}: ${op.error}; resuming`);
      const r = key
        ? await this.#f.post("/", { mode: this.#modeOf(op), idempotency_key: key })
        : await this.#f.post(`/operations/${id}/resume`, {});
      if (r.status !== 202) {
        this.report.violations.push(
          `resume of ${id} answered ${r.status} ${JSON.stringify(r.body)}`,
        );
        return op;
      }
    }
    return await waitOperation(this.#f.base, this.#f.token, id);
  }

  #modeOf(op: OperationView): string {
    return (op as unknown as { kind: string }).kind === "emergency" ? "emergency" : "planned";
  }

  #outcome(op: OperationView): OperationView {
    this.#count(this.report.outcomes, op.state);
    this.#note(`operation ${op.state}${op.error ? `: ${op.error}` : ""}`);
    if (!["succeeded", "rolled_back"].includes(op.state)) {
      this.report.violations.push(`operation ${op.operation_id} ended ${op.state}: ${op.error}`);
    }
    if (op.state === "rolled_back" && !op.error) {
      this.report.violations.push(`operation ${op.operation_id} rolled back without a reason`);
    }
    if (op.state === "succeeded") {
      const target = (op as unknown as { target: SiteName }).target;
      this.#primary = target;
    }
    return op;
  }

  async #planned(body: Record<string, unknown> = {}): Promise<OperationView | undefined> {
    const key = `gd-${this.seed}-${this.report.iterations}-${Math.floor(this.rand() * 1e9)}`;
    const r = await this.#f.post("/", { mode: "planned", idempotency_key: key, ...body });
    this.#count(this.report.operations, this.#primary === "standby" ? "failback" : "switchover");
    if (r.status !== 202) {
      this.#note(`planned refused: ${r.status} ${r.body.error}`);
      return undefined;
    }
    this.#keys.push(key);
    return await this.#finish(String(r.body.operation_id), key);
  }

  async #driverKilled(): Promise<void> {
    const emergency = this.rand() < 0.3;
    const steps = emergency ? EMERGENCY_STEPS : PLANNED_STEPS;
    const step = this.#pick(steps);
    const how = this.rand() < 0.5 ? "crashAfter" : "crashDuring";
    this.#note(`${emergency ? "emergency" : "planned"} driver killed ${how} ${step}`);
    const key = `gd-kill-${this.seed}-${this.report.iterations}`;
    if (emergency) this.#cut(this.#primary);
    const server = await serveFunctions(this.#env(), {
      deps: { failover: { faults: { [how]: step }, leaseMs: 1000 } },
    });
    let id = "";
    try {
      const r = await this.#post(server.url("failover"), "/", {
        mode: emergency ? "emergency" : "planned",
        idempotency_key: key,
      });
      this.#count(this.report.operations, emergency ? "emergency" : "switchover");
      if (r.status !== 202) {
        this.#note(`refused: ${r.status} ${r.body.error}`);
        if (emergency) this.#heal(this.#primary);
        return;
      }
      id = String(r.body.operation_id);
      await waitOperation(server.url("failover"), this.#stack.tokens.failover, id, {
        until: (o) => o.driver === "lost (resume it)" || o.state !== "running",
        timeoutMs: 60_000,
      });
    } finally {
      await server.stop();
    }
    const again = await this.#f.post("/", {
      mode: emergency ? "emergency" : "planned",
      idempotency_key: key,
    });
    if (again.status !== 202 && again.status !== 200) {
      this.report.violations.push(
        `resuming ${id} answered ${again.status} ${JSON.stringify(again.body)}`,
      );
    }
    const source = this.#primary;
    const op = await this.#finish(id, key);
    if (emergency) await this.#afterEmergency(op, source);
  }

  #env(): Env {
    return this.#fleet?.env ?? this.#stack.env();
  }

  /** Every PgBouncer of the endpoint (one, or the Fly machines). */
  #bouncers(): PgBouncer[] {
    return this.#fleet?.machines ?? [this.#stack.pgbouncer!];
  }

  /** A machine is stopped just before the router runs its route command there. */
  async #flyMachineStopped(): Promise<void> {
    const fleet = this.#fleet!;
    const victim = fleet.machines[1];
    const victimId = fleet.fly.machineIds[1];
    let stopped = false;
    fleet.fly.beforeExec = async (id, argv) => {
      if (!stopped && id === victimId && argv.includes("route")) {
        stopped = true;
        await victim.stop();
      }
    };
    try {
      await this.#planned();
    } finally {
      fleet.fly.beforeExec = undefined;
    }
    this.#note(`machine ${victimId} ${stopped ? "was stopped during routing" : "was not reached"}`);
    if (stopped) {
      // Its boot check reconciles the persisted route before it serves again.
      await victim.start();
      const [host, port] = await routeOf(victim);
      const primary = this.#cluster(this.#primary);
      const proxy = this.#stack.proxies?.[this.#primary]?.port;
      if (host !== "127.0.0.1" || ![primary.port, proxy].includes(port)) {
        this.report.violations.push(
          `machine ${victimId} booted routing to port ${port}, not site ${this.#primary}`,
        );
      }
    }
  }

  #cut(site: SiteName): void {
    this.#stack.proxies![site].cut();
    haPlatform(this.#stack).net[site].cut();
  }

  #heal(site: SiteName): void {
    this.#stack.proxies![site].heal();
    haPlatform(this.#stack).net[site].heal();
  }

  async #partitionEmergency(): Promise<void> {
    const source = this.#primary;
    this.#cut(source);
    this.#note(`site ${source} cut off; emergency failover`);
    const r = await this.#f.post("/", { mode: "emergency" });
    this.#count(this.report.operations, "emergency");
    if (r.status !== 202) {
      this.report.violations.push(`emergency refused: ${r.status} ${JSON.stringify(r.body)}`);
      this.#heal(source);
      return;
    }
    const op = await this.#finish(String(r.body.operation_id));
    await this.#afterEmergency(op, source);
  }

  /** Records the RPO window, heals the partition, waits for the fence, rejoins the old site. */
  async #afterEmergency(op: OperationView, source: SiteName): Promise<void> {
    if (op.state === "succeeded") {
      const target = this.#other(source);
      const sql = this.#cluster(target).sql("supabase_admin", { max: 1 });
      const [started] = await sql`
        select at from ha.operation_steps
        where operation_id = ${op.operation_id} and step = 'epoch' and outcome = 'started'
        order by id limit 1`;
      await sql.end();
      const rpo = op.data.rpo as { heartbeat_at?: string } | undefined;
      this.#windows.push({
        source,
        heartbeatAt: rpo?.heartbeat_at ? Date.parse(rpo.heartbeat_at) : 0,
        promotedAt: new Date(started.at).getTime(),
      });
    }
    this.#heal(source);
    if (op.state !== "succeeded") return;
    await waitFor(
      `site ${source} to be fenced by its own lease tick`,
      async () => {
        const sql = this.#cluster(source).sql("supabase_admin", { max: 1 });
        const [s] = await sql`select role from ha.state`.catch(() => [{ role: "?" }]);
        await sql.end();
        return s.role === "fenced";
      },
      30_000,
      200,
    );
    const r = await this.#f.post("/rejoin", { site: source, discard_unreplicated: true });
    if (r.status !== 200) {
      this.report.violations.push(
        `rejoin of ${source} answered ${r.status} ${JSON.stringify(r.body)}`,
      );
    }
  }

  async #pgbouncerRestart(): Promise<void> {
    const key = `gd-pgb-${this.seed}-${this.report.iterations}`;
    const r = await this.#f.post("/", { mode: "planned", idempotency_key: key });
    this.#count(this.report.operations, "switchover");
    if (r.status !== 202) {
      this.#note(`planned refused: ${r.status} ${r.body.error}`);
      return;
    }
    await sleep(Math.floor(this.rand() * 600));
    this.#note("PgBouncer restarted during the operation");
    await this.#stack.pgbouncer!.stop();
    await this.#stack.pgbouncer!.start();
    await this.#finish(String(r.body.operation_id), key);
  }

  async #leaseExpiry(): Promise<void> {
    const tick = haPlatform(this.#stack).leaseTick[this.#primary];
    const ttl = haPlatform(this.#stack).lease!.ttlSeconds * 1000;
    tick.pause();
    this.#note(`site ${this.#primary}'s lease renewals stopped for a TTL`);
    await sleep(ttl + 500);
    tick.resume();
    await this.#planned();
  }

  async #twoDrivers(): Promise<void> {
    const [a, b] = await Promise.all([
      serveFunctions(this.#env()),
      serveFunctions(this.#env()),
    ]);
    try {
      const answers = await Promise.all([a, b].map((s, i) =>
        this.#post(s.url("failover"), "/", {
          mode: "planned",
          idempotency_key: `gd-two-${this.seed}-${this.report.iterations}-${i}`,
        })
      ));
      this.#count(this.report.operations, "switchover");
      const started = answers.filter((x) => x.status === 202);
      this.#note(`two drivers: ${answers.map((x) => x.status).join(" and ")}`);
      if (started.length > 1) {
        this.report.violations.push("two concurrent operations were both started");
      }
      for (const s of started) {
        await waitOperation(
          a.url("failover"),
          this.#stack.tokens.failover,
          String(s.body.operation_id),
          {
            timeoutMs: 90_000,
          },
        );
        await this.#finish(String(s.body.operation_id));
      }
    } finally {
      await Promise.all([a.stop(), b.stop()]);
    }
  }

  async #replayedKey(): Promise<void> {
    const old = this.#keys.length ? this.#pick(this.#keys) : undefined;
    if (old) {
      const r = await this.#f.post("/", { mode: "planned", idempotency_key: old });
      this.#note(`replayed key ${old}: ${r.status} ${r.body.state ?? r.body.error}`);
      if (r.status === 202) this.report.violations.push(`a replayed key ${old} started work again`);
    }
    await this.#planned();
  }

  async #standbyStopped(): Promise<void> {
    const standby = this.#cluster(this.#other(this.#primary));
    await standby.stop("fast");
    const planned = await this.#f.post("/", { mode: "planned" });
    const emergency = await this.#f.post("/", { mode: "emergency" });
    this.#note(`standby stopped: planned ${planned.status}, emergency ${emergency.status}`);
    for (const r of [planned, emergency]) {
      if (r.status !== 412) {
        this.report.violations.push(`with the standby down: ${r.status} ${JSON.stringify(r.body)}`);
      }
    }
    await standby.start();
    await waitReplicating(this.#stack);
    await this.#planned();
  }

  /** Waits until the pair is healthy again: a primary, an applying standby, PgBouncer on it. */
  async #settle(): Promise<void> {
    let last = "";
    try {
      await waitFor(
        "the pair to settle",
        async () => {
          const [p, s, b] = await Promise.all([
            this.#h.get("/primary"),
            this.#h.get("/standby"),
            this.#h.get("/pgbouncer"),
          ]);
          if (p.status === 200) this.#primary = p.body.site as SiteName;
          last = [p, s, b].map((x) => `${x.status} ${x.body.reason ?? ""}`).join(" | ");
          return p.status === 200 && s.status === 200 && b.status === 200;
        },
        60_000,
        200,
      );
    } catch (e) {
      const execs = (this.#fleet?.fly.requests ?? []).filter((q) =>
        q.path.endsWith("/exec") &&
        !String((q.body as { cmd?: string })?.cmd ?? "").endsWith(" show")
      ).slice(-30).map((q) =>
        `${q.path.split("/")[5]} ${
          String((q.body as { cmd?: string })?.cmd ?? "").split(" ").slice(1).join(" ")
        } → ${q.status}`
      );
      const ops = await Promise.all((["primary", "standby"] as SiteName[]).map(async (site) => {
        const c = this.#cluster(site).sql("supabase_admin", { max: 1 });
        const rows = await c`select id, kind, state, step, epoch_from, epoch_to, created_at
          from ha.operations order by created_at`.catch(() => []);
        await c.end();
        return `${site}: ${JSON.stringify(rows)}`;
      }));
      const files = await Promise.all(
        this.#bouncers().map((b) => Deno.readTextFile(b.databasesFile).catch(() => "?")),
      );
      throw new Error(
        `${(e as Error).message}; last probes: ${last}\nops:\n${ops.join("\n")}\nfiles ${
          JSON.stringify(files)
        }\nfly execs:\n${execs.join("\n")}\n${
          [...this.report.log, ...this.report.violations].join("\n")
        }`,
      );
    }
    try {
      await this.#app.progress(20, 30_000);
    } catch (e) {
      throw new Error(
        `${(e as Error).message}; writer errors ${JSON.stringify(this.#app.errors)} ${
          JSON.stringify(this.#app.lastError)
        }; routes ${
          JSON.stringify(
            await Promise.all(
              this.#bouncers().map((b) => Deno.readTextFile(b.databasesFile).catch(() => "?")),
            ),
          )
        }; proxies ${this.#stack.proxies?.primary.port}/${this.#stack.proxies?.standby.port}; sites ${
          JSON.stringify(
            await Promise.all(["primary", "standby"].map(async (site) => {
              const c = this.#cluster(site as SiteName).sql("supabase_admin", { max: 1 });
              const r = await c`select s.role, s.epoch, s.lease_until, s.write_token,
                (select last_value from ha.write_token) as token, f.* from ha.state s, ha.fence_status() f`;
              await c.end();
              return { site, ...r[0] };
            })),
          )
        }\n${this.report.log.join("\n")}`,
      );
    }
  }

  /** Every acknowledged write is on the current primary, except inside emergency windows. */
  async check(): Promise<void> {
    // The primary from the control rows themselves (probe answers are shared for a second).
    const states = await Promise.all((["primary", "standby"] as SiteName[]).map(async (site) => {
      const c = this.#cluster(site).sql("supabase_admin", { max: 1 });
      const [st] = await c`select role, epoch from ha.state`;
      await c.end();
      return { site, role: st.role as string, epoch: Number(st.epoch) };
    }));
    const newest = Math.max(...states.map((x) => x.epoch));
    const acting = states.find((x) => x.role === "primary" && x.epoch === newest);
    if (!acting) throw new Error(`no primary at epoch ${newest}: ${JSON.stringify(states)}`);
    this.#primary = acting.site;
    // The acknowledgements first, the rows second: writers keep running, and an acknowledgement
    // taken after the read could not be in it.
    const acks: Ack[] = [...this.#site.flatMap((w) => w.acks)];
    for (const app of [this.#app, this.#extraApp]) {
      if (!app) continue;
      for (const [writer, list] of app.acked) {
        for (const n of list) {
          acks.push({ writer, n, at: app.ackedAt.get(`${writer}:${n}`)!, site: "pgbouncer" });
        }
      }
    }
    const sql = this.#cluster(this.#primary).sql("supabase_admin", { max: 1 });
    const rows = await sql`select writer, n from public.ledger`;
    await sql.end();
    const have = new Set(rows.map((r) => `${r.writer}:${r.n}`));
    let lost = 0;
    const violations: string[] = [];
    for (const a of acks) {
      if (have.has(`${a.writer}:${a.n}`)) continue;
      const excused = this.#windows.some((w) =>
        (a.site === w.source || a.site === "pgbouncer") && a.at > w.heartbeatAt &&
        a.at < w.promotedAt
      );
      if (excused) lost++;
      else {violations.push(
          `acknowledged write ${a.writer}:${a.n} on ${a.site} at ${
            new Date(a.at).toISOString()
          } is missing`,
        );}
    }
    if (violations.length) {
      // Where are the missing rows? (for the report)
      const missing = acks.filter((a) => !have.has(`${a.writer}:${a.n}`));
      for (const site of ["primary", "standby"] as SiteName[]) {
        const c = this.#cluster(site).sql("supabase_admin", { max: 1 });
        const found = await c`
          select l.writer, l.n, l.at from public.ledger l
          join unnest(${missing.map((a) => a.writer)}::int[], ${
          missing.map((a) => a.n)
        }::int[]) m(w, n)
            on l.writer = m.w and l.n = m.n`.catch((e) => [{ error: String(e) }]);
        const [st] = await c`select role, epoch from ha.state`.catch(() => [{}]);
        await c.end();
        violations.push(
          `  rows on site ${site} (${JSON.stringify(st)}): ${JSON.stringify(found).slice(0, 400)}`,
        );
      }
    }
    this.report.acknowledged = acks.length;
    this.report.lostInEmergencyWindows = lost;
    this.report.violations.push(...new Set(violations.slice(0, 20)));
    if (this.report.violations.length) {
      throw new Error(
        `seed ${this.seed}, iteration ${this.report.iterations}: ${this.report.violations.length} violation(s)\n${
          this.report.violations.join("\n")
        }\n--- log ---\n${this.report.log.join("\n")}`,
      );
    }
  }

  async stop(): Promise<void> {
    this.#monitoring = false;
    await this.#monitor;
    await Promise.all(this.#site.map((w) => w.stop()));
    const stats = await this.#app.stop();
    if (this.#extraApp) {
      stats.duplicateKeyErrors += (await this.#extraApp.stop()).duplicateKeyErrors;
    }
    if (stats.duplicateKeyErrors) {
      this.report.violations.push(
        `${stats.duplicateKeyErrors} duplicate key errors through PgBouncer`,
      );
    }
  }
}

function clientAt(base: string, token: string) {
  const headers = { authorization: `Bearer ${token}`, "content-type": "application/json" };
  const call = async (path: string, init: RequestInit) => {
    const res = await fetch(`${base}${path}`, init);
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : {}, ms: 0 };
  };
  return {
    base,
    token,
    get: (path: string) => call(path, { headers }),
    post: (path: string, body: unknown = {}) =>
      call(path, { method: "POST", headers, body: JSON.stringify(body) }),
  };
}

function healthAt(base: string, token: string) {
  return {
    base,
    get: async (path: string) => {
      const res = await fetch(`${base}${path}`, { headers: { authorization: `Bearer ${token}` } });
      return { status: res.status, body: await res.json(), ms: 0 };
    },
  };
}

async function routeOf(m: PgBouncer): Promise<[string, number]> {
  const admin = m.admin();
  const rows = await admin.unsafe("SHOW DATABASES").simple();
  const row = rows.find((r: Record<string, unknown>) => r.name === "postgres")!;
  return [String(row.host), Number(row.port)];
}
