/**
 * Inspecting and setting up the native logical replication between the sites: publication on the
 * publishing side, subscription on the subscribing side, lag, slot health, identity and schema
 * checks. Names default to dr_publication / dr_subscription.
 */
import type { Sql } from "../db/mod.ts";

/** "schema.table" quoted as an identifier pair. */
export function quoteQualified(name: string): string {
  return name.split(".").map((p) => `"${p.replaceAll('"', '""')}"`).join(".");
}

export const PUBLICATION = "dr_publication";
export const SUBSCRIPTION = "dr_subscription";

export interface SubscriptionStatus {
  exists: boolean;
  enabled?: boolean;
  slotName?: string | null;
  workerRunning?: boolean;
  receivedLsn?: string | null;
  latestEndLsn?: string | null;
  lastMessageAt?: string | null;
  secondsSinceMessage?: number | null;
  applyErrors?: number;
  syncErrors?: number;
  tablesNotReady?: number;
}

/** On the subscribing site. */
export async function subscriptionStatus(
  sql: Sql,
  name = SUBSCRIPTION,
): Promise<SubscriptionStatus> {
  const rows = await sql`
    select s.subenabled as enabled, s.subslotname as slot_name,
           (select count(*) from pg_stat_subscription w where w.subid = s.oid and w.relid is null and w.pid is not null) > 0 as worker,
           (select w.received_lsn::text from pg_stat_subscription w where w.subid = s.oid and w.relid is null) as received_lsn,
           (select w.latest_end_lsn::text from pg_stat_subscription w where w.subid = s.oid and w.relid is null) as latest_end_lsn,
           (select w.last_msg_receipt_time from pg_stat_subscription w where w.subid = s.oid and w.relid is null) as last_msg,
           (select extract(epoch from now() - w.last_msg_receipt_time)::float8
              from pg_stat_subscription w where w.subid = s.oid and w.relid is null) as since_msg,
           coalesce((select st.apply_error_count from pg_stat_subscription_stats st where st.subid = s.oid), 0) as apply_errors,
           coalesce((select st.sync_error_count from pg_stat_subscription_stats st where st.subid = s.oid), 0) as sync_errors,
           (select count(*) from pg_subscription_rel r where r.srsubid = s.oid and r.srsubstate <> 'r') as not_ready
    from pg_subscription s
    where s.subname = ${name} and s.subdbid = (select oid from pg_database where datname = current_database())`;
  if (rows.length === 0) return { exists: false };
  const r = rows[0];
  return {
    exists: true,
    enabled: r.enabled,
    slotName: r.slot_name,
    workerRunning: r.worker,
    receivedLsn: r.received_lsn,
    latestEndLsn: r.latest_end_lsn,
    lastMessageAt: r.last_msg ? new Date(r.last_msg).toISOString() : null,
    secondsSinceMessage: r.since_msg === null ? null : Math.round(Number(r.since_msg) * 10) / 10,
    applyErrors: Number(r.apply_errors),
    syncErrors: Number(r.sync_errors),
    tablesNotReady: Number(r.not_ready),
  };
}

export interface SlotStatus {
  exists: boolean;
  active?: boolean;
  walStatus?: string | null;
  lagBytes?: number | null;
  retainedBytes?: number | null;
  replayLagSeconds?: number | null;
}

/** On the publishing site: the subscription's slot, how far behind it is and how much WAL it pins. */
export async function slotStatus(sql: Sql, slot: string): Promise<SlotStatus> {
  const rows = await sql`
    select s.active, s.wal_status,
           pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::float8 as lag,
           pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::float8 as retained,
           (select extract(epoch from r.replay_lag)::float8 from pg_stat_replication r where r.pid = s.active_pid) as replay_lag
    from pg_replication_slots s where s.slot_name = ${slot}`;
  if (rows.length === 0) return { exists: false };
  const r = rows[0];
  return {
    exists: true,
    active: r.active,
    walStatus: r.wal_status,
    lagBytes: r.lag === null ? null : Math.max(0, Number(r.lag)),
    retainedBytes: r.retained === null ? null : Math.max(0, Number(r.retained)),
    replayLagSeconds: r.replay_lag === null ? null : Number(r.replay_lag),
  };
}

export async function publicationTables(sql: Sql, publication = PUBLICATION): Promise<string[]> {
  const rows =
    await sql`select schemaname || '.' || tablename as t from pg_publication_tables where pubname = ${publication} order by 1`;
  return rows.map((r) => r.t);
}

export async function publicationExists(sql: Sql, publication = PUBLICATION): Promise<boolean> {
  const rows = await sql`select 1 from pg_publication where pubname = ${publication}`;
  return rows.length > 0;
}

export async function replicaIdentityProblems(
  sql: Sql,
  publication = PUBLICATION,
): Promise<Record<string, string>[]> {
  const rows = await sql`select * from ha.replica_identity_problems(${publication})`;
  return rows.map((r) => ({
    table: `${r.schemaname}.${r.tablename}`,
    replica_identity: r.replica_identity,
    problem: r.problem,
  }));
}

