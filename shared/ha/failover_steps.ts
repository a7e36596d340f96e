/**
 * The failover's steps, as a table: each step's guard (what must still be true before it acts),
 * its action (check-then-act, safe to run again after a crash anywhere inside it) and, for a
 * planned switchover, its undo (run newest first when a later step fails before the repoint).
 * The order of the arrays is the order of the operation.
 *
 *   planned / failback: reverse_prepare → seq_prebump → wait_lag → pause → freeze → marker
 *     → wait_marker → seq_sync → detach → reverse → repoint → verify_routing → epoch → resume
 *     → seq_verify → postcheck
 *   emergency: pause → lease_wait → rpo → detach → seq_sync → repoint → verify_routing → epoch
 *     → resume → seq_verify → postcheck
 */
import type { Sql } from "../db/mod.ts";
import { sleep, withDeadline } from "./deadline.ts";
import {
  endClientSessions,
  liftFence,
  openWriters,
  setFence,
  setReadOnlyDefault,
} from "./fence.ts";
import type { Limits } from "./failover_plan.ts";
import { lastLeaseGranted, msUntilExpired, recordInitialGrant } from "./lease.ts";
import type { Operation } from "./operations.ts";
import {
  appliedRemoteLsn,
  ensurePublication,
  ensureSubscription,
  heartbeatOf,
  scopeTables,
  slotStatus,
  SUBSCRIPTION,
  subscriptionStatus,
} from "./replication.ts";
import type { Router } from "./routers.ts";
import {
  explicitIdSequences,
  floorOf,
  raiseSequences,
  readNamedSequences,
  readSequences,
  sequenceKey,
  unraisable,
  warmSequences,
} from "./sequences.ts";
import type { HaRuntime } from "./runtime.ts";
import { siteUrl, storedScope, withWritableSession } from "./setup.ts";
import { OPS_CONNECTIONS, type SiteName } from "./sites.ts";
import { readControlState } from "./state.ts";

export type Details = Record<string, unknown>;

/** What a step sees: the operation, both sites, the router, the limits, and the driver's lease. */
export interface StepContext {
  readonly op: Operation;
  readonly rt: HaRuntime;
  readonly limits: Limits;
  readonly src: Sql;
  readonly tgt: Sql;
  readonly router: Router;
  /** Persists a patch of op.data (e.g. the RPO) with the current step. */
  data(patch: Details): Promise<void>;
  /** Throws when the driver can no longer prove it holds the operation's lease. */
  assertLease(): void;
}

export interface StepDef {
  name: string;
  /** Refuses (throws) when the world no longer matches what this step expects. */
  guard?: (c: StepContext) => Promise<void>;
  act: (c: StepContext) => Promise<Details | void>;
  /** Planned only, before the repoint: undoes whatever the step may have done. Idempotent. */
  undo?: (c: StepContext, failedHere: boolean) => Promise<string | void>;
}

/** More sequences than this fed explicit ids: the pause re-reads every column instead. */
const EXPLICIT_NOTED = 1000;

export class StepFailed extends Error {
  constructor(readonly step: string, message: string) {
    super(message);
    this.name = "StepFailed";
  }
}

/** Polls `probe` until true; fails the step after `ms`; checks the lease on every round. */
async function waitFor(
  c: StepContext,
  what: string,
  ms: number,
  probe: () => Promise<boolean>,
  interval = 50,
): Promise<number> {
  const started = Date.now();
  while (!(await probe())) {
    c.assertLease();
    if (Date.now() - started > ms) {
      throw new StepFailed(c.op.step, `timed out after ${ms} ms waiting for ${what}`);
    }
    await sleep(interval);
  }
  return Date.now() - started;
}

function endpointOf(c: StepContext, site: SiteName) {
  const e = c.rt.sites.get(site).endpoint;
  return { host: e.host, port: e.port, dbname: e.database };
}

/** Drops a replication slot once its walsender has gone (check-then-act, bounded). */
async function dropSlot(sql: Sql, slot: string): Promise<void> {
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
        const code = (e as { code?: string }).code;
        if (code !== "55006" && code !== "42704") throw e;
      }
    } else if (Date.now() > until - 5_000) {
      await sql`select pg_terminate_backend(${rows[0].active_pid})`;
    }
    if (Date.now() > until) throw new Error(`replication slot ${slot} is still in use`);
    await sleep(10);
  }
}

