/**
 * Failover operations and their audit trail, persisted in `ha.operations` / `ha.operation_steps`
 * on the site that takes over (it survives the failover). Every write runs in an explicit
 * READ WRITE transaction: that site may still be read-only by default from an earlier switchover.
 * A lease (owner + expiry, renewed by a heartbeat) decides who drives a running operation; a
 * crashed driver's lease expires and a re-invocation takes over.
 */
import type { Sql } from "../db/mod.ts";
import { HttpError } from "../http/errors.ts";
import { withDeadline } from "./deadline.ts";
import type { SiteName, Sites } from "./sites.ts";

export type OperationKind = "switchover" | "emergency" | "failback";
export type OperationState =
  | "running"
  | "succeeded"
  | "rolled_back"
  | "failed_closed"
  | "failed"
  | "abandoned";

export interface Operation {
  id: string;
  kind: OperationKind;
  idempotencyKey: string | null;
  state: OperationState;
  step: string;
  source: SiteName;
  target: SiteName;
  epochFrom: number | null;
  epochTo: number | null;
  leaseOwner: string | null;
  leaseExpiresAt: string | null;
  leaseExpired: boolean;
  data: Record<string, unknown>;
  error: string | null;
  createdAt: string;
  updatedAt: string;
  finishedAt: string | null;
  /** The site whose ha.operations holds this row. */
  storedOn: SiteName;
}

export interface StepRecord {
  step: string;
  outcome: string;
  details: Record<string, unknown>;
  at: string;
}

const COLUMNS =
  `id, kind, idempotency_key, state, step, source_site, target_site, epoch_from, epoch_to,
  lease_owner, lease_expires_at, coalesce(lease_expires_at < now(), true) as lease_expired, data, error,
  created_at, updated_at, finished_at`;

function iso(v: unknown): string | null {
  return v ? new Date(v as string).toISOString() : null;
}

function toOperation(r: Record<string, unknown>, storedOn: SiteName): Operation {
  return {
    id: String(r.id),
    kind: r.kind as OperationKind,
    idempotencyKey: (r.idempotency_key as string) ?? null,
    state: r.state as OperationState,
    step: String(r.step),
    source: r.source_site as SiteName,
    target: r.target_site as SiteName,
    epochFrom: r.epoch_from === null ? null : Number(r.epoch_from),
    epochTo: r.epoch_to === null ? null : Number(r.epoch_to),
    leaseOwner: (r.lease_owner as string) ?? null,
    leaseExpiresAt: iso(r.lease_expires_at),
    leaseExpired: Boolean(r.lease_expired),
    data: (r.data as Record<string, unknown>) ?? {},
    error: (r.error as string) ?? null,
    createdAt: iso(r.created_at)!,
    updatedAt: iso(r.updated_at)!,
    finishedAt: iso(r.finished_at),
    storedOn,
  };
}

export interface NewOperation {
  kind: OperationKind;
  idempotencyKey?: string;
  source: SiteName;
  target: SiteName;
  epochFrom: number;
  epochTo: number;
  step: string;
  data: Record<string, unknown>;
}

export class OperationStore {
  constructor(readonly sql: Sql, readonly site: SiteName) {}

  async byKey(key: string): Promise<Operation | undefined> {
    const rows = await this.sql.unsafe(
      `select ${COLUMNS} from ha.operations where idempotency_key = $1`,
      [key],
    );
    return rows.length ? toOperation(rows[0], this.site) : undefined;
  }

  async byId(id: string): Promise<Operation | undefined> {
    const rows = await this.sql.unsafe(`select ${COLUMNS} from ha.operations where id = $1`, [id]);
    return rows.length ? toOperation(rows[0], this.site) : undefined;
  }

  async running(): Promise<Operation | undefined> {
    const rows = await this.sql.unsafe(
      `select ${COLUMNS} from ha.operations where state = 'running' limit 1`,
    );
    return rows.length ? toOperation(rows[0], this.site) : undefined;
  }

  /** An operation that is running or failed closed: it must be resumed or abandoned first. */
  async unfinished(): Promise<Operation | undefined> {
    const rows = await this.sql.unsafe(
      `select ${COLUMNS} from ha.operations where state in ('running', 'failed_closed')
       order by created_at desc limit 1`,
    );
    return rows.length ? toOperation(rows[0], this.site) : undefined;
  }

