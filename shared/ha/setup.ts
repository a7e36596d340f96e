/**
 * Bringing a primary/standby pair under the toolkit: control rows on both sites, the publication
 * on the primary (default scope: every table in `public` plus auth.users and auth.identities),
 * the subscription on the standby, the route in PgBouncer with the epoch — and the checks that
 * say whether the pair is fit for a failover (replica identity, schema drift, data).
 */
import type { Sql } from "../db/mod.ts";
import { HttpError } from "../http/errors.ts";
import {
  ensurePublication,
  ensureSubscription,
  PUBLICATION,
  publicationExists,
  publicationTables,
  quoteQualified,
  replicaIdentityProblems,
  schemaFingerprint,
  SUBSCRIPTION,
  subscriptionStatus,
  tableChecksums,
} from "./replication.ts";
import type { HaRuntime } from "./runtime.ts";
import type { SiteName } from "./sites.ts";
import { readControlState } from "./state.ts";

export interface SetupOptions {
  schemas?: string[];
  extraTables?: string[];
  /** Copy existing rows into the standby (the default for a fresh standby). */
  copyData?: boolean;
  dryRun?: boolean;
}

export interface SetupReport {
  dry_run: boolean;
  primary: SiteName;
  standby: SiteName;
  epoch: number;
  tables: string[];
  actions: string[];
  replica_identity_problems: Record<string, string>[];
  missing_on_standby: string[];
  schema_drift: string[];
}

async function missingTables(sql: Sql, tables: string[]): Promise<string[]> {
  const rows = await sql`
    select t from unnest(${tables}::text[]) t
    where to_regclass(format('%I.%I', split_part(t, '.', 1), split_part(t, '.', 2))) is null`;
  return rows.map((r) => r.t);
}

/** Tables whose shape differs between the sites (by the per-table fingerprint). */
export async function schemaDrift(a: Sql, b: Sql, tables: string[]): Promise<string[]> {
  const [fa, fb] = await Promise.all([schemaFingerprint(a, tables), schemaFingerprint(b, tables)]);
  if (fa.fingerprint === fb.fingerprint) return [];
  const names = new Set([...Object.keys(fa.detail), ...Object.keys(fb.detail)]);
  return [...names].filter((n) => fa.detail[n] !== fb.detail[n]).sort();
}

/**
 * Idempotent: re-running it after a partial run completes it and changes nothing that is already
 * right. The first run names the configured PRIMARY_DB_URL site primary at epoch 1.
 */
