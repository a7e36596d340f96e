/**
 * The failover driver. A plan (failover_plan.ts) is checked first and nothing changes unless
 * every guardrail passes; the operation then runs the step table (failover_steps.ts) step by
 * step: before each step the driver proves it still holds the operation's lease and runs the
 * step's guard, then its action; each step boundary is persisted with an audit row, so a crashed
 * driver's operation resumes where it stopped — after `checkResume` has confirmed the pair is
 * still where the operation left it.
 *
 * Planned: a failure before `repoint` rolls back (each reached step's undo, newest first) and ends
 * ROLLED_BACK; a failure from `repoint` on ends FAILED_CLOSED with PgBouncer still paused, for an
 * operator. Emergency: any failure ends FAILED_CLOSED; resuming retries the failed step. A driver
 * that loses its lease stops before its next action, and rolls back only after re-claiming it.
 */
import type { Logger } from "../http/logger.ts";
import { HttpError } from "../http/errors.ts";
import { type Limits, type Plan, plan } from "./failover_plan.ts";
import {
  type Details,
  EMERGENCY,
  PLANNED,
  POINT_OF_NO_RETURN,
  type StepContext,
  type StepDef,
} from "./failover_steps.ts";
import {
  LeaseLost,
  type NewOperation,
  type Operation,
  type OperationKind,
  OperationStore,
} from "./operations.ts";
import type { HaRuntime } from "./runtime.ts";

export { type Check, DEFAULT_LIMITS, type Limits, type Plan, plan } from "./failover_plan.ts";
export { EMERGENCY_STEPS, PLANNED_STEPS, StepFailed } from "./failover_steps.ts";

export function stepsOf(kind: OperationKind): readonly StepDef[] {
  return kind === "emergency" ? EMERGENCY : PLANNED;
}

/** Raised by the test hooks to simulate the driver dying at a step. */
export class InjectedCrash extends Error {
  constructor(where: string) {
    super(`injected crash ${where}`);
    this.name = "InjectedCrash";
  }
}

/** Test hooks: where the driver "dies" (nothing is touched) or a step fails. */
export interface Faults {
  /** After the step's action and audit row, before moving on. */
  crashAfter?: string;
  /** After the step's action, before its audit row: the effect exists, the record does not. */
  crashDuring?: string;
  /** The step's action throws (before acting). */
  failAt?: string;
  /** Runs before each step's guard (tests: change the world at a precise point). */
  beforeStep?: (step: string, operationId: string) => Promise<void>;
}

export interface MachineOptions {
  owner: string;
  leaseMs: number;
  limits: Limits;
  log: Logger;
  faults?: Faults;
}

export function newOperation(p: Plan, idempotencyKey?: string): NewOperation {
  return {
    kind: p.kind,
    idempotencyKey,
    source: p.source!,
    target: p.target!,
    epochFrom: p.epochFrom!,
    epochTo: p.epochTo!,
    step: stepsOf(p.kind)[0].name,
    data: {
      marker_token: crypto.randomUUID(),
      post_token: crypto.randomUUID(),
      checks: p.checks,
      started_at: new Date().toISOString(),
    },
  };
}

/**
 * Before an operation is resumed: refuses (409, nothing changed) unless the pair is still where
 * the operation left it — no witness past its `epoch_to`, and still at its `epoch_from` unless it
 * has reached the repoint — and, while it has changed nothing yet, unless its plan still holds
 * (412). An emergency that has not promoted is refused while the old primary is back and
 * writable.
 */
export async function checkResume(
  rt: HaRuntime,
  op: Operation,
  limits: Limits,
): Promise<void> {
  const obs = await rt.observe(2500);
  const steps = stepsOf(op.kind).map((s) => s.name);
  const at = steps.indexOf(op.step);
  const newest = obs.epoch ?? 0;
  const stale = (why: string) => {
    throw new HttpError(
      409,
      "stale_operation",
      `${why}; abandon it (POST /failover/operations/${op.id}/abandon).`,
      {
        epoch_from: op.epochFrom,
        epoch_to: op.epochTo,
        epoch_now: newest,
      },
    );
  };
  if (newest > op.epochTo!) {
    stale(`The pair is at epoch ${newest}, past this operation's ${op.epochTo}`);
  }
  if (at < steps.indexOf(POINT_OF_NO_RETURN) && newest !== op.epochFrom) {
    stale(`The pair is at epoch ${newest}, not at this operation's starting epoch ${op.epochFrom}`);
  }
  if (op.kind !== "emergency" && at <= steps.indexOf("pause")) {
    const p = await plan(rt, op.kind, limits, undefined, obs);
    const failed = p.checks.filter((c) =>
      !c.ok && c.name !== "no_running_operation" &&
      !(c.name === "router_routes_to_primary" && obs.route?.paused)
    );
    if (failed.length || p.source !== op.source || p.target !== op.target) {
      throw new HttpError(
        412,
        "guardrail_failed",
        "A guardrail no longer holds; nothing was changed.",
        {
          failed: failed.map((c) => c.name),
          checks: p.checks,
        },
      );
    }
  }
  if (op.kind === "emergency" && at < steps.indexOf("epoch")) {
    const src = obs.topology.sites[op.source];
    if (src.reachable && src.fence?.writable) {
      throw new HttpError(
        409,
        "primary_is_back",
        `Site ${op.source} is reachable and still writable: abandon this emergency and use a planned switchover.`,
      );
    }
  }
}

export class FailoverMachine {
  #op: Operation;
  readonly #store: OperationStore;
  /** performance.now() until which the lease is proven held (renewals move it). */
  #leaseUntil = 0;
  #leaseTaken = false;