  async recent(limit: number): Promise<Operation[]> {
    const rows = await this.sql.unsafe(
      `select ${COLUMNS} from ha.operations order by created_at desc limit $1`,
      [limit],
    );
    return rows.map((r) => toOperation(r, this.site));
  }

  /** Inserts a running operation leased to `owner`; 409 if one is already running here. */
  async create(op: NewOperation, owner: string, leaseMs: number): Promise<Operation> {
    try {
      const rows = await this.sql.begin("read write", async (tx) => {
        const [{ id }] = await tx`
          insert into ha.operations (kind, idempotency_key, source_site, target_site, epoch_from, epoch_to, step, data,
                                     lease_owner, lease_expires_at)
          values (${op.kind}, ${
          op.idempotencyKey ?? null
        }, ${op.source}, ${op.target}, ${op.epochFrom}, ${op.epochTo},
                  ${op.step}, ${tx.json(op.data as never)}, ${owner},
                  now() + make_interval(secs => ${leaseMs}::float8 / 1000))
          returning id`;
        return await tx.unsafe(`select ${COLUMNS} from ha.operations where id = $1`, [id]);
      });
      return toOperation(rows[0], this.site);
    } catch (e) {
      const code = (e as { code?: string }).code;
      const constraint = (e as { constraint_name?: string }).constraint_name ?? "";
      if (code === "23505" && constraint.includes("idempotency")) {
        throw new HttpError(
          409,
          "idempotency_conflict",
          "That idempotency key belongs to another operation.",
        );
      }
      if (code === "23505") {
        throw new HttpError(409, "operation_in_progress", "Another failover operation is running.");
      }
      throw e;
    }
  }

  /** Takes the lease if it is free, expired or already ours; undefined when someone else holds it. */
  async claim(id: string, owner: string, leaseMs: number): Promise<Operation | undefined> {
    const rows = await this.sql.begin("read write", (tx) =>
      tx.unsafe(
        `update ha.operations
            set lease_owner = $2, lease_expires_at = now() + make_interval(secs => $3::float8 / 1000), updated_at = now(),
                state = case when state = 'failed_closed' then 'running' else state end
          where id = $1 and state in ('running', 'failed_closed')
            and (lease_owner is null or lease_owner = $2 or lease_expires_at < now())
          returning ${COLUMNS}`,
        [id, owner, leaseMs],
      ));
    return rows.length ? toOperation(rows[0], this.site) : undefined;
  }

  async heartbeat(id: string, owner: string, leaseMs: number): Promise<boolean> {
    const rows = await this.sql.begin(
      "read write",
      (tx) =>
        tx`update ha.operations set lease_expires_at = now() + make_interval(secs => ${leaseMs}::float8 / 1000)
         where id = ${id} and lease_owner = ${owner} and state = 'running' returning id`,
    );
    return rows.length > 0;
  }

  /** Moves to `step`, merging `data`; only while we hold the lease. */
  async advance(
    id: string,
    owner: string,
    step: string,
    data: Record<string, unknown> = {},
  ): Promise<void> {
    const rows = await this.sql.begin(
      "read write",
      (tx) =>
        tx`update ha.operations set step = ${step}, data = data || ${
          tx.json(data as never)
        }, updated_at = now()
         where id = ${id} and lease_owner = ${owner} returning id`,
    );
    if (!rows.length) throw new LeaseLost(id);
  }

  /**
   * One transaction per step boundary: the audit row for the step just done, then (if there is
   * one) the move to the next step and its "started" row. Only while we hold the lease.
   */
  async transition(
    id: string,
    owner: string,
    done: { step: string; details: Record<string, unknown> } | undefined,
    next: string | undefined,
  ): Promise<void> {
    await this.sql.begin("read write", async (tx) => {
      if (done) {
        await tx`insert into ha.operation_steps (operation_id, step, outcome, details)
                 values (${id}, ${done.step}, 'done', ${tx.json(done.details as never)})`;
      }
      if (next) {
        const rows = await tx`update ha.operations set step = ${next}, updated_at = now()
                              where id = ${id} and lease_owner = ${owner} returning id`;
        if (!rows.length) throw new LeaseLost(id);
        await tx`insert into ha.operation_steps (operation_id, step, outcome) values (${id}, ${next}, 'started')`;
      }
    });
  }