export async function setupReplication(
  rt: HaRuntime,
  options: SetupOptions = {},
): Promise<SetupReport> {
  rt.requireSites();
  const p = rt.sites.get("primary").ops;
  const s = rt.sites.get("standby").ops;
  const [ps, ss] = await Promise.all([readControlState(p), readControlState(s)]);
  // After a switchover the roles are swapped: set up the direction the control rows say.
  let pubSite: SiteName = "primary";
  if (ps?.role === "standby" && ss?.role === "primary") pubSite = "standby";
  if (ps?.role === "fenced" || ss?.role === "fenced") {
    throw new HttpError(
      409,
      "site_fenced",
      "A site is fenced; rebuild it as a standby first (runbooks/emergency.md).",
    );
  }
  const subSite: SiteName = pubSite === "primary" ? "standby" : "primary";
  const pub = rt.sites.get(pubSite).ops;
  const sub = rt.sites.get(subSite).ops;
  const epoch = Math.max(ps?.epoch ?? 0, ss?.epoch ?? 0, 1);
  const dryRun = options.dryRun ?? false;
  const actions: string[] = [];

  const scopeRows = await pub`select schemaname || '.' || tablename as t from ha.default_scope(${
    options.schemas ?? ["public"]
  }::text[], ${options.extraTables ?? ["auth.users", "auth.identities"]}::text[])`;
  const tables = scopeRows.map((r) => r.t as string);
  const missing = await missingTables(sub, tables);
  const present = tables.filter((t) => !missing.includes(t));
  const drift = await schemaDrift(pub, sub, present);

  const report: SetupReport = {
    dry_run: dryRun,
    primary: pubSite,
    standby: subSite,
    epoch,
    tables,
    actions,
    replica_identity_problems: [],
    missing_on_standby: missing,
    schema_drift: drift,
  };
  if (missing.length || drift.length) {
    throw new HttpError(
      412,
      "schema_mismatch",
      "The standby's schema does not match the primary's; apply the same migrations to both.",
      {
        missing_on_standby: missing,
        schema_drift: drift,
      },
    );
  }

  if (!dryRun) {
    await pub`select ha.init_state(${pubSite}, 'primary', ${epoch})`;
    await sub.begin(
      "read write",
      (tx) => tx`select ha.init_state(${subSite}, 'standby', ${epoch})`,
    );
    actions.push(`control rows: ${pubSite}=primary, ${subSite}=standby at epoch ${epoch}`);
  }
  const hadPublication = await publicationExists(pub);
  if (!dryRun) {
    await ensurePublication(pub, { schemas: options.schemas, extraTables: options.extraTables });
    const now = await publicationTables(pub);
    actions.push(
      hadPublication
        ? `publication ${PUBLICATION} checked (${now.length} tables)`
        : `publication ${PUBLICATION} created (${now.length} tables)`,
    );
    report.replica_identity_problems = await replicaIdentityProblems(pub);
  } else {
    actions.push(
      hadPublication
        ? `would check publication ${PUBLICATION}`
        : `would create publication ${PUBLICATION}`,
    );
  }

  const status = await subscriptionStatus(sub);
  if (!status.exists) {
    if (options.copyData !== false && !dryRun) {
      const nonEmpty: string[] = [];
      for (const t of tables.filter((t) => t !== "ha.markers")) {
        const [{ any }] = await sub.unsafe(
          `select exists (select 1 from ${quoteQualified(t)}) as any`,
        );
        if (any) nonEmpty.push(t);
      }
      if (nonEmpty.length) {
        throw new HttpError(
          412,
          "standby_not_empty",
          "The standby already has rows in published tables; copying would duplicate them.",
          {
            tables: nonEmpty,
          },
        );
      }
    }
    if (!dryRun) {
      const publisherUrl = pubSite === "primary"
        ? rt.config.primaryDbUrl!
        : rt.config.standbyDbUrl!;
      await withWritableSession(
        sub,
        (x) => ensureSubscription(x, publisherUrl, { copyData: options.copyData ?? true }),
      );
      actions.push(`subscription created on ${subSite} (copy_data=${options.copyData ?? true})`);
    } else actions.push(`would create the subscription on ${subSite}`);
  } else {
    actions.push(`subscription on ${subSite} exists (enabled=${status.enabled})`);
  }

  if (rt.routerConfigured()) {
    const route = await rt.router().current();
    const routed = rt.siteAt(route.target);
    if (routed !== pubSite || route.epoch !== epoch) {
      if (!dryRun) {
        const e = rt.sites.get(pubSite).endpoint;
        await rt.router().route({ host: e.host, port: e.port, dbname: e.database }, epoch);
        actions.push(`PgBouncer routed to ${pubSite} at epoch ${epoch}`);
      } else actions.push(`would route PgBouncer to ${pubSite} at epoch ${epoch}`);
    } else actions.push(`PgBouncer already routes to ${pubSite} at epoch ${epoch}`);
  }
  return report;
}

/**
 * Runs `fn` on one reserved connection whose session is writable even when the database default
 * is read-only (a frozen or fenced site): CREATE/ALTER SUBSCRIPTION cannot run inside BEGIN.
 */
export async function withWritableSession<T>(
  sql: Sql,
  fn: (session: Sql) => Promise<T>,
): Promise<T> {
  const session = await sql.reserve();
  try {
    await session`set default_transaction_read_only = off`;
    return await fn(session as unknown as Sql);
  } finally {
    await session`reset default_transaction_read_only`.catch(() => {});
    session.release();
  }
}