async function dropSubscription(c: StepContext, sql: Sql, publisher: SiteName | null) {
  const sub = await subscriptionStatus(sql);
  if (!sub.exists) return;
  await withWritableSession(sql, async (s) => {
    await s.unsafe(`alter subscription "${SUBSCRIPTION}" disable`);
    await s.unsafe(`alter subscription "${SUBSCRIPTION}" set (slot_name = none)`);
    await s.unsafe(`drop subscription "${SUBSCRIPTION}"`);
  });
  if (publisher && sub.slotName) await dropSlot(c.rt.sites.get(publisher).ops, sub.slotName);
}

/** The control rows must still say what an operation at this point expects. */
function expectRoles(roles: { source?: string[]; target?: string[] }, maxEpoch: "from" | "to") {
  return async (c: StepContext): Promise<void> => {
    // An emergency's source is presumed unreachable: only the target is asked.
    const [s, t] = await Promise.all([
      c.op.kind === "emergency"
        ? undefined
        : withDeadline(readControlState(c.src), 5000, "the source").catch(() => undefined),
      readControlState(c.tgt),
    ]);
    const limit = maxEpoch === "from" ? c.op.epochFrom! : c.op.epochTo!;
    for (
      const [name, state, want] of [["source", s, roles.source], [
        "target",
        t,
        roles.target,
      ]] as const
    ) {
      if (!state) continue;
      if (state.epoch > limit) {
        throw new StepFailed(
          c.op.step,
          `the ${name} is at epoch ${state.epoch}, past this operation's ${limit}: the pair moved on`,
        );
      }
      if (want && !want.includes(state.role)) {
        throw new StepFailed(
          c.op.step,
          `the ${name} has role ${state.role}, expected ${want.join(" or ")}`,
        );
      }
    }
  };
}

// --- the steps -------------------------------------------------------------------------------

/** The schemas whose sequences a switchover moves: the configured ones and the scope's. */
async function sequenceSchemas(c: StepContext): Promise<string[]> {
  const scope = await storedScope(c.tgt);
  return [...new Set([...c.limits.sequenceSchemas, ...scope.schemas])];
}

const unraisableWarning = (names: string[]) =>
  `${names.length} sequence(s) could not be placed above the values in use (descending, or at their maximum): ${
    names.slice(0, 10).join(", ")
  }`;

const seqPrebump: StepDef = {
  name: "seq_prebump",
  guard: expectRoles({ source: ["primary"], target: ["standby"] }, "from"),
  // Outside the pause: every target sequence above the source's value and its column's largest
  // value, plus a wide margin, so the exact sync in the pause has little left to do. Sequences
  // whose column holds values above them (explicit ids) are noted: the pause re-reads their columns.
  act: async (c) => {
    const schemas = await sequenceSchemas(c);
    const src = await readSequences(c.src, schemas, true);
    const blocked = unraisable(src);
    if (blocked.length) {
      // Before the pause: refused, and rolled back, rather than ids handed out twice later.
      throw new StepFailed("seq_prebump", unraisableWarning(blocked));
    }
    const floors = src.flatMap((s) => {
      const floor = floorOf(s);
      return floor === null ? [] : [{ ...s, floor }];
    });
    const raised = await raiseSequences(c.tgt, floors, c.limits.prebumpMargin);
    // The pause reads the source's sequences and raises the target's: on warm backends. Last
    // before the pause: catalog churn (reverse_prepare's subscription adds a row per table)
    // overflows PostgreSQL's invalidation queue and resets every backend's caches.
    await Promise.all([c.src, c.tgt].map((sql) => warmSequences(sql, schemas, OPS_CONNECTIONS)));
    const explicit = explicitIdSequences(src);
    await c.data({
      explicit_id_sequences: explicit.length > EXPLICIT_NOTED
        ? "all"
        : explicit.map((s) => [s.schema, s.name]),
    });
    return {
      sequences: src.length,
      raised,
      margin: c.limits.prebumpMargin,
      explicit_ids: explicit.length,
    };
  },
};

