/**
 * Inspecting and setting up the native logical replication between the sites: publication on the
 * publishing side, subscription on the subscribing side, lag, slot health, identity and schema
 * checks. Names default to dr_publication / dr_subscription. Tables are (schema, name) pairs
 * everywhere: a table may be called "a.b", so no name is ever split on a dot.
 */
import type { Sql } from "../db/mod.ts";

export interface TableRef {
  schema: string;
  name: string;
}

/** What setup replicates: every table of these schemas plus these tables (persisted in ha.state). */
export interface Scope {
  schemas: string[];
  tables: [string, string][];
}

export const DEFAULT_SCOPE: Scope = {
  schemas: ["public"],
  tables: [["auth", "users"], ["auth", "identities"]],
};

/** The toolkit's own tables that replicate with the application's (never guarded). */
export const TOOLKIT_TABLES: TableRef[] = [
  { schema: "ha", name: "heartbeat" },
  { schema: "ha", name: "markers" },
];

function quoteIdent(part: string): string {
  return `"${part.replaceAll('"', '""')}"`;
}

/** `"schema"."name"` for SQL. */
export function qualified(t: TableRef): string {
  return `${quoteIdent(t.schema)}.${quoteIdent(t.name)}`;
}

/** `schema.name` for people, quoting a part only when PostgreSQL would (as format('%I.%I')). */
export function tableLabel(t: TableRef): string {
  const q = (p: string) => (/^[a-z_][a-z0-9_$]*$/.test(p) ? p : quoteIdent(p));
  return `${q(t.schema)}.${q(t.name)}`;
}

export function sameTable(a: TableRef, b: TableRef): boolean {
  return a.schema === b.schema && a.name === b.name;
}

export function isToolkitTable(t: TableRef): boolean {
  return TOOLKIT_TABLES.some((x) => sameTable(x, t));
}

/** The two parallel arrays the ha.* SQL functions take. */
export function pairs(tables: TableRef[]): [string[], string[]] {
  return [tables.map((t) => t.schema), tables.map((t) => t.name)];
}

