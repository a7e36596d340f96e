/**
 * The one way the toolkit opens Postgres: postgres.js with `prepare: false` (safe behind
 * PgBouncer/Supavisor in transaction mode), a small pool, hard connect timeouts and an
 * application_name that makes our sessions recognisable in pg_stat_activity.
 */
import postgres from "postgres";

export type Sql = postgres.Sql;
export type TransactionSql = postgres.TransactionSql;

export interface SqlOptions {
  /** Shown in pg_stat_activity; also how the failover's freeze step recognises our sessions. */
  applicationName?: string;
  max?: number;
  /** Seconds to wait for a connection before failing. */
  connectTimeout?: number;
  /** Seconds an idle connection is kept. */
  idleTimeout?: number;
  /** Milliseconds; sent as the session's statement_timeout. */
  statementTimeoutMs?: number;
  /** For PgBouncer's admin console, which knows no types and no extended protocol. */
  adminConsole?: boolean;
}

export function createSql(url: string, options: SqlOptions = {}): Sql {
  const connection: Record<string, string | number | boolean> = {
    application_name: options.applicationName ?? "sa-toolkit",
  };
  if (options.statementTimeoutMs !== undefined && !options.adminConsole) {
    connection.statement_timeout = options.statementTimeoutMs;
  }
  return postgres(url, {
    prepare: false,
    max: options.max ?? 3,
    connect_timeout: options.connectTimeout ?? 5,
    idle_timeout: options.idleTimeout ?? 30,
    max_lifetime: 60 * 30,
    fetch_types: !options.adminConsole,
    onnotice: () => {},
    connection: options.adminConsole ? {} : connection,
  });
}

/** A client created on first use and closed with the app. */
export function lazySql(
  url: () => string,
  options: SqlOptions,
): { get: () => Sql; close: () => Promise<void> } {
  let client: Sql | undefined;
  return {
    get: () => (client ??= createSql(url(), options)),
    close: async () => {
      const c = client;
      client = undefined;
      await c?.end({ timeout: 2 });
    },
  };
}