/**
 * Outside the pause: the reverse publication on the target and, on the source, its subscription,
 * created disabled and without a slot (it reads the publication's tables now, which takes time
 * with many tables). The slot is created in the pause, after the forward subscription is gone, so
 * it holds the target's own changes only; until then nothing flows. A disabled one left by an
 * earlier operation is made anew; an enabled one would be replication into the primary: refused.
 */
const reversePrepare: StepDef = {
  name: "reverse_prepare",
  guard: expectRoles({ source: ["primary"], target: ["standby"] }, "from"),
  act: async (c) => {
    const tables = await scopeTables(c.tgt, await storedScope(c.tgt));
    await ensurePublication(c.tgt, tables);
    const sub = await subscriptionStatus(c.src);
    if (sub.exists && sub.enabled) {
      throw new StepFailed(
        "reverse_prepare",
        `site ${c.op.source} (the primary) has an enabled subscription: replication into the primary is not expected`,
      );
    }
    if (sub.exists) await dropSubscription(c, c.src, c.op.target);
    // A slot of that name left on the target by an earlier operation would stream from its old
    // point: dropped here, outside the pause (an active one is some other consumer: refused).
    const stale = await slotStatus(c.tgt, SUBSCRIPTION);
    if (stale.exists && stale.active) {
      throw new StepFailed(
        "reverse_prepare",
        `site ${c.op.target} has an active replication slot ${SUBSCRIPTION}: something already streams from it`,
      );
    }
    if (stale.exists) await dropSlot(c.tgt, SUBSCRIPTION);
    await withWritableSession(
      c.src,
      (s) =>
        ensureSubscription(s, siteUrl(c.rt, c.op.target), {
          copyData: false,
          createSlot: false,
          enabled: false,
        }),
    );
    return { publisher: c.op.target, subscriber: c.op.source, tables: tables.length };
  },
  undo: async (c) => {
    await dropSubscription(c, c.src, c.op.target);
    return "reverse subscription dropped";
  },
};

const waitLag: StepDef = {
  name: "wait_lag",
  act: async (c) => {
    const sub = await subscriptionStatus(c.tgt);
    if (!sub.exists || !sub.slotName) {
      throw new StepFailed("wait_lag", `no subscription on site ${c.op.target}`);
    }
    let lag: number | null = null;
    const waited = await waitFor(
      c,
      `replication lag below ${c.limits.lowLagBytes} bytes`,
      c.limits.lagWaitMs,
      async () => {
        lag = (await slotStatus(c.src, sub.slotName!)).lagBytes ?? null;
        return lag !== null && lag <= c.limits.lowLagBytes;
      },
      100,
    );
    return { lag_bytes: lag, waited_ms: waited };
  },
};

const pausePlanned: StepDef = {
  name: "pause",
  guard: expectRoles({ source: ["primary"], target: ["standby"] }, "from"),
  act: async (c) => {
    await c.router.pause(c.limits.pauseTimeoutMs);
  },
  // A PAUSE that failed undid itself; only resume what is actually paused (a router held by
  // someone else cannot be resumed by us, and need not be).
  undo: async (c, failedHere) => {
    const paused = failedHere ? (await c.router.current()).paused : true;
    if (!paused) return;
    await c.router.resume();
    return "PgBouncer resumed";
  },
};

const freeze: StepDef = {
  name: "freeze",
  guard: expectRoles({ source: ["primary"], target: ["standby"] }, "from"),
  // The write token is revoked first: from that instant the guard refuses every write on the
  // source, whatever the client does. Then the fast path (read-only default, sessions ended),
  // and a wait until no transaction that passed the guard before the fence is still open.
  act: async (c) => {
    await setFence(c.src, "frozen", null, undefined, c.op.id);
    c.assertLease();
    await setReadOnlyDefault(c.src, true);
    let terminated = await endClientSessions(c.src);
    await waitFor(
      c,
      "the last write transaction on the source to end",
      c.limits.freezeTimeoutMs,
      async () => {
        if ((await openWriters(c.src)) === 0) return true;
        terminated += await endClientSessions(c.src);
        return false;
      },
    );
    const prepared = await c
      .src`select gid from pg_prepared_xacts where database = current_database()`;
    if (prepared.length) {
      throw new StepFailed(
        "freeze",
        `${prepared.length} prepared transaction(s) are open on the source; commit or roll them back first`,
      );
    }
    return { terminated };
  },
  undo: async (c) => {
    const s = await readControlState(c.src);
    if (s?.role === "primary" && s.epoch === c.op.epochFrom) {
      await liftFence(c.src, c.op.epochFrom!, "keep");
    }
    await setReadOnlyDefault(c.src, false);
    return "source unfrozen";
  },
};