  constructor(
    readonly rt: HaRuntime,
    store: OperationStore,
    op: Operation,
    readonly options: MachineOptions,
  ) {
    this.#store = store;
    this.#op = op;
    this.#leaseUntil = performance.now() + options.leaseMs;
  }

  get operation(): Operation {
    return this.#op;
  }

  /**
   * The lease is held while the last renewal is younger than two thirds of its length (a third
   * is left for clocks and a slow write). A renewal that fails is not swallowed: the lease then
   * runs out here, and the driver stops before its next action.
   */
  #assertLease = (): void => {
    if (this.#leaseTaken) throw new LeaseLost(this.#op.id);
    if (performance.now() > this.#leaseUntil - this.options.leaseMs / 3) {
      throw new LeaseLost(this.#op.id, "its renewals failed");
    }
  };

  async #renewLease(): Promise<void> {
    const asked = performance.now();
    try {
      const ok = await this.#store.heartbeat(this.#op.id, this.options.owner, this.options.leaseMs);
      if (ok) this.#leaseUntil = asked + this.options.leaseMs;
      else this.#leaseTaken = true;
    } catch (e) {
      this.options.log.warn("failover_lease_renewal_failed", {
        operation_id: this.#op.id,
        error: e instanceof Error ? e.message : String(e),
      });
    }
  }

  #context(): StepContext {
    const op = this.#op;
    return {
      op,
      rt: this.rt,
      limits: this.options.limits,
      src: this.rt.sites.get(op.source).ops,
      tgt: this.rt.sites.get(op.target).ops,
      router: this.rt.router(),
      data: async (patch) => {
        this.#op = { ...this.#op, data: { ...this.#op.data, ...patch } };
        await this.#store.advance(this.#op.id, this.options.owner, this.#op.step, patch);
      },
      assertLease: this.#assertLease,
    };
  }

  /** Drives the operation from its current step to the end. Never throws. */
  async run(): Promise<Operation> {
    const log = this.options.log.child({ operation_id: this.#op.id, kind: this.#op.kind });
    const steps = stepsOf(this.#op.kind);
    const faults = this.options.faults ?? {};
    const renewals = setInterval(
      () => void this.#renewLease(),
      Math.max(100, Math.floor(this.options.leaseMs / 4)),
    );
    let index = Math.max(0, steps.findIndex((s) => s.name === this.#op.step));
    try {
      await this.#store.transition(this.#op.id, this.options.owner, undefined, steps[index].name);
      for (; index < steps.length; index++) {
        const step = steps[index];
        this.#op = { ...this.#op, step: step.name };
        const c = this.#context();
        await faults.beforeStep?.(step.name, this.#op.id);
        this.#assertLease();
        await step.guard?.(c);
        this.#assertLease();
        if (faults.failAt === step.name) throw new Error(`injected failure at step ${step.name}`);
        const started = performance.now();
        const details: Details = (await step.act(c)) ?? {};
        details.ms = Math.round(performance.now() - started);
        if (faults.crashDuring === step.name) throw new InjectedCrash(`during step ${step.name}`);
        const next = steps[index + 1]?.name;
        if (faults.crashAfter === step.name) {
          // Its effect and audit row exist, the move to the next step does not: resuming runs
          // this step again, which every step must survive.
          await this.#store.transition(this.#op.id, this.options.owner, {
            step: step.name,
            details,
          }, undefined);
          throw new InjectedCrash(`after step ${step.name}`);
        }
        await this.#store.transition(
          this.#op.id,
          this.options.owner,
          { step: step.name, details },
          next,
        );
        log.info("failover_step", { step: step.name, ms: details.ms });
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
      const step = steps[index]?.name ?? this.#op.step;
      const message = e instanceof Error ? e.message : String(e);
      log.error("failover_step_failed", { step, error: message });
      await this.#store.record(this.#op.id, step, "failed", { error: message }).catch(() => {});
      await this.#fail(index, message, log);
    } finally {
      clearInterval(renewals);
    }
    return this.#op;
  }

  async #fail(index: number, message: string, log: Logger): Promise<void> {
    const steps = stepsOf(this.#op.kind);
    const step = steps[index]?.name ?? this.#op.step;
    const beforeRepoint = this.#op.kind !== "emergency" &&
      index < steps.findIndex((s) => s.name === POINT_OF_NO_RETURN);
    if (!beforeRepoint) {
      await this.#finish("failed_closed", `step ${step}: ${message}`);
      return;
    }
    // Undo only while we hold the operation: re-claim the lease first, or leave it to whoever has.
    const claimed = await this.#store.claim(this.#op.id, this.options.owner, this.options.leaseMs)
      .catch(() => undefined);
    if (!claimed) {
      log.warn("failover_rollback_skipped", { reason: "the lease is held by another driver" });
      return;
    }
    this.#leaseUntil = performance.now() + this.options.leaseMs;
    try {
      const undone: string[] = [];
      const c = this.#context();
      for (let i = index; i >= 0; i--) {
        const did = await steps[i].undo?.(c, i === index);
        if (did) undone.push(did);
      }
      await this.#store.record(this.#op.id, step, "rolled_back", { undone });
      await this.#finish("rolled_back", `step ${step}: ${message}`);
    } catch (e) {
      const rb = e instanceof Error ? e.message : String(e);
      log.error("failover_rollback_failed", { error: rb });
      await this.#finish("failed_closed", `step ${step}: ${message}; rollback failed: ${rb}`);
    }
  }

  async #finish(state: "failed_closed" | "rolled_back", error: string): Promise<void> {
    await this.#store.finish(this.#op.id, this.options.owner, state, error).catch(() => {});
    this.#op = { ...this.#op, state, error };
  }
}
