/**
 * Bringing a primary/standby pair under the toolkit: control rows on both sites, the publication
 * on the primary (default scope: every table in `public` plus auth.users and auth.identities),
 * the write guard on every replicated table of both sites, the standby fenced and the primary's
 * fence lifted with its first lease, the subscription on the standby, the route in PgBouncer with
 * the epoch — and the checks that say whether the pair is fit for a failover.
 */
import type { Sql } from "../db/mod.ts";
import { HttpError } from "../http/errors.ts";
import {
  endClientSessions,
  fenceStatus,
  guardGaps,
  installGuards,
  liftFence,
  setFence,
  setReadOnlyDefault,
  withWritePass,
} from "./fence.ts";
import { DEFAULT_LEASE, type LeaseSettings, recordInitialGrant } from "./lease.ts";
import {
  DEFAULT_SCOPE,
  ensurePublication,
  ensureSubscription,
  isToolkitTable,
  missingTables,
  pairs,
  PUBLICATION,
  publicationExists,
  publicationTables,
  qualified,
  refreshSubscription,
  replicaIdentityProblems,
  sameTable,
  schemaFingerprint,
  type Scope,
  scopeTables,
  subscribedTables,
  SUBSCRIPTION,
  subscriptionStatus,
  tableChecksums,
  tableLabel,
  type TableRef,
  unpublishableTables,
} from "./replication.ts";
import { runningOperation } from "./operations.ts";
import type { HaRuntime } from "./runtime.ts";
import type { SiteName } from "./sites.ts";
import { readControlState } from "./state.ts";

export interface SetupOptions {
  schemas?: string[];
  extraTables?: TableRef[];
  /** Copy existing rows into the standby (the default for a fresh standby). */
  copyData?: boolean;
  dryRun?: boolean;
  /** The write lease; `ttlSeconds: null` turns it off. Default: on, 30 s, renewed every 5 s. */
  lease?: LeaseSettings;
  /** "cron": pg_cron 1.5+ runs ha.lease_tick(); "external": the operator's own scheduler does. */
  leaseRenewal?: "cron" | "external";
}

export interface SetupReport {
  dry_run: boolean;
  primary: SiteName;
  standby: SiteName;
  epoch: number;
  tables: string[];
  guarded: { primary: number; standby: number };
  lease: Record<string, unknown>;
  actions: string[];
  replica_identity_problems: Record<string, string>[];
  missing_on_standby: string[];
  schema_drift: string[];
  /**
   * Tables whose guard could not be set to fire ALWAYS (this role does not own them, e.g. auth.*
   * on hosted Supabase): a session in replica mode is not refused there.
   */
  guard_origin_only?: string[];
}

/** Tables whose shape differs between the sites (by the per-table fingerprint). */
export async function schemaDrift(a: Sql, b: Sql, tables: TableRef[]): Promise<string[]> {
  const [fa, fb] = await Promise.all([schemaFingerprint(a, tables), schemaFingerprint(b, tables)]);
  if (fa.fingerprint === fb.fingerprint) return [];
  const names = new Set([...Object.keys(fa.detail), ...Object.keys(fb.detail)]);
  return [...names].filter((n) => fa.detail[n] !== fb.detail[n]).sort();
}

interface StoredLease {
  lease: LeaseSettings;
  renewal: "cron" | "external";
  configured: boolean;
}

/** The lease settings a site was set up with, or the defaults. */
async function storedLease(sql: Sql): Promise<StoredLease> {
  const rows = await sql`
    select lease_ttl_seconds, lease_renew_seconds, lease_renewal from ha.state where id`;
  const r = rows[0];
  if (!r || r.lease_renewal === null) {
    return { lease: DEFAULT_LEASE, renewal: "cron", configured: false };
  }
  return {
    lease: {
      ttlSeconds: r.lease_ttl_seconds === null ? null : Number(r.lease_ttl_seconds),
      renewSeconds: Number(r.lease_renew_seconds ?? DEFAULT_LEASE.renewSeconds),
    },
    renewal: r.lease_renewal,
    configured: true,
  };
}

/** The scope a site was set up with (ha.state.scope), or the default. */
export async function storedScope(sql: Sql): Promise<Scope> {
  const rows = await sql`select scope from ha.state where id`;
  const s = rows[0]?.scope as Scope | undefined;
  return s?.schemas ? s : DEFAULT_SCOPE;
}