const marker: StepDef = {
  name: "marker",
  act: async (c) => {
    const token = String(c.op.data.marker_token);
    await c.src.begin(
      "read write",
      (tx) =>
        tx`insert into ha.markers (token, epoch, operation_id) values (${token}, ${c.op.epochTo}, ${c.op.id})
           on conflict (token) do nothing`,
    );
    const [{ lsn }] = await c.src`select pg_current_wal_lsn()::text as lsn`;
    return { source_lsn: lsn };
  },
};

const waitMarker: StepDef = {
  name: "wait_marker",
  act: async (c) => {
    const token = String(c.op.data.marker_token);
    const waited = await waitFor(
      c,
      "the marker to arrive on the target",
      c.limits.markerTimeoutMs,
      async () => (await c.tgt`select 1 from ha.markers where token = ${token}`).length > 0,
      10,
    );
    return { waited_ms: waited };
  },
};

/**
 * In the pause: every target sequence above the source's last value (a read of the sequences
 * only) and, for the sequences noted as fed explicit ids, above their column's maximum on the
 * target (the marker has arrived, so those rows have). An emergency has no source to read: every
 * target sequence goes above its column's maximum plus a wide margin (rows lost with the old
 * primary may have used the values in between).
 */
const seqSync: StepDef = {
  name: "seq_sync",
  act: async (c) => {
    const schemas = await sequenceSchemas(c);
    if (c.op.kind === "emergency") {
      const tgt = await readSequences(c.tgt, schemas, true);
      const floors = tgt.flatMap((t) => {
        const floor = floorOf(t);
        return floor === null ? [] : [{ ...t, floor: floor + 1n }];
      });
      const margin = c.limits.emergencySequenceMargin;
      const blocked = unraisable(tgt);
      return {
        sequences: tgt.length,
        raised: await raiseSequences(c.tgt, floors, margin),
        margin,
        ...(blocked.length ? { warning: unraisableWarning(blocked) } : {}),
      };
    }
    const noted = c.op.data.explicit_id_sequences;
    const t0 = performance.now();
    const [src, explicit] = await Promise.all([
      readSequences(c.src, schemas, false),
      Array.isArray(noted)
        ? readNamedSequences(
          c.tgt,
          (noted as [string, string][]).map(([schema, name]) => ({ schema, name })),
          true,
        )
        : readSequences(c.tgt, schemas, true), // "all", or an operation without the note
    ]);
    const onTarget = new Map(explicit.map((t) => [sequenceKey(t), t]));
    const floors = src.flatMap((s) => {
      const t = onTarget.get(sequenceKey(s));
      const floor = floorOf(s, t && { ...t, last: null });
      return floor === null ? [] : [{ ...s, floor }];
    });
    const margin = c.limits.sequenceMargin;
    const t1 = performance.now();
    const raised = await raiseSequences(c.tgt, floors, margin);
    return {
      sequences: src.length,
      columns_read: explicit.length,
      raised,
      margin,
      read_ms: Math.round(t1 - t0),
      raise_ms: Math.round(performance.now() - t1),
    };
  },
};

/**
 * After the resume, on the new primary: every sequence above its column's largest value. This
 * catches explicit ids written, between the prebump and the freeze, into a table that had none
 * above its sequence; until it has run, an insert that takes such a value fails with a duplicate
 * key (nothing is lost). Reports what it had to raise.
 */