export async function schemaFingerprint(
  sql: Sql,
  tables: string[],
): Promise<{ fingerprint: string; tables: number; detail: Record<string, string> }> {
  const [r] = await sql`select * from ha.schema_fingerprint(${tables}::text[])`;
  return { fingerprint: r.fingerprint, tables: r.tables, detail: r.detail };
}

export async function tableChecksums(
  sql: Sql,
  tables: string[],
  sample = 1000,
): Promise<Record<string, { rows: number; checksum: string }>> {
  const rows = await sql`select * from ha.table_checksums(${tables}::text[], ${sample})`;
  return Object.fromEntries(
    rows.map((r) => [r.table_name, { rows: Number(r.row_count), checksum: r.sample_checksum }]),
  );
}

export interface ScopeOptions {
  schemas?: string[];
  extraTables?: string[];
}

/** Creates (or completes) the publication on the publishing site with the default scope. */
export async function ensurePublication(
  sql: Sql,
  scope: ScopeOptions = {},
  publication = PUBLICATION,
): Promise<string[]> {
  const tables =
    (await sql`select schemaname || '.' || tablename as t from ha.default_scope(${
      scope.schemas ?? ["public"]
    }::text[], ${scope.extraTables ?? ["auth.users", "auth.identities"]}::text[])`).map((r) =>
      r.t as string
    );
  const quoted = tables.map(quoteQualified).join(", ");
  if (!(await publicationExists(sql, publication))) {
    await sql.unsafe(`create publication "${publication}" for table ${quoted}`);
  } else {
    const have = new Set(await publicationTables(sql, publication));
    const missing = tables.filter((t) => !have.has(t));
    if (missing.length) {
      const q = missing.map(quoteQualified).join(", ");
      await sql.unsafe(`alter publication "${publication}" add table ${q}`);
    }
  }
  return tables;
}

/** libpq conninfo for a subscription (values quoted for conninfo syntax). */
export function conninfo(url: string): string {
  const u = new URL(url);
  const q = (v: string) => `'${v.replaceAll("\\", "\\\\").replaceAll("'", "\\'")}'`;
  const parts = [
    `host=${q(u.hostname)}`,
    `port=${q(u.port || "5432")}`,
    `dbname=${q(decodeURIComponent(u.pathname.replace(/^\//, "")) || "postgres")}`,
    `user=${q(decodeURIComponent(u.username))}`,
    `password=${q(decodeURIComponent(u.password))}`,
  ];
  const sslmode = u.searchParams.get("sslmode");
  if (sslmode) parts.push(`sslmode=${q(sslmode)}`);
  return parts.join(" ");
}

/** Creates the subscription on the subscribing site if it does not exist (idempotent). */
export async function ensureSubscription(
  sql: Sql,
  publisherUrl: string,
  options: { copyData: boolean; name?: string; publication?: string; createSlot?: boolean },
): Promise<void> {
  const name = options.name ?? SUBSCRIPTION;
  const existing = await sql`select 1 from pg_subscription where subname = ${name}`;
  if (existing.length) return;
  const lit = (v: string) => `'${v.replaceAll("'", "''")}'`;
  await sql.unsafe(
    `create subscription "${name}" connection ${lit(conninfo(publisherUrl))} publication "${
      options.publication ?? PUBLICATION
    }" ` +
      `with (copy_data = ${options.copyData}, create_slot = ${
        options.createSlot ?? true
      }, slot_name = ${lit(name)}, ` +
      `synchronous_commit = 'off', disable_on_error = false)`,
  );
}

export interface Heartbeat {
  beatAt: string;
  ageSeconds: number;
  epoch: number;
}

/** The latest heartbeat `site` stamped, as this database has it (replicated, on a standby). */
export async function heartbeatOf(sql: Sql, site: string): Promise<Heartbeat | undefined> {
  const rows = await sql`
    select beat_at, epoch, extract(epoch from clock_timestamp() - beat_at)::float8 as age
    from ha.heartbeat where site = ${site}`;
  if (!rows.length) return undefined;
  return {
    beatAt: new Date(rows[0].beat_at).toISOString(),
    ageSeconds: Math.round(Number(rows[0].age) * 10) / 10,
    epoch: Number(rows[0].epoch),
  };
}

/** The publisher LSN up to which this subscription has applied (kept even when the worker is down). */
export async function appliedRemoteLsn(sql: Sql, name = SUBSCRIPTION): Promise<string | null> {
  const rows = await sql`
    select o.remote_lsn::text as lsn
    from pg_subscription s
    join pg_replication_origin_status o on o.external_id = 'pg_' || s.oid
    where s.subname = ${name} and s.subdbid = (select oid from pg_database where datname = current_database())`;
  return rows.length ? rows[0].lsn : null;
}