function scopeOf(options: SetupOptions, stored: Scope): Scope {
  if (!options.schemas && !options.extraTables) return stored;
  return {
    schemas: options.schemas ?? DEFAULT_SCOPE.schemas,
    tables:
      (options.extraTables ?? DEFAULT_SCOPE.tables.map(([schema, name]) => ({ schema, name })))
        .map((t) => [t.schema, t.name]),
  };
}

/** The epoch every witness agrees not to go below: both sites and the router. */
async function witnessedEpoch(rt: HaRuntime, siteEpochs: (number | undefined)[]) {
  const route = rt.routerConfigured() ? await rt.router().current() : undefined;
  const epoch = Math.max(1, ...siteEpochs.map((e) => e ?? 0), route?.epoch ?? 0);
  return { epoch, route };
}

/**
 * Idempotent: re-running it after a partial run completes it and changes nothing that is already
 * right. The first run names the configured PRIMARY_DB_URL site primary at epoch 1. Refused (409)
 * while a failover operation runs.
 */
export async function setupReplication(
  rt: HaRuntime,
  options: SetupOptions = {},
): Promise<SetupReport> {
  rt.requireSites();
  const running = await runningOperation(rt.sites);
  if (running) {
    throw new HttpError(409, "operation_in_progress", "A failover operation is running.", {
      operation_id: running.id,
    });
  }
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
      "A site is fenced; rebuild it as a standby first (POST /failover/rejoin, runbooks/emergency.md).",
    );
  }
  const subSite = rt.sites.other(pubSite);
  const pub = rt.sites.get(pubSite).ops;
  const sub = rt.sites.get(subSite).ops;
  const { epoch, route } = await witnessedEpoch(rt, [ps?.epoch, ss?.epoch]);
  const routed = rt.siteAt(route?.target);
  if (route?.epoch !== null && route?.epoch === epoch && routed && routed !== pubSite) {
    throw new HttpError(
      409,
      "epoch_conflict",
      `PgBouncer routes epoch ${epoch} to site ${routed}, but the control rows make site ${pubSite} primary.`,
    );
  }
  const dryRun = options.dryRun ?? false;
  const actions: string[] = [];
  const scope = scopeOf(options, await storedScope(pub));
  // Running setup again keeps the scope and lease it was given, unless told otherwise.
  const stored = await storedLease(pub);
  const lease = options.lease ?? stored.lease;
  const renewal = options.leaseRenewal ?? stored.renewal;

  const tables = await scopeTables(pub, scope);
  const missing = await missingTables(sub, tables);
  const present = tables.filter((t) =>
    !missing.some((m) => m.schema === t.schema && m.name === t.name)
  );
  const drift = await schemaDrift(pub, sub, present);
  const report: SetupReport = {
    dry_run: dryRun,
    primary: pubSite,
    standby: subSite,
    epoch,
    tables: tables.map(tableLabel),
    guarded: { primary: 0, standby: 0 },
    lease: { ttl_seconds: lease.ttlSeconds, renew_seconds: lease.renewSeconds },
    actions,
    replica_identity_problems: [],
    missing_on_standby: missing.map(tableLabel),
    schema_drift: drift,
  };
  if (missing.length || drift.length) {
    throw new HttpError(
      412,
      "schema_mismatch",
      "The standby's schema does not match the primary's; apply the same migrations to both.",
      { missing_on_standby: report.missing_on_standby, schema_drift: drift },
    );
  }
  const unpublishable = await unpublishableTables(pub, tables);
  if (unpublishable.length) {
    throw new HttpError(
      412,
      "replica_identity_missing",
      "Publishing these tables would make PostgreSQL refuse their UPDATEs and DELETEs on the primary. Give each a primary key or `ALTER TABLE … REPLICA IDENTITY FULL`, or leave it out of the scope; nothing was changed.",
      { tables: unpublishable },
    );
  }
  const leaseUrls = checkLeaseConfig(rt, lease);
  await refuseTwoPhaseCommit(pub, sub);
  if (dryRun) {
    actions.push(`would guard ${tables.length} tables on both sites and fence site ${subSite}`);
  } else {
    await configureSites(rt, { pubSite, subSite, epoch, scope, lease, renewal, leaseUrls });
    // Standby first: guarded and fenced before the primary is lifted, so there is never a
    // moment with two writable sites; the primary is lifted before its guard is installed, so
    // a pair upgraded from the read-only fence keeps taking writes throughout.
    report.guarded.standby = await installGuards(sub, tables);
    const ended = await fenceStandby(sub, epoch);
    actions.push(
      `site ${subSite} is the standby at epoch ${epoch}: guarded, fenced` +
        (ended ? `, ${ended} sessions ended` : ""),
    );
    report.lease = await liftPrimary(pub, sub, subSite, pubSite, epoch, lease, actions);
    report.guarded.primary = await installGuards(pub, tables);
    actions.push(
      `write guard on ${tables.length} tables of both sites (${report.guarded.primary} + ${report.guarded.standby} installed now)`,
    );
    report.lease.renewal = await scheduleRenewal(pub, sub, lease, renewal);
  }

  const hadPublication = await publicationExists(pub);
  if (!dryRun) {
    const published = await ensurePublication(pub, tables);
    actions.push(
      `publication ${PUBLICATION} ${
        hadPublication ? "checked" : "created"
      } (${published.length} tables)`,
    );
    report.replica_identity_problems = await replicaIdentityProblems(pub);
  } else {
    actions.push(`would ${hadPublication ? "check" : "create"} publication ${PUBLICATION}`);
  }
  await ensureStandbySubscription(rt, { pubSite, subSite, tables, options, actions });
  if (!dryRun) {
    report.guard_origin_only = await originOnlyGuards(pub, tables);
  }

  if (route) {
    if (routed !== pubSite || route.epoch !== epoch) {
      if (!dryRun) {
        const e = rt.sites.get(pubSite).endpoint;
        await rt.router().route({ host: e.host, port: e.port, dbname: e.database }, epoch);
        actions.push(`PgBouncer routed to ${pubSite} at epoch ${epoch}`);
      } else actions.push(`would route PgBouncer to ${pubSite} at epoch ${epoch}`);
    } else actions.push(`PgBouncer already routes to ${pubSite} at epoch ${epoch}`);
  }
  rt.shared.clear();
  return report;
}