  async record(
    id: string,
    step: string,
    outcome: string,
    details: Record<string, unknown> = {},
  ): Promise<void> {
    await this.sql.begin(
      "read write",
      (tx) =>
        tx`insert into ha.operation_steps (operation_id, step, outcome, details)
         values (${id}, ${step}, ${outcome}, ${tx.json(details as never)})`,
    );
  }

  async finish(
    id: string,
    owner: string,
    state: OperationState,
    error: string | null,
    data: Record<string, unknown> = {},
  ): Promise<void> {
    await this.sql.begin(
      "read write",
      (tx) =>
        tx`update ha.operations set state = ${state}, error = ${error}, data = data || ${
          tx.json(data as never)
        },
             finished_at = case when ${state} in ('running', 'failed_closed') then null else now() end,
             lease_owner = null, lease_expires_at = null, updated_at = now()
         where id = ${id} and (lease_owner = ${owner} or lease_owner is null)`,
    );
  }

  /**
   * Closes an operation nobody drives (finished-with-failure or lease expired) as abandoned;
   * undefined when it is driven or already ended. Nothing it did is undone by this.
   */
  async abandon(id: string, reason: string): Promise<Operation | undefined> {
    const rows = await this.sql.begin("read write", async (tx) => {
      const done = await tx.unsafe(
        `update ha.operations
            set state = 'abandoned', error = $2, finished_at = now(), lease_owner = null,
                lease_expires_at = null, updated_at = now()
          where id = $1 and state in ('running', 'failed_closed')
            and (lease_owner is null or lease_expires_at < now())
          returning ${COLUMNS}`,
        [id, reason],
      );
      if (done.length) {
        await tx`insert into ha.operation_steps (operation_id, step, outcome, details)
                 values (${id}, ${done[0].step}, 'info', ${
          tx.json({ abandoned: reason } as never)
        })`;
      }
      return done;
    });
    return rows.length ? toOperation(rows[0], this.site) : undefined;
  }

  async steps(id: string): Promise<StepRecord[]> {
    const rows = await this
      .sql`select step, outcome, details, at from ha.operation_steps where operation_id = ${id} order by id`;
    return rows.map((r) => ({
      step: r.step,
      outcome: r.outcome,
      details: r.details,
      at: iso(r.at)!,
    }));
  }
}

export class LeaseLost extends Error {
  constructor(id: string, why = "the lease was taken over by another invocation") {
    super(`operation ${id}: ${why}`);
    this.name = "LeaseLost";
  }
}

/** Looks an operation up on both sites (whichever answers), by id or idempotency key. */
export async function findOperation(
  sites: Sites,
  by: { id?: string; key?: string },
): Promise<{ op: Operation; store: OperationStore } | undefined> {
  for (const name of ["standby", "primary"] as SiteName[]) {
    const store = new OperationStore(sites.get(name).ops, name);
    try {
      const op = await withDeadline(
        by.id ? store.byId(by.id) : store.byKey(by.key!),
        3000,
        `site ${name}`,
      );
      if (op) return { op, store };
    } catch {
      // An unreachable site cannot hold the answer we can use; try the other one.
    }
  }
  return undefined;
}

/** The running operation on either site, if any. */
export async function runningOperation(sites: Sites): Promise<Operation | undefined> {
  const found = await Promise.all(
    (["primary", "standby"] as SiteName[]).map((n) =>
      withDeadline(new OperationStore(sites.get(n).ops, n).running(), 3000, n).catch(() =>
        undefined
      )
    ),
  );
  return found.find((o) => o);
}

/** Recent operations from both sites, newest first. */
export async function recentOperations(sites: Sites, limit = 20): Promise<Operation[]> {
  const all = await Promise.all(
    (["primary", "standby"] as SiteName[]).map((n) =>
      withDeadline(new OperationStore(sites.get(n).probe, n).recent(limit), 2000, n).catch(() =>
        [] as Operation[]
      )
    ),
  );
  return all.flat().sort((a, b) => b.createdAt.localeCompare(a.createdAt)).slice(0, limit);
}