const seqVerify: StepDef = {
  name: "seq_verify",
  // Best effort: the switchover is done and writes flow; a failure here (a lock, a column max
  // without an index under the statement timeout) is reported, never an operation left open.
  act: async (c) => {
    try {
      const tgt = await readSequences(c.tgt, await sequenceSchemas(c), true);
      const behind = tgt.filter((t) => t.max !== null && (t.last === null || t.last < t.max));
      const raised = await raiseSequences(
        c.tgt,
        behind.map((t) => ({ ...t, floor: t.max! })),
        c.limits.sequenceMargin,
      );
      const blocked = unraisable(tgt);
      const warnings = [
        raised
          ? `${raised} sequence(s) were below their column's largest value: ${
            behind.slice(0, 5).map((t) => `${t.schema}.${t.name}`).join(", ")
          }`
          : "",
        blocked.length ? unraisableWarning(blocked) : "",
      ].filter(Boolean);
      return {
        sequences: tgt.length,
        raised,
        ...(warnings.length ? { warning: warnings.join("; ") } : {}),
      };
    } catch (e) {
      return {
        warning: `sequences not verified after the resume (${
          (e as Error).message
        }): check them by hand, runbooks/failover.md "Sequences after a switchover"`,
      };
    }
  },
};

const detach: StepDef = {
  name: "detach",
  guard: expectRoles({ target: ["standby"] }, "from"),
  act: async (c) => {
    await dropSubscription(c, c.tgt, c.op.kind === "emergency" ? null : c.op.source);
  },
  undo: async (c) => {
    if ((await subscriptionStatus(c.tgt)).exists) return;
    await dropSlot(c.src, SUBSCRIPTION);
    await withWritableSession(
      c.tgt,
      (s) => ensureSubscription(s, siteUrl(c.rt, c.op.source), { copyData: false }),
    );
    return "forward subscription re-created (copy_data=false; the source was frozen)";
  },
};

/**
 * In the pause, after the detach: the reverse slot on the target (so it streams the target's own
 * changes from here on, and none the forward subscription applied), then the source's prepared
 * subscription is enabled. Without a prepared one (an operation from before reverse_prepare
 * existed) it is created here as a whole.
 */
const reverse: StepDef = {
  name: "reverse",
  act: async (c) => {
    const sub = await subscriptionStatus(c.src);
    if (!sub.exists) {
      const tables = await scopeTables(c.tgt, await storedScope(c.tgt));
      await ensurePublication(c.tgt, tables);
      await withWritableSession(
        c.src,
        (s) => ensureSubscription(s, siteUrl(c.rt, c.op.target), { copyData: false }),
      );
      return { publisher: c.op.target, subscriber: c.op.source, prepared: false };
    }
    const slot = sub.slotName ?? SUBSCRIPTION;
    if (!sub.enabled) {
      // A fresh slot, always: one that exists now was made before the detach (a leftover, or
      // ours before a crash) and could stream back rows the forward subscription applied. The
      // target is fenced until the epoch step, so a slot made now misses none of its writes.
      if ((await slotStatus(c.tgt, slot)).exists) await dropSlot(c.tgt, slot);
      await c.tgt`select pg_create_logical_replication_slot(${slot}, 'pgoutput')`;
      await withWritableSession(
        c.src,
        (s) => s.unsafe(`alter subscription "${SUBSCRIPTION}" enable`),
      );
    }
    return { publisher: c.op.target, subscriber: c.op.source, prepared: true };
  },
  undo: async (c) => {
    await dropSubscription(c, c.src, c.op.target);
    return "reverse subscription dropped";
  },
};

/**
 * The router's view, or undefined when its machines disagree (a route that failed part-way):
 * routing again is then the way forward, since every machine refuses to go back in epoch.
 */
async function currentRoute(c: StepContext) {
  try {
    return await c.router.current();
  } catch (e) {
    if ((e as { code?: string }).code === "pgbouncer_disagree") return undefined;
    throw e;
  }
}