/** Row counts and sampled checksums on both sides for the published tables. */
export async function verifyData(rt: HaRuntime, from: SiteName, tables?: string[], sample = 1000) {
  const a = rt.sites.get(from).ops;
  const b = rt.sites.get(rt.sites.other(from)).ops;
  const list = tables ?? (await publicationTables(a)).filter((t) => t !== "ha.markers");
  const [ca, cb] = await Promise.all([
    tableChecksums(a, list, sample),
    tableChecksums(b, list, sample),
  ]);
  return list.map((t) => {
    const key = Object.keys(ca).find((k) => k.replaceAll('"', "") === t) ?? t;
    const x = ca[key];
    const y = cb[key];
    return {
      table: t,
      rows: { [from]: x?.rows ?? null, [rt.sites.other(from)]: y?.rows ?? null },
      match: !!x && !!y && x.rows === y.rows && x.checksum === y.checksum,
    };
  });
}

export interface RejoinReport {
  site: SiteName;
  primary: SiteName;
  epoch: number;
  truncated: string[];
  actions: string[];
}

/**
 * Rebuilds a fenced (or stray) site as the standby of the current primary: its copy of the
 * published tables is discarded and copied afresh. This is how the old primary comes back after
 * an emergency failover — whatever it committed that never replicated is discarded here, so the
 * caller must confirm it (and should first export what `rpo` in the emergency operation names).
 */
export async function rejoinAsStandby(rt: HaRuntime, site: SiteName): Promise<RejoinReport> {
  rt.requireSites();
  const obs = await rt.observe(2500);
  const primary = obs.topology.primary;
  if (!primary) throw new HttpError(412, "no_primary", "There is no healthy primary to rejoin.");
  if (primary === site) {
    throw new HttpError(
      412,
      "site_is_primary",
      `Site ${site} is the primary; it cannot rejoin as a standby.`,
    );
  }
  if (obs.routedSite === site) {
    throw new HttpError(
      412,
      "site_is_routed",
      `PgBouncer routes to site ${site}; it cannot be rebuilt.`,
    );
  }
  const view = obs.topology.sites[site];
  if (!view.reachable) throw new HttpError(503, "site_unreachable", `Site ${site} is unreachable.`);
  const epoch = obs.epoch ?? 1;
  const f = rt.sites.get(site).ops;
  const p = rt.sites.get(primary).ops;
  const actions: string[] = [];

  // The fenced site stays read-only for applications; our session lifts it for itself only.
  await f.begin("read write", async (tx) => {
    const [{ db }] = await tx`select current_database() as db`;
    await tx.unsafe(
      `alter database "${String(db).replaceAll('"', '""')}" set default_transaction_read_only = on`,
    );
  });
  const sub = await subscriptionStatus(f);
  if (sub.exists) {
    await withWritableSession(f, async (s) => {
      await s.unsafe(`alter subscription "${SUBSCRIPTION}" disable`);
      await s.unsafe(`alter subscription "${SUBSCRIPTION}" set (slot_name = none)`);
      await s.unsafe(`drop subscription "${SUBSCRIPTION}"`);
    });
    actions.push(`dropped the old subscription on ${site}`);
  }
  for (const [sql, where] of [[f, site], [p, primary]] as const) {
    const dropped = await sql`
      select pg_drop_replication_slot(slot_name) from pg_replication_slots
      where slot_name = ${SUBSCRIPTION} and not active and database = current_database()`;
    if (dropped.length) actions.push(`dropped the stale replication slot on ${where}`);
  }
  await withWritableSession(p, (s) => ensurePublication(s));
  const tables = await publicationTables(p);
  const truncated = tables.filter((t) => t !== "ha.markers");
  await f.begin(
    "read write",
    (tx) => tx.unsafe(`truncate table ${tables.map(quoteQualified).join(", ")} cascade`),
  );
  actions.push(`truncated ${truncated.length} published tables on ${site} (cascade)`);
  const publisherUrl = primary === "primary" ? rt.config.primaryDbUrl! : rt.config.standbyDbUrl!;
  await withWritableSession(f, (s) => ensureSubscription(s, publisherUrl, { copyData: true }));
  actions.push(`subscribed ${site} to ${primary} with copy_data=true`);
  await f.begin(
    "read write",
    (tx) =>
      tx`update ha.state set role = 'standby', fenced = false, fenced_reason = null, epoch = greatest(epoch, ${epoch}),
           updated_at = now() where id`,
  );
  actions.push(`${site} is now standby at epoch ${epoch} (read-only for applications)`);
  return { site, primary, epoch, truncated, actions };
}