/**
 * A prepared transaction can be committed later with no check (COMMIT PREPARED runs no trigger),
 * on a site fenced meanwhile: the fence holds only with two-phase commit off.
 */
async function refuseTwoPhaseCommit(pub: Sql, sub: Sql): Promise<void> {
  const on = await Promise.all([pub, sub].map(async (sql) => {
    const [r] = await sql`select current_setting('max_prepared_transactions')::int as n`;
    return Number(r.n) > 0;
  }));
  if (on.some(Boolean)) {
    throw new HttpError(
      412,
      "two_phase_commit_on",
      "max_prepared_transactions is above 0 on a site: a prepared transaction could commit on a fenced site. Set it to 0 (the PostgreSQL and Supabase default).",
    );
  }
}

async function originOnlyGuards(sql: Sql, tables: TableRef[]): Promise<string[]> {
  const [schemas, names] = pairs(tables);
  const rows =
    await sql`select * from ha.write_guard_origin_only(${schemas}::text[], ${names}::text[])`;
  return rows.map((r) => tableLabel({ schema: r.schemaname, name: r.tablename }));
}

/** The lease needs a token the function accepts and the URL of each site's failover function. */
function checkLeaseConfig(rt: HaRuntime, lease: LeaseSettings) {
  const urls = { primary: rt.config.primaryFailoverUrl, standby: rt.config.standbyFailoverUrl };
  if (lease.ttlSeconds === null) return urls;
  const missing = [
    !rt.config.leaseToken ? "HA_LEASE_TOKEN" : "",
    !urls.primary ? "PRIMARY_FAILOVER_URL (or PRIMARY_SUPABASE_URL)" : "",
    !urls.standby ? "STANDBY_FAILOVER_URL (or STANDBY_SUPABASE_URL)" : "",
  ].filter(Boolean);
  if (missing.length) {
    throw new HttpError(
      412,
      "lease_not_configured",
      `The write lease needs ${
        missing.join(", ")
      }; set them, or set up with "lease": false (see docs/ha-architecture.md).`,
      { missing },
    );
  }
  if (lease.renewSeconds * 2 > lease.ttlSeconds) {
    throw new HttpError(
      412,
      "lease_renewal_too_slow",
      `A lease of ${lease.ttlSeconds} s must be renewed at least twice per TTL (renew_seconds ≤ ${
        Math.floor(lease.ttlSeconds / 2)
      }).`,
    );
  }
  return urls;
}