const repoint: StepDef = {
  name: "repoint",
  // The router never goes back in epoch (it refuses too); a route past ours means the pair moved on.
  guard: async (c) => {
    const cur = await currentRoute(c);
    if (cur && cur.epoch !== null && cur.epoch > c.op.epochTo!) {
      throw new StepFailed("repoint", `PgBouncer already carries epoch ${cur.epoch}`);
    }
  },
  act: async (c) => {
    // The target's read-only default goes before PgBouncer can open a connection to it: a server
    // connection keeps the default its session started with, so one opened now (by a machine that
    // missed the PAUSE, or a restarted one) would refuse writes for its whole life. The guard
    // still refuses every write until the epoch step lifts it.
    await setReadOnlyDefault(c.tgt, false);
    const cur = await currentRoute(c);
    if (cur && c.rt.siteAt(cur.target) === c.op.target && cur.epoch === c.op.epochTo) {
      return { skipped: "already routed" };
    }
    const report = await c.router.route(endpointOf(c, c.op.target), c.op.epochTo!);
    return {
      routed_to: c.op.target,
      epoch: c.op.epochTo,
      ...(report
        ? { machines_routed: report.routed, machines_not_serving: report.notServing }
        : {}),
      ...(cur ? {} : { note: "the machines disagreed (a route failed part-way); routed forward" }),
    };
  },
};

const verifyRouting: StepDef = {
  name: "verify_routing",
  act: async (c) => {
    const cur = await c.router.current();
    if (c.rt.siteAt(cur.target) !== c.op.target || cur.epoch !== c.op.epochTo) {
      throw new StepFailed(
        "verify_routing",
        `PgBouncer routes to ${
          c.rt.siteAt(cur.target)
        } at epoch ${cur.epoch}, expected ${c.op.target} at ${c.op.epochTo}`,
      );
    }
    return { routed_to: c.op.target, epoch: cur.epoch };
  },
};

/**
 * Planned: the source is demoted (token revoked again, role standby at the new epoch), records
 * the target's first lease, and the target's fence is lifted — the step's last act. The lease is
 * checked before each action, and nothing but the lift sits between the grant and the lift (the
 * grant covers only its window).
 */
const epochPlanned: StepDef = {
  name: "epoch",
  guard: expectRoles({}, "to"),
  act: async (c) => {
    await setFence(c.src, "standby", c.op.epochTo!);
    c.assertLease();
    await setReadOnlyDefault(c.tgt, false); // done at the repoint already; idempotent on a resume
    await c.tgt`select 1`; // the target's connection is ready before the grant's window opens
    c.assertLease();
    const grant = await recordInitialGrant(c.src, c.op.target, c.op.epochTo!);
    await liftFence(c.tgt, c.op.epochTo!, grant === "off" ? "keep" : grant);
    return {
      target: "primary",
      source: "standby",
      epoch: c.op.epochTo,
      lease: grant === "off" ? "off" : "granted by the source",
    };
  },
};

/**
 * Emergency: the source is fenced if it can be reached at all; the target becomes primary with an
 * infinite lease (no standby is left to grant one until the old site is rejoined).
 */
const epochEmergency: StepDef = {
  name: "epoch",
  guard: expectRoles({}, "to"),
  act: async (c) => {
    let source = "unreachable";
    try {
      await withDeadline(
        setFence(
          c.src,
          "fenced",
          c.op.epochTo!,
          `replaced by site ${c.op.target} in emergency operation ${c.op.id}`,
        ),
        5000,
        "source",
      );
      source = "fenced";
    } catch {
      // Unreachable: its lease has run out (lease_wait), and it fences itself on its next tick.
    }
    c.assertLease();
    await setReadOnlyDefault(c.tgt, false);
    c.assertLease();
    await liftFence(c.tgt, c.op.epochTo!, "infinity");
    return { target: "primary", source, epoch: c.op.epochTo };
  },
};

const resume: StepDef = {
  name: "resume",
  act: async (c) => {
    await c.router.resume();
  },
};

const postcheck: StepDef = {
  name: "postcheck",
  act: async (c) => {
    const token = String(c.op.data.post_token);
    await c.tgt.begin(
      "read write",
      (tx) =>
        tx`insert into ha.markers (token, epoch, operation_id) values (${token}, ${c.op.epochTo}, ${c.op.id}) on conflict (token) do nothing`,
    );
    if (c.op.kind === "emergency") return { write_test: "ok" };
    try {
      const waited = await waitFor(
        c,
        "the post-check marker to replicate back",
        15_000,
        async () => (await c.src`select 1 from ha.markers where token = ${token}`).length > 0,
        100,
      );
      return { write_test: "ok", reverse_replication_ms: waited };
    } catch (e) {
      if (!(e instanceof StepFailed)) throw e;
      return {
        write_test: "ok",
        reverse_replication: "not confirmed",
        warning: "reverse replication did not deliver the post-check marker within 15 s",
      };
    }
  },
};

