/**
 * The one way the toolkit opens Postgres: postgres.js with `prepare: false` (safe behind
 * PgBouncer/Supavisor in transaction mode), a small pool, hard connect timeouts and an
 * application_name that makes our sessions recognisable in pg_stat_activity.
 */
import postgres from "postgres";

export type Sql = postgres.Sql;
export type TransactionSql = postgres.TransactionSql;
export type ReservedSql = postgres.ReservedSql;

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

/**
 * postgres.js 3.4 defers small socket writes with setImmediate and cancels the deferral with
 * clearImmediate when it flushes early; under Deno that cancellation does not always take, so the
 * deferred flush still runs — after the buffer was already written ("May not write null values to
 * stream") or after the socket of a dropped connection was released ("Cannot read properties of
 * null (reading 'write')"). Either is thrown from a timer, an uncaught error that would end the
 * whole worker, while nothing is left to do: the data went out or the connection is gone (the next
 * query reconnects). Exactly those two errors from postgres.js's nextWrite are swallowed; every
 * other uncaught error still ends the process.
 */
let guardInstalled = false;
function installWriteRaceGuard(): void {
  if (guardInstalled || typeof globalThis.addEventListener !== "function") return;
  guardInstalled = true;
  globalThis.addEventListener("error", (event) => {
    const e = (event as ErrorEvent).error;
    if (
      e instanceof TypeError &&
      /reading 'write'|May not write null values to stream/.test(e.message) &&
      /nextWrite[^\n]*postgres\/src\/connection\.js/.test(e.stack ?? "")
    ) {
      event.preventDefault();
    }
  });
}

export function createSql(url: string, options: SqlOptions = {}): Sql {
  installWriteRaceGuard();
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
