/**
 * The failover state machine. A plan (source, target, epochs, guardrails) is checked first and
 * nothing changes unless every guardrail passes. The operation then runs step by step; each step
 * is check-then-act (safe to run twice), writes an audit row, and the current step is persisted,
 * so a crashed driver's operation resumes where it stopped.
 *
 *   planned / failback: seq_prebump → wait_lag → pause → freeze → marker → wait_marker → seq_sync
 *     → detach → reverse → repoint → verify_routing → epoch → resume → postcheck
 *   emergency: pause → rpo → detach → seq_sync → repoint → verify_routing → epoch → resume → postcheck
 *
 * Planned: a failure before `repoint` rolls back to the starting state (forward subscription
 * re-created, primary unfrozen, PgBouncer resumed) and ends ROLLED_BACK; a failure from `repoint`
 * on ends FAILED_CLOSED with PgBouncer still paused, for an operator (who may resume it).
 * Emergency: any failure ends FAILED_CLOSED; resuming retries the failed step.
 */
import type { Sql } from "../db/mod.ts";
import type { Logger } from "../http/logger.ts";
import { sleep, withDeadline } from "./deadline.ts";
import {
  LeaseLost,
  type NewOperation,
  type Operation,
  type OperationKind,
  OperationStore,
} from "./operations.ts";
import {
  appliedRemoteLsn,
  ensurePublication,
  heartbeatOf,
  publicationTables,
  replicaIdentityProblems,
  slotStatus,
  SUBSCRIPTION,
  subscriptionStatus,
} from "./replication.ts";
import type { HaRuntime, Observation } from "./runtime.ts";
import { schemaDrift, withWritableSession } from "./setup.ts";
import type { SiteName } from "./sites.ts";
import { probeError } from "./state.ts";
import { ensureSubscription } from "./replication.ts";

export const PLANNED_STEPS = [
  "seq_prebump",
  "wait_lag",
  "pause",
  "freeze",
  "marker",
  "wait_marker",
  "seq_sync",
  "detach",
  "reverse",
  "repoint",
  "verify_routing",
  "epoch",
  "resume",
  "postcheck",
] as const;
export const EMERGENCY_STEPS = [
  "pause",
  "rpo",
  "detach",
  "seq_sync",
  "repoint",
  "verify_routing",
  "epoch",
  "resume",
  "postcheck",
] as const;
export type Step = (typeof PLANNED_STEPS)[number] | (typeof EMERGENCY_STEPS)[number];

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