/** Control rows, scope, lease settings and the lease token on both sites. */
async function configureSites(
  rt: HaRuntime,
  c: {
    pubSite: SiteName;
    subSite: SiteName;
    epoch: number;
    scope: Scope;
    lease: LeaseSettings;
    renewal: "cron" | "external";
    leaseUrls: Record<SiteName, string | undefined>;
  },
): Promise<void> {
  for (const site of [c.pubSite, c.subSite]) {
    const sql = rt.sites.get(site).ops;
    const peer = rt.sites.other(site);
    // A site's lease is renewed by the function deployed with the OTHER site.
    const leaseUrl = c.leaseUrls[peer] ? `${c.leaseUrls[peer]}/lease` : null;
    // The role is not set here: only ha.set_fence and ha.lift_fence change it, with the token.
    await sql.begin("read write", async (tx) => {
      await tx`insert into ha.state (id, site, role, epoch) values (true, ${site}, 'standby', ${c.epoch})
               on conflict (id) do update set site = excluded.site,
                 epoch = greatest(ha.state.epoch, excluded.epoch)`;
      await tx`update ha.state set peer = ${peer}, scope = ${tx.json(c.scope as never)},
                 lease_ttl_seconds = ${c.lease.ttlSeconds}, lease_renew_seconds = ${c.lease.renewSeconds},
                 lease_renewal = ${c.renewal}, lease_url = ${leaseUrl}, updated_at = now()
               where id`;
    });
    if (c.lease.ttlSeconds !== null && rt.config.leaseToken) {
      await storeLeaseToken(sql, rt.config.leaseToken);
    }
  }
}

/** Puts the lease token into Vault as `ha_lease_token` (created, or updated when it differs). */
async function storeLeaseToken(sql: Sql, token: string): Promise<void> {
  const rows = await sql`
    select id, decrypted_secret = ${token} as same from vault.decrypted_secrets where name = 'ha_lease_token'`;
  if (rows.length === 0) {
    await sql.begin(
      "read write",
      (tx) =>
        tx`select vault.create_secret(${token}, 'ha_lease_token', 'SA Toolkit: renews the HA write lease')`,
    );
  } else if (!rows[0].same) {
    await sql.begin("read write", (tx) => tx`select vault.update_secret(${rows[0].id}, ${token})`);
  }
}

/** The standby refuses application writes: guard (token revoked) and, as a fast path, read-only. */
async function fenceStandby(sub: Sql, epoch: number): Promise<number> {
  const [state, status] = await Promise.all([readControlState(sub), fenceStatus(sub)]);
  await setReadOnlyDefault(sub, true);
  if (state?.role === "standby" && !status.writable) return 0;
  await setFence(sub, "standby", epoch);
  return await endClientSessions(sub);
}

/** Lifts the primary's fence when it is not writable (first set-up, or the lease changed). */
async function liftPrimary(
  pub: Sql,
  sub: Sql,
  subSite: SiteName,
  pubSite: SiteName,
  epoch: number,
  lease: LeaseSettings,
  actions: string[],
): Promise<Record<string, unknown>> {
  const before = await fenceStatus(pub);
  const leaseChanged = before.leaseTtlSeconds !== lease.ttlSeconds;
  if (before.writable && !leaseChanged && before.leaseUntil !== "infinity") {
    return {
      ttl_seconds: lease.ttlSeconds,
      renew_seconds: lease.renewSeconds,
      lease_until: before.leaseUntil,
    };
  }
  const grant = await recordInitialGrant(sub, pubSite, epoch);
  await liftFence(pub, epoch, grant === "off" ? "keep" : grant);
  await setReadOnlyDefault(pub, false);
  const after = await fenceStatus(pub);
  actions.push(
    `site ${pubSite} is the writable primary at epoch ${epoch}` +
      (grant === "off"
        ? " (lease off)"
        : `, lease granted by site ${subSite} until ${after.leaseUntil}`),
  );
  return {
    ttl_seconds: lease.ttlSeconds,
    renew_seconds: lease.renewSeconds,
    lease_until: after.leaseUntil,
  };
}

/** Schedules ha.lease_tick() (and the heartbeat) on both sites, or says what the operator must run. */
async function scheduleRenewal(
  pub: Sql,
  sub: Sql,
  lease: LeaseSettings,
  renewal: "cron" | "external",
): Promise<string> {
  if (renewal === "external") {
    return `external: run "select ha.lease_tick()" on each site every ${lease.renewSeconds} s`;
  }
  const scheduled = await Promise.all(
    [pub, sub].map(async (sql) => {
      const [{ s }] = await sql.begin(
        "read write",
        (tx) => tx`select ha.schedule_lease_tick(${lease.renewSeconds}) as s`,
      );
      return s as string | null;
    }),
  );
  if (scheduled.some((x) => x === null)) {
    if (lease.ttlSeconds !== null) {
      throw new HttpError(
        412,
        "lease_renewal_unavailable",
        'pg_cron 1.5+ (seconds schedules) is needed to renew the write lease; set up with "lease_renewal": "external" and run ha.lease_tick() yourself, or with "lease": false.',
      );
    }
    return "not scheduled (pg_cron 1.5+ needed); the lease is off";
  }
  return `pg_cron every ${lease.renewSeconds} seconds`;
}