function toRefs(rows: Record<string, unknown>[]): TableRef[] {
  return rows.map((r) => ({ schema: String(r.schemaname), name: String(r.tablename) }));
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

export async function publicationTables(
  sql: Sql,
  publication = PUBLICATION,
): Promise<TableRef[]> {
  return toRefs(
    await sql`select schemaname, tablename from pg_publication_tables where pubname = ${publication}
              order by 1, 2`,
  );
}

/**
 * The relations added to the publication (a partitioned table is a member itself, while
 * pg_publication_tables lists its partitions).
 */
export async function publicationMembers(
  sql: Sql,
  publication = PUBLICATION,
): Promise<TableRef[]> {
  return toRefs(
    await sql`select n.nspname as schemaname, c.relname as tablename
              from pg_publication_rel r
              join pg_publication p on p.oid = r.prpubid
              join pg_class c on c.oid = r.prrelid
              join pg_namespace n on n.oid = c.relnamespace
              where p.pubname = ${publication} order by 1, 2`,
  );
}

/** On the subscribing site: the tables the subscription replicates (any sync state). */
export async function subscribedTables(sql: Sql, name = SUBSCRIPTION): Promise<TableRef[]> {
  return toRefs(
    await sql`select n.nspname as schemaname, c.relname as tablename
              from pg_subscription s
              join pg_subscription_rel r on r.srsubid = s.oid
              join pg_class c on c.oid = r.srrelid
              join pg_namespace n on n.oid = c.relnamespace
              where s.subname = ${name}
                and s.subdbid = (select oid from pg_database where datname = current_database())
              order by 1, 2`,
  );
}

/**
 * On the subscribing site: picks up tables added to the publication since the subscription was
 * created (their rows are copied). Cannot run inside a transaction block.
 */
export async function refreshSubscription(sql: Sql, name = SUBSCRIPTION): Promise<void> {
  await sql.unsafe(`alter subscription "${name}" refresh publication with (copy_data = true)`);
}

/** The application tables of a scope on this site (the tables to publish and to guard). */
export async function scopeTables(sql: Sql, scope: Scope): Promise<TableRef[]> {
  return toRefs(
    await sql`select schemaname, tablename from ha.scope_tables(${sql.json(scope as never)})`,
  );
}

export async function publicationExists(sql: Sql, publication = PUBLICATION): Promise<boolean> {
  const rows = await sql`select 1 from pg_publication where pubname = ${publication}`;
  return rows.length > 0;
}

/**
 * Of `tables`, those not yet in the publication whose UPDATE and DELETE publishing would break:
 * replica identity NOTHING, or the default identity with no primary key. PostgreSQL refuses an
 * UPDATE or DELETE on such a table once it is published, so setup must not publish it.
 */
export async function unpublishableTables(
  sql: Sql,
  tables: TableRef[],
  publication = PUBLICATION,
): Promise<{ table: string; problem: string }[]> {
  const [schemas, names] = pairs(tables);
  const rows = await sql`
    select n.nspname as schemaname, c.relname as tablename, c.relreplident as ident
    from unnest(${schemas}::text[], ${names}::text[]) as t(schemaname, tablename)
    join pg_catalog.pg_namespace n on n.nspname = t.schemaname
    join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = t.tablename
    where (c.relreplident = 'n'
           or (c.relreplident = 'd' and not exists (
                 select 1 from pg_catalog.pg_index i where i.indrelid = c.oid and i.indisprimary)))
      and not exists (
        select 1 from pg_catalog.pg_publication_tables p
        where p.pubname = ${publication} and p.schemaname = n.nspname and p.tablename = c.relname)
    order by 1, 2`;
  return rows.map((r) => ({
    table: tableLabel({ schema: r.schemaname, name: r.tablename }),
    problem: r.ident === "n"
      ? "replica identity NOTHING: once published, its UPDATEs and DELETEs would be refused"
      : "no primary key and default replica identity: once published, its UPDATEs and DELETEs would be refused",
  }));
}

export async function replicaIdentityProblems(
  sql: Sql,
  publication = PUBLICATION,
): Promise<Record<string, string>[]> {
  const rows = await sql`select * from ha.replica_identity_problems(${publication})`;
  return rows.map((r) => ({
    table: tableLabel({ schema: r.schemaname, name: r.tablename }),
    replica_identity: r.replica_identity,
    problem: r.problem,
  }));
}

/** Shape fingerprints; `detail` maps tableLabel to a per-table hash. */
export async function schemaFingerprint(
  sql: Sql,
  tables: TableRef[],
): Promise<{ fingerprint: string; tables: number; detail: Record<string, string> }> {
  const [schemas, names] = pairs(tables);
  const [r] = await sql`select * from ha.schema_fingerprint(${schemas}::text[], ${names}::text[])`;
  const detail: Record<string, string> = {};
  for (const [schema, name, hash] of r.detail as [string, string, string][]) {
    detail[tableLabel({ schema, name })] = hash;
  }
  return { fingerprint: r.fingerprint, tables: r.tables, detail };
}

export async function tableChecksums(
  sql: Sql,
  tables: TableRef[],
  sample = 1000,
): Promise<Map<string, { rows: number; checksum: string }>> {
  const [schemas, names] = pairs(tables);
  const rows = await sql`
    select * from ha.table_checksums(${schemas}::text[], ${names}::text[], ${sample})`;
  return new Map(
    rows.map((r) => [
      tableLabel({ schema: r.schemaname, name: r.tablename }),
      { rows: Number(r.row_count), checksum: r.sample_checksum },
    ]),
  );
}

/** The tables of `tables` that do not exist on this site. */
export async function missingTables(sql: Sql, tables: TableRef[]): Promise<TableRef[]> {
  const [schemas, names] = pairs(tables);
  return toRefs(
    await sql`select * from ha.missing_tables(${schemas}::text[], ${names}::text[])`,
  );
}

/**
 * Creates (or completes) the publication on the publishing site: the application tables given
 * plus the toolkit's marker and heartbeat tables. Returns what it publishes.
 */
export async function ensurePublication(
  sql: Sql,
  appTables: TableRef[],
  publication = PUBLICATION,
): Promise<TableRef[]> {
  const tables = [...appTables, ...TOOLKIT_TABLES];
  // An explicit READ WRITE transaction: a pooled session may predate the site's promotion and
  // still carry the read-only default it had as a standby.
  if (!(await publicationExists(sql, publication))) {
    await sql.begin("read write", (tx) =>
      tx.unsafe(
        `create publication "${publication}" for table ${tables.map(qualified).join(", ")}`,
      ));
  } else {
    const have = await publicationMembers(sql, publication);
    const missing = tables.filter((t) => !have.some((h) => sameTable(h, t)));
    if (missing.length) {
      await sql.begin("read write", (tx) =>
        tx.unsafe(
          `alter publication "${publication}" add table ${missing.map(qualified).join(", ")}`,
        ));
    }
  }
  return tables;
}

/** Connection parameters a subscription carries over from the URL (TLS included). */
const CONNINFO_PARAMS = [
  "sslmode",
  "sslrootcert",
  "sslcert",
  "sslkey",
  "sslcrl",
  "sslcrldir",
  "sslsni",
  "ssl_min_protocol_version",
  "target_session_attrs",
  "connect_timeout",
];

/**
 * libpq conninfo for a subscription (values quoted for conninfo syntax). TLS settings in the URL
 * (`sslmode=verify-full&sslrootcert=/path/ca.crt`, …) are carried over: the subscriber's server
 * makes this connection, so paths name files on that server.
 */
export function conninfo(url: string): string {
  const u = new URL(url);
  const q = (v: string) => `'${v.replaceAll("\\", "\\\\").replaceAll("'", "\\'")}'`;
  const parts = [
    `host=${q(u.hostname.replace(/^\[(.*)\]$/, "$1"))}`,
    `port=${q(u.port || "5432")}`,
    `dbname=${q(decodeURIComponent(u.pathname.replace(/^\//, "")) || "postgres")}`,
    `user=${q(decodeURIComponent(u.username))}`,
    `password=${q(decodeURIComponent(u.password))}`,
  ];
  for (const name of CONNINFO_PARAMS) {
    const v = u.searchParams.get(name);
    if (v !== null && v !== "") parts.push(`${name}=${q(v)}`);
  }
  return parts.join(" ");
}

/** Creates the subscription on the subscribing site if it does not exist (idempotent). */
export async function ensureSubscription(
  sql: Sql,
  publisherUrl: string,
  options: {
    copyData: boolean;
    name?: string;
    publication?: string;
    /** false: the slot must exist (or be created) on the publisher before it is enabled */
    createSlot?: boolean;
    /** false: created disabled, to be enabled later */
    enabled?: boolean;
  },
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
      }, slot_name = ${lit(name)}, enabled = ${options.enabled ?? true}, ` +
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