// --- emergency-only steps -------------------------------------------------------------------

const pauseEmergency: StepDef = {
  name: "pause",
  // Server connections stuck on a dead primary can hold PAUSE up; their transactions are lost
  // either way, so an emergency carries on unpaused rather than waiting. (KILL is not used:
  // after a KILL, PgBouncer 1.18 leaves new logins hanging even after RESUME.)
  act: async (c) => {
    try {
      await c.router.pause(c.limits.emergencyPauseTimeoutMs);
      return { paused: true };
    } catch (e) {
      return {
        paused: false,
        note: `PAUSE did not finish (${e instanceof Error ? e.message : e}); continuing unpaused`,
      };
    }
  },
};

/**
 * No promotion while the old primary may still hold a lease: grants stop (the operation is
 * recorded here, and the grant path refuses while it runs), and the step waits until the last
 * grant has run out on this site's clock, plus the margin.
 */
const leaseWait: StepDef = {
  name: "lease_wait",
  act: async (c) => {
    const [{ ttl }] = await c.tgt`select lease_ttl_seconds as ttl from ha.state where id`;
    if (ttl === null) {
      return {
        lease: "off",
        warning:
          `with the lease off, site ${c.op.source} keeps accepting writes from clients that reach it until it is fenced`,
      };
    }
    const until = await lastLeaseGranted(c.tgt, c.op.source);
    if (!until) return { lease: "never granted", waited_ms: 0 };
    const started = Date.now();
    while (true) {
      c.assertLease();
      const left = await msUntilExpired(c.tgt, until);
      if (left <= 0) break;
      if (Date.now() - started > c.limits.leaseWaitMs) {
        throw new StepFailed(
          "lease_wait",
          `the old primary's lease lasts ${Math.round(left)} ms more than the wait allows`,
        );
      }
      await sleep(Math.min(left, 250));
    }
    const rec = { last_lease_until: until.toISOString(), waited_ms: Date.now() - started };
    await c.data({ lease_wait: rec });
    return rec;
  },
};

const rpo: StepDef = {
  name: "rpo",
  act: async (c) => {
    const sub = await subscriptionStatus(c.tgt);
    if (!sub.exists) return { note: "subscription already detached; RPO recorded earlier" };
    const beat = await heartbeatOf(c.tgt, c.op.source);
    const estimate = {
      heartbeat_at: beat?.beatAt ?? null,
      heartbeat_age_seconds: beat?.ageSeconds ?? null,
      applied_remote_lsn: await appliedRemoteLsn(c.tgt),
      last_message_at: sub.lastMessageAt ?? null,
      estimate: beat
        ? `every commit on site ${c.op.source} before ${beat.beatAt} is on site ${c.op.target}; commits in the last ${beat.ageSeconds} s before the failover may be missing`
        : "no heartbeat from the old primary was ever applied (is pg_cron running ha_heartbeat there?): the loss window is unknown",
    };
    await c.data({ rpo: estimate });
    return estimate;
  },
};

export const PLANNED: readonly StepDef[] = [
  reversePrepare,
  seqPrebump,
  waitLag,
  pausePlanned,
  freeze,
  marker,
  waitMarker,
  seqSync,
  detach,
  reverse,
  repoint,
  verifyRouting,
  epochPlanned,
  resume,
  seqVerify,
  postcheck,
];

export const EMERGENCY: readonly StepDef[] = [
  pauseEmergency,
  leaseWait,
  rpo,
  detach,
  seqSync,
  repoint,
  verifyRouting,
  epochEmergency,
  resume,
  seqVerify,
  postcheck,
];

/** Planned operations roll back before this step and fail closed from it on. */
export const POINT_OF_NO_RETURN = "repoint";

export const PLANNED_STEPS = PLANNED.map((s) => s.name);
export const EMERGENCY_STEPS = EMERGENCY.map((s) => s.name);