async function ensureStandbySubscription(
  rt: HaRuntime,
  c: {
    pubSite: SiteName;
    subSite: SiteName;
    tables: TableRef[];
    options: SetupOptions;
    actions: string[];
  },
): Promise<void> {
  const sub = rt.sites.get(c.subSite).ops;
  const dryRun = c.options.dryRun ?? false;
  const status = await subscriptionStatus(sub);
  if (status.exists) {
    c.actions.push(`subscription on ${c.subSite} exists (enabled=${status.enabled})`);
    // Tables added to the publication are applied only after a refresh (their rows are copied).
    const [published, subscribed] = await Promise.all([
      publicationTables(rt.sites.get(c.pubSite).ops),
      subscribedTables(sub),
    ]);
    const added = published.filter((p) => !subscribed.some((x) => sameTable(x, p)));
    if (added.length && !dryRun) {
      await withWritableSession(sub, (x) => refreshSubscription(x));
      c.actions.push(
        `subscription refreshed: ${added.length} table(s) now replicate (${
          added.slice(0, 10).map(tableLabel).join(", ")
        }${added.length > 10 ? ", …" : ""})`,
      );
    } else if (added.length) {
      c.actions.push(`would refresh the subscription for ${added.length} new table(s)`);
    }
    return;
  }
  const copyData = c.options.copyData ?? true;
  if (copyData && !dryRun) {
    const nonEmpty: string[] = [];
    for (const t of c.tables) {
      const [{ any }] = await sub.unsafe(`select exists (select 1 from ${qualified(t)}) as any`);
      if (any) nonEmpty.push(tableLabel(t));
    }
    if (nonEmpty.length) {
      throw new HttpError(
        412,
        "standby_not_empty",
        "The standby already has rows in published tables; copying would duplicate them.",
        { tables: nonEmpty },
      );
    }
  }
  if (dryRun) {
    c.actions.push(`would create the subscription on ${c.subSite}`);
    return;
  }
  await withWritableSession(
    sub,
    (x) => ensureSubscription(x, siteUrl(rt, c.pubSite), { copyData }),
  );
  c.actions.push(`subscription created on ${c.subSite} (copy_data=${copyData})`);
}