function stepsOf(kind: OperationKind): readonly Step[] {
  return kind === "emergency" ? EMERGENCY_STEPS : PLANNED_STEPS;
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

/** Works out source/target/epochs and evaluates every guardrail; changes nothing. */
export async function plan(
  rt: HaRuntime,
  kind: OperationKind,
  limits: Limits,
  log?: Logger,
): Promise<Plan> {
  const obs = await rt.observe(2500, log);
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
    const running = await new OperationStore(rt.sites.get(target).ops, target).running().catch(() =>
      undefined
    );
    add(
      "no_running_operation",
      !running,
      running ? `operation ${running.id} is running` : "no operation is running",
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
  const tables = (await publicationTables(src)).filter((t) => t !== "ha.markers");
  const hasMarkers = (await publicationTables(src)).includes("ha.markers");
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
  const identity = await replicaIdentityProblems(src);
  add(
    "replica_identity",
    identity.length === 0,
    identity.length
      ? `cannot replicate updates/deletes of: ${identity.map((i) => i.table).join(", ")}`
      : "every published table has a replica identity",
  );
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

/** Raised by the test hook to simulate the driver dying right after a step. */
export class InjectedCrash extends Error {
  constructor(step: string) {
    super(`injected crash after step ${step}`);
    this.name = "InjectedCrash";
  }
}

export class StepFailed extends Error {
  constructor(readonly step: string, message: string) {
    super(message);
    this.name = "StepFailed";
  }
}

export interface MachineOptions {
  owner: string;
  leaseMs: number;
  limits: Limits;
  log: Logger;
  /** Test hook: simulate a crash right after this step completes. */
  crashAfter?: string;
}

export function newOperation(p: Plan, idempotencyKey?: string): NewOperation {
  return {
    kind: p.kind,
    idempotencyKey,
    source: p.source!,
    target: p.target!,
    epochFrom: p.epochFrom!,
    epochTo: p.epochTo!,
    step: stepsOf(p.kind)[0],
    data: {
      marker_token: crypto.randomUUID(),
      post_token: crypto.randomUUID(),
      checks: p.checks,
      started_at: new Date().toISOString(),
    },
  };
}

/** Sessions the freeze leaves alone: ours (the toolkit's functions name themselves sa-toolkit/…). */
const TERMINATE_APP_SESSIONS = `
  select count(pg_terminate_backend(a.pid)) as n from pg_stat_activity a
  where a.datname = current_database() and a.pid <> pg_backend_pid() and a.backend_type = 'client backend'
    and coalesce(a.application_name, '') not like 'sa-toolkit/%'
    and (not (select rolsuper from pg_roles where oid = a.usesysid)
         or (select rolsuper from pg_roles where rolname = current_user))`;

export class FailoverMachine {
  #op: Operation;
  readonly #store: OperationStore;
  #heartbeat?: number;
  #lost = false;

  constructor(
    readonly rt: HaRuntime,
    store: OperationStore,
    op: Operation,
    readonly options: MachineOptions,
  ) {
    this.#store = store;
    this.#op = op;
  }

  get operation(): Operation {
    return this.#op;
  }

  get #src(): Sql {
    return this.rt.sites.get(this.#op.source).ops;
  }

  get #tgt(): Sql {
    return this.rt.sites.get(this.#op.target).ops;
  }

  #endpoint(site: SiteName) {
    const e = this.rt.sites.get(site).endpoint;
    return { host: e.host, port: e.port, dbname: e.database };
  }

  #url(site: SiteName): string {
    return site === "primary" ? this.rt.config.primaryDbUrl! : this.rt.config.standbyDbUrl!;
  }

  async #data(patch: Record<string, unknown>): Promise<void> {
    this.#op = { ...this.#op, data: { ...this.#op.data, ...patch } };
    await this.#store.advance(this.#op.id, this.options.owner, this.#op.step, patch);
  }

  /** Drives the operation from its current step to the end. Never throws. */
  async run(): Promise<Operation> {
    const log = this.options.log.child({ operation_id: this.#op.id, kind: this.#op.kind });
    const steps = stepsOf(this.#op.kind);
    this.#heartbeat = setInterval(() => {
      this.#store.heartbeat(this.#op.id, this.options.owner, this.options.leaseMs).then((ok) => {
        if (!ok) this.#lost = true;
      }).catch(() => {});
    }, Math.max(200, Math.floor(this.options.leaseMs / 3)));
    let index = Math.max(0, steps.indexOf(this.#op.step as Step));
    try {
      await this.#store.transition(this.#op.id, this.options.owner, undefined, steps[index]);
      for (; index < steps.length; index++) {
        const step = steps[index];
        if (this.#lost) throw new LeaseLost(this.#op.id);
        this.#op = { ...this.#op, step };
        const started = performance.now();
        const details = (await this.#runStep(step)) ?? {};
        details.ms = Math.round(performance.now() - started);
        const crash = this.options.crashAfter === step;
        // A crash right after the step: its effect and audit row exist, the move to the next step
        // does not, so resuming runs this step again — which every step must survive.
        if (crash) {
          await this.#store.transition(
            this.#op.id,
            this.options.owner,
            { step, details },
            undefined,
          );
          throw new InjectedCrash(step);
        }
        await this.#store.transition(
          this.#op.id,
          this.options.owner,
          { step, details },
          steps[index + 1],
        );
        log.info("failover_step", { step, ms: details.ms });
      }
      await this.#store.finish(this.#op.id, this.options.owner, "succeeded", null, {
        finished_step: "postcheck",
      });
      this.#op = { ...this.#op, state: "succeeded" };
      log.info("failover_succeeded", {});
    } catch (e) {
      if (e instanceof InjectedCrash || e instanceof LeaseLost) {
        log.warn("failover_driver_stopped", { reason: e.message });
        return this.#op;
      }
      const step = steps[index] ?? this.#op.step;
      const message = e instanceof Error ? e.message : String(e);
      log.error("failover_step_failed", { step, error: message });
      await this.#store.record(this.#op.id, step, "failed", { error: message }).catch(() => {});
      await this.#fail(step, message, log);
    } finally {
      clearInterval(this.#heartbeat);
    }
    return this.#op;
  }

  async #fail(step: Step, message: string, log: Logger): Promise<void> {
    const steps = stepsOf(this.#op.kind);
    const beforeRepoint = this.#op.kind !== "emergency" &&
      steps.indexOf(step) < steps.indexOf("repoint");
    if (!beforeRepoint) {
      await this.#store.finish(
        this.#op.id,
        this.options.owner,
        "failed_closed",
        `step ${step}: ${message}`,
      ).catch(() => {});
      this.#op = { ...this.#op, state: "failed_closed", error: message };
      return;
    }
    try {
      const undone = await this.#rollback(step);
      await this.#store.record(this.#op.id, step, "rolled_back", { undone });
      await this.#store.finish(
        this.#op.id,
        this.options.owner,
        "rolled_back",
        `step ${step}: ${message}`,
      );
      this.#op = { ...this.#op, state: "rolled_back", error: message };
    } catch (e) {
      const rb = e instanceof Error ? e.message : String(e);
      log.error("failover_rollback_failed", { error: rb });
      await this.#store.finish(
        this.#op.id,
        this.options.owner,
        "failed_closed",
        `step ${step}: ${message}; rollback failed: ${rb}`,
      )
        .catch(() => {});
      this.#op = { ...this.#op, state: "failed_closed", error: message };
    }
  }

  /** Undoes, newest first, whatever the steps up to `failed` may have done. Idempotent. */
  async #rollback(failed: Step): Promise<string[]> {
    const at = PLANNED_STEPS.indexOf(failed as (typeof PLANNED_STEPS)[number]);
    const reached = (s: (typeof PLANNED_STEPS)[number]) => at >= PLANNED_STEPS.indexOf(s);
    const undone: string[] = [];
    if (reached("reverse")) {
      await this.#dropSubscription(this.#src, this.#op.target);
      undone.push("reverse subscription dropped");
    }
    if (reached("detach")) {
      const sub = await subscriptionStatus(this.#tgt);
      if (!sub.exists) {
        await this.#dropSlot(this.#src, SUBSCRIPTION);
        await withWritableSession(
          this.#tgt,
          (s) => ensureSubscription(s, this.#url(this.#op.source), { copyData: false }),
        );
        undone.push("forward subscription re-created (copy_data=false; the source was frozen)");
      }
    }
    if (reached("freeze")) {
      await this.#setReadOnly(this.#src, false);
      undone.push("source unfrozen");
    }
    if (reached("pause")) {
      // A PAUSE that failed undid itself; only resume what is actually paused (a router held by
      // someone else cannot be resumed by us, and need not be).
      const paused = failed === "pause" ? (await this.rt.router().current()).paused : true;
      if (paused) {
        await this.rt.router().resume();
        undone.push("PgBouncer resumed");
      }
    }
    return undone;
  }

  async #setReadOnly(sql: Sql, on: boolean): Promise<void> {
    await sql.begin("read write", async (tx) => {
      const [{ db }] = await tx`select current_database() as db`;
      const ident = `"${String(db).replaceAll('"', '""')}"`;
      await tx.unsafe(
        on
          ? `alter database ${ident} set default_transaction_read_only = on`
          : `alter database ${ident} reset default_transaction_read_only`,
      );
    });
  }

  async #dropSubscription(sql: Sql, publisher: SiteName | null): Promise<void> {
    const sub = await subscriptionStatus(sql);
    if (!sub.exists) return;
    await withWritableSession(sql, async (s) => {
      await s.unsafe(`alter subscription "${SUBSCRIPTION}" disable`);
      await s.unsafe(`alter subscription "${SUBSCRIPTION}" set (slot_name = none)`);
      await s.unsafe(`drop subscription "${SUBSCRIPTION}"`);
    });
    if (publisher && sub.slotName) {
      await this.#dropSlot(this.rt.sites.get(publisher).ops, sub.slotName);
    }
  }

  /** Drops a replication slot once its walsender has gone (check-then-act, bounded). */
  async #dropSlot(sql: Sql, slot: string): Promise<void> {
    const until = Date.now() + 15_000;
    while (true) {
      const rows =
        await sql`select active, active_pid from pg_replication_slots where slot_name = ${slot}`;
      if (!rows.length) return;
      if (!rows[0].active) {
        try {
          await sql`select pg_drop_replication_slot(${slot})`;
          return;
        } catch (e) {
          if (
            (e as { code?: string }).code !== "55006" && (e as { code?: string }).code !== "42704"
          ) throw e;
        }
      } else if (Date.now() > until - 5_000) {
        await sql`select pg_terminate_backend(${rows[0].active_pid})`;
      }
      if (Date.now() > until) throw new Error(`replication slot ${slot} is still in use`);
      await sleep(10);
    }
  }

  async #sequenceState(sql: Sql) {
    const rows =
      await sql`select * from ha.sequence_state(${this.options.limits.sequenceSchemas}::text[])`;
    return new Map(rows.map((r) => [r.sequence_name as string, {
      last: r.last_value === null ? 0 : Number(r.last_value),
      max: r.column_max === null ? 0 : Number(r.column_max),
    }]));
  }

  async #raiseSequences(sql: Sql, values: Map<string, number>): Promise<number> {
    if (values.size === 0) return 0;
    const names = [...values.keys()];
    const targets = names.map((n) => values.get(n)!);
    await sql.begin(
      "read write",
      (tx) =>
        tx`select ha.raise_sequence(n, v) from unnest(${names}::text[], ${targets}::bigint[]) as x(n, v)
         where to_regclass(n) is not null`,
    );
    return values.size;
  }

  async #waitFor(
    what: string,
    ms: number,
    probe: () => Promise<boolean>,
    interval = 50,
  ): Promise<number> {
    const started = Date.now();
    while (!(await probe())) {
      if (Date.now() - started > ms) {
        throw new StepFailed(this.#op.step, `timed out after ${ms} ms waiting for ${what}`);
      }
      await sleep(interval);
    }
    return Date.now() - started;
  }

  async #runStep(step: Step): Promise<Record<string, unknown> | void> {
    const limits = this.options.limits;
    const router = this.rt.router();
    const op = this.#op;
    switch (step) {
      case "seq_prebump": {
        const src = await this.#sequenceState(this.#src);
        const values = new Map([...src].map(([n, s]) => [n, s.last + limits.prebumpMargin]));
        return {
          sequences: await this.#raiseSequences(this.#tgt, values),
          margin: limits.prebumpMargin,
        };
      }
      case "wait_lag": {
        const sub = await subscriptionStatus(this.#tgt);
        if (!sub.exists || !sub.slotName) {
          throw new StepFailed(step, `no subscription on site ${op.target}`);
        }
        let lag: number | null = null;
        const waited = await this.#waitFor(
          `replication lag below ${limits.lowLagBytes} bytes`,
          limits.lagWaitMs,
          async () => {
            lag = (await slotStatus(this.#src, sub.slotName!)).lagBytes ?? null;
            return lag !== null && lag <= limits.lowLagBytes;
          },
          100,
        );
        return { lag_bytes: lag, waited_ms: waited };
      }
      case "pause":
        if (op.kind !== "emergency") {
          await router.pause(limits.pauseTimeoutMs);
          return;
        }
        // Server connections stuck on a dead primary can hold PAUSE up; their transactions are
        // lost either way, so an emergency carries on unpaused rather than waiting. (KILL is not
        // used: after a KILL, PgBouncer 1.18 leaves new logins hanging even after RESUME.)
        try {
          await router.pause(limits.emergencyPauseTimeoutMs);
          return { paused: true };
        } catch (e) {
          return {
            paused: false,
            note: `PAUSE did not finish (${
              e instanceof Error ? e.message : e
            }); continuing unpaused`,
          };
        }
      case "freeze": {
        await this.#setReadOnly(this.#src, true);
        const [{ n }] = await this.#src.unsafe(TERMINATE_APP_SESSIONS);
        let open: Record<string, unknown>[] = [];
        await this.#waitFor(
          "the last write transaction on the source to end",
          limits.freezeTimeoutMs,
          async () => {
            open = await this.#src`
            select pid, usename, application_name from pg_stat_activity
            where datname = current_database() and backend_xid is not null and pid <> pg_backend_pid()
              and backend_type = 'client backend'`;
            if (open.length) await this.#src.unsafe(TERMINATE_APP_SESSIONS);
            return open.length === 0;
          },
        );
        const prepared = await this
          .#src`select gid from pg_prepared_xacts where database = current_database()`;
        if (prepared.length) {
          throw new StepFailed(
            step,
            `${prepared.length} prepared transaction(s) are open on the source; commit or roll them back first`,
          );
        }
        return { terminated: Number(n) };
      }
      case "marker": {
        const token = String(op.data.marker_token);
        await this.#src.begin(
          "read write",
          (tx) =>
            tx`insert into ha.markers (token, epoch, operation_id) values (${token}, ${op.epochTo}, ${op.id})
             on conflict (token) do nothing`,
        );
        const [{ lsn }] = await this.#src`select pg_current_wal_lsn()::text as lsn`;
        return { source_lsn: lsn };
      }
      case "wait_marker": {
        const token = String(op.data.marker_token);
        const waited = await this.#waitFor(
          "the marker to arrive on the target",
          limits.markerTimeoutMs,
          async () => (await this.#tgt`select 1 from ha.markers where token = ${token}`).length > 0,
          10,
        );
        return { waited_ms: waited };
      }
      case "seq_sync": {
        const margin = op.kind === "emergency"
          ? limits.emergencySequenceMargin
          : limits.sequenceMargin;
        const tgt = await this.#sequenceState(this.#tgt);
        const src = op.kind === "emergency" ? new Map() : await this.#sequenceState(this.#src);
        const values = new Map<string, number>();
        for (const [name, t] of tgt) {
          const s = src.get(name);
          values.set(name, Math.max(t.last, t.max, s?.last ?? 0, s?.max ?? 0) + margin);
        }
        return { sequences: await this.#raiseSequences(this.#tgt, values), margin };
      }
      case "detach": {
        await this.#dropSubscription(this.#tgt, op.kind === "emergency" ? null : op.source);
        return;
      }
      case "reverse": {
        await withWritableSession(this.#tgt, (s) => ensurePublication(s));
        await withWritableSession(
          this.#src,
          (s) => ensureSubscription(s, this.#url(op.target), { copyData: false }),
        );
        return { publisher: op.target, subscriber: op.source };
      }
      case "rpo": {
        const sub = await subscriptionStatus(this.#tgt);
        if (!sub.exists) return { note: "subscription already detached; RPO recorded earlier" };
        const beat = await heartbeatOf(this.#tgt, op.source);
        const rpo = {
          heartbeat_at: beat?.beatAt ?? null,
          heartbeat_age_seconds: beat?.ageSeconds ?? null,
          applied_remote_lsn: await appliedRemoteLsn(this.#tgt),
          last_message_at: sub.lastMessageAt ?? null,
          estimate: beat
            ? `every commit on site ${op.source} before ${beat.beatAt} is on site ${op.target}; commits in the last ${beat.ageSeconds} s before the failover may be missing`
            : "no heartbeat from the old primary was ever applied (is pg_cron running ha_heartbeat there?): the loss window is unknown",
        };
        await this.#data({ rpo });
        return rpo;
      }
      case "repoint": {
        const cur = await router.current();
        const want = this.#endpoint(op.target);
        if (this.rt.siteAt(cur.target) === op.target && cur.epoch === op.epochTo) {
          return { skipped: "already routed" };
        }
        await router.route(want, op.epochTo!);
        return { routed_to: op.target, epoch: op.epochTo };
      }
      case "verify_routing": {
        const cur = await router.current();
        if (this.rt.siteAt(cur.target) !== op.target || cur.epoch !== op.epochTo) {
          throw new StepFailed(
            step,
            `PgBouncer routes to ${
              this.rt.siteAt(cur.target)
            } at epoch ${cur.epoch}, expected ${op.target} at ${op.epochTo}`,
          );
        }
        return { routed_to: op.target, epoch: cur.epoch };
      }
      case "epoch": {
        await this.#tgt.begin(
          "read write",
          (tx) =>
            tx`update ha.state set role = 'primary', epoch = greatest(epoch, ${op.epochTo}), fenced = false, fenced_reason = null,
                 updated_at = now() where id`,
        );
        await this.#setReadOnly(this.#tgt, false);
        let source = "unreachable";
        try {
          await withDeadline(
            this.#src.begin(
              "read write",
              (tx) =>
                tx`update ha.state set role = 'standby', epoch = greatest(epoch, ${op.epochTo}), updated_at = now() where id`,
            ),
            5000,
            "source",
          );
          source = "standby";
        } catch (e) {
          if (op.kind !== "emergency") throw e;
        }
        return { target: "primary", source, epoch: op.epochTo };
      }
      case "resume":
        await router.resume();
        return;
      case "postcheck": {
        const token = String(op.data.post_token);
        await this.#tgt.begin(
          "read write",
          (tx) =>
            tx`insert into ha.markers (token, epoch, operation_id) values (${token}, ${op.epochTo}, ${op.id}) on conflict (token) do nothing`,
        );
        if (op.kind === "emergency") return { write_test: "ok" };
        try {
          const waited = await this.#waitFor(
            "the post-check marker to replicate back",
            15_000,
            async () =>
              (await this.#src`select 1 from ha.markers where token = ${token}`).length > 0,
            100,
          );
          return { write_test: "ok", reverse_replication_ms: waited };
        } catch {
          await this.#store.record(op.id, step, "info", {
            warning: "reverse replication did not deliver the post-check marker within 15 s",
          });
          return { write_test: "ok", reverse_replication: "not confirmed" };
        }
      }
    }
  }
}

export type { Observation };