export function siteUrl(rt: HaRuntime, site: SiteName): string {
  return site === "primary" ? rt.config.primaryDbUrl! : rt.config.standbyDbUrl!;
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

/** The application tables of the publication (the toolkit's own excluded). */
export async function publishedAppTables(sql: Sql): Promise<TableRef[]> {
  return (await publicationTables(sql)).filter((t) => !isToolkitTable(t));
}

/** Row counts and sampled checksums on both sides for the published tables. */
export async function verifyData(rt: HaRuntime, from: SiteName, sample = 1000) {
  const a = rt.sites.get(from).ops;
  const b = rt.sites.get(rt.sites.other(from)).ops;
  const list = await publishedAppTables(a);
  const [ca, cb] = await Promise.all([
    tableChecksums(a, list, sample),
    tableChecksums(b, list, sample),
  ]);
  return list.map((t) => {
    const key = tableLabel(t);
    const x = ca.get(key);
    const y = cb.get(key);
    return {
      table: key,
      rows: { [from]: x?.rows ?? null, [rt.sites.other(from)]: y?.rows ?? null },
      match: !!x && !!y && x.rows === y.rows && x.checksum === y.checksum,
    };
  });
}

/**
 * Guard gaps on a site for its scope: missing, disabled or altered guards on replicated tables,
 * and a role or database that defaults to session_replication_role = replica while some guard
 * could only be left in origin mode (such sessions would pass it).
 */
export async function siteGuardGaps(sql: Sql) {
  const tables = await scopeTables(sql, await storedScope(sql));
  const gaps = await guardGaps(sql, tables);
  const origin = await originOnlyGuards(sql, tables);
  if (origin.length) {
    const rows = await sql`
      select coalesce(r.rolname, '(every role)') as who, d.setdatabase = 0 as everywhere
      from pg_db_role_setting d
      left join pg_roles r on r.oid = d.setrole
      where exists (select 1 from unnest(d.setconfig) x where x like 'session_replication_role=%'
                    and x not like '%=origin')`;
    for (const r of rows) {
      gaps.push({
        table: origin.join(", "),
        problem:
          `role ${r.who} defaults to session_replication_role = replica, which passes these guards (left in origin mode)`,
      });
    }
  }
  return gaps;
}

export interface RejoinReport {
  site: SiteName;
  primary: SiteName;
  epoch: number;
  truncated: string[];
  actions: string[];
}

/** Unpublished tables with a foreign key to a published one (TRUNCATE would have to cascade). */
async function unpublishedReferencing(sql: Sql, published: TableRef[]): Promise<string[]> {
  const [schemas, names] = pairs(published);
  const rows = await sql`
    with pub as (
      select c.oid from unnest(${schemas}::text[], ${names}::text[]) w(s, n)
      join pg_namespace ns on ns.nspname = w.s
      join pg_class c on c.relnamespace = ns.oid and c.relname = w.n)
    select distinct cn.nspname as schemaname, cc.relname as tablename
    from pg_constraint k
    join pg_class cc on cc.oid = k.conrelid
    join pg_namespace cn on cn.oid = cc.relnamespace
    where k.contype = 'f' and k.confrelid in (select oid from pub)
      and k.conrelid not in (select oid from pub)
    order by 1, 2`;
  return rows.map((r) => tableLabel({ schema: r.schemaname, name: r.tablename }));
}

/**
 * Rebuilds a fenced (or stray) site as the standby of the current primary: its copy of the
 * published tables is discarded and copied afresh. This is how the old primary comes back after
 * an emergency failover — whatever it committed that never replicated is discarded here, so the
 * caller must confirm it (and should first export what `rpo` in the emergency operation names).
 * Refused (412) when an unpublished table references a published one: emptying the published
 * tables would have to cascade into data that does not replicate.
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

  const scope = await storedScope(p);
  const appTables = await scopeTables(p, scope);
  const referencing = await unpublishedReferencing(f, appTables);
  if (referencing.length) {
    throw new HttpError(
      412,
      "unpublished_references",
      "Tables outside the replication scope reference replicated ones; rebuilding would have to empty them too. Add them to the scope (POST /failover/setup) or empty them yourself.",
      { tables: referencing },
    );
  }
  // Whatever the site was, it refuses application writes from here on (guard + read-only).
  await setFence(f, "fenced", epoch, `being rebuilt as the standby of site ${primary}`);
  await setReadOnlyDefault(f, true);
  await endClientSessions(f);
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
  await ensurePublication(p, appTables);
  const tables = await publicationTables(p);
  await installGuards(f, appTables);
  await withWritePass(
    f,
    `rejoin as the standby of site ${primary}`,
    (tx) => tx.unsafe(`truncate table ${tables.map(qualified).join(", ")}`),
  );
  actions.push(`emptied ${tables.length} published tables on ${site}`);
  await withWritableSession(
    f,
    (s) => ensureSubscription(s, siteUrl(rt, primary), { copyData: true }),
  );
  actions.push(`subscribed ${site} to ${primary} with copy_data=true`);
  await setFence(f, "standby", epoch);
  actions.push(`${site} is now standby at epoch ${epoch} (the guard refuses application writes)`);
  // The primary held an infinite lease while it had no standby; from now on this site grants it.
  const primaryFence = await fenceStatus(p);
  if (primaryFence.leaseUntil === "infinity") {
    try {
      const grant = await recordInitialGrant(f, primary, epoch);
      if (grant !== "off") {
        await liftFence(p, epoch, grant);
        actions.push(`site ${primary}'s write lease is granted by site ${site} again`);
      }
    } catch (e) {
      // The primary may still hold its infinite lease: this site must not be a standby an
      // emergency could promote while that is so. It stays fenced until a rejoin succeeds.
      await setFence(
        f,
        "fenced",
        epoch,
        `rejoin incomplete: site ${primary}'s lease is not finite yet`,
      )
        .catch(() => {});
      throw new HttpError(
        503,
        "rejoin_incomplete",
        `Site ${site} was rebuilt, but site ${primary}'s write lease could not be made finite (${
          e instanceof Error ? e.message : e
        }); it stays fenced: run the rejoin again.`,
      );
    }
  }
  rt.shared.clear();
  return {
    site,
    primary,
    epoch,
    truncated: tables.filter((t) => !isToolkitTable(t)).map(tableLabel),
    actions,
  };
}
