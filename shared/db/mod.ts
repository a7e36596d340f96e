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
  /**
   * Fetch array type oids after login (default true). postgres.js runs that query without anyone
   * awaiting it, so when it fails (e.g. PgBouncer's "server login has been failing") the
   * rejection is unhandled; clients that never read arrays can turn it off.
   */
  fetchTypes?: boolean;
  /** Called whenever one of the pool's connections closes (idle, lifetime, error). */
  onClose?: () => void;
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
/**
 * After each login postgres.js runs a query for the array type oids inside an async function
 * nobody awaits; when that query fails (the server went away, PgBouncer's "server login has been
 * failing") the same error also reaches whoever's query started the connection, and the copy of it
 * left over is an unhandled rejection that would end the worker. This recognises exactly that one.
 */
export function isOrphanTypeFetchFailure(reason: unknown): boolean {
  const q = (reason as { query?: unknown } | null)?.query;
  return reason instanceof Error && typeof q === "string" &&
    /from pg_catalog\.pg_type a/.test(q) && /a\.typcategory = 'A'/.test(q) && /typarray/.test(q);
}

/**
 * The same cancellation race with the connect timer: when a connection closes, postgres.js
 * cancels its connect timeout and sets the socket to null, but under Deno the timer can still
 * fire, and `connectTimedOut` then reports the timeout (the queries are told) and calls
 * `socket.destroy()` on null. Seen when a failover ends every session of a site while a pool is
 * reconnecting to it: the TypeError is thrown from the timer and would end the worker.
 */
export function isTimerRaceAfterClose(e: unknown): boolean {
  if (!(e instanceof TypeError)) return false;
  const stack = e.stack ?? "";
  return (
    (/reading 'write'|May not write null values to stream/.test(e.message) &&
      /nextWrite[^\n]*postgres\/src\/connection\.js/.test(stack)) ||
    (/reading 'destroy'/.test(e.message) &&
      /connectTimedOut[^\n]*postgres\/src\/connection\.js/.test(stack))
  );
}

let guardInstalled = false;
function installWriteRaceGuard(): void {
  if (guardInstalled || typeof globalThis.addEventListener !== "function") return;
  guardInstalled = true;
  globalThis.addEventListener("unhandledrejection", (event) => {
    if (isOrphanTypeFetchFailure((event as PromiseRejectionEvent).reason)) event.preventDefault();
  });
  globalThis.addEventListener("error", (event) => {
    if (isTimerRaceAfterClose((event as ErrorEvent).error)) event.preventDefault();
  });
}

/**
 * libpq's `host=/abs/dir` query parameter (a unix-socket directory) in a postgresql:// URL, e.g.
 * `postgresql://user:pw@localhost:6432/pgbouncer?host=/run/pgbouncer`: postgres.js would send it
 * to the server as a startup parameter, so it is taken out and becomes the socket path
 * `<dir>/.s.PGSQL.<port>`. Any other URL is returned as it is.
 */
export function unixSocketOf(url: string): { url: string; path?: string } {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return { url };
  }
  const dir = u.searchParams.get("host");
  if (dir === null || !dir.startsWith("/")) return { url };
  u.searchParams.delete("host");
  const port = u.port || "5432";
  return { url: u.toString(), path: `${dir.replace(/\/+$/, "")}/.s.PGSQL.${port}` };
}

export function createSql(url: string, options: SqlOptions = {}): Sql {
  installWriteRaceGuard();
  const connection: Record<string, string | number | boolean> = {
    application_name: options.applicationName ?? "sa-toolkit",
  };
  if (options.statementTimeoutMs !== undefined && !options.adminConsole) {
    connection.statement_timeout = options.statementTimeoutMs;
  }
  const socket = unixSocketOf(url);
  return postgres(socket.url, {
    ...(socket.path ? { path: socket.path } : {}),
    prepare: false,
    max: options.max ?? 3,
    connect_timeout: options.connectTimeout ?? 5,
    idle_timeout: options.idleTimeout ?? 30,
    max_lifetime: 60 * 30,
    fetch_types: !options.adminConsole && options.fetchTypes !== false,
    onnotice: () => {},
    onclose: options.onClose,
    connection: options.adminConsole ? {} : connection,
  });
}

/**
 * A pool that is replaced by a fresh one after any of its connections closed. postgres.js 3.4.9
 * cancels a deferred socket write on close without forgetting it (`closed()`/`terminate()` call
 * clearImmediate but leave `nextWriteTimer` set and the buffered bytes in place), so a connection
 * that dropped while a write was pending never sends its next startup message: every reconnect
 * ends in CONNECT_TIMEOUT until about 1 KB of startup messages has piled up, which then reaches
 * the server as a protocol violation — measured as a 45-s outage of a client behind PgBouncer
 * after an emergency failover. A closed connection must reconnect anyway, so handing out a new
 * pool costs nothing. Whoever still holds the old pool can keep using it: it is ended only
 * `retireSeconds` later (its idle connections are closed by idle_timeout long before).
 */
export function healingSql(
  url: () => string,
  options: SqlOptions,
  retireSeconds = 300,
): { get: () => Sql; close: () => Promise<void> } {
  let client: Sql | undefined;
  let tainted = false;
  const retired = new Map<Sql, number>();
  const make = (): Sql => {
    tainted = false;
    const made: Sql = createSql(url(), {
      ...options,
      onClose: () => {
        if (client === made) tainted = true;
        options.onClose?.();
      },
    });
    return made;
  };
  return {
    get: () => {
      if (client && tainted) {
        const old = client;
        client = undefined;
        retired.set(
          old,
          setTimeout(() => {
            retired.delete(old);
            old.end({ timeout: 5 }).catch(() => {});
          }, retireSeconds * 1000),
        );
      }
      return (client ??= make());
    },
    close: async () => {
      const all = [...retired.keys()];
      for (const t of retired.values()) clearTimeout(t);
      retired.clear();
      if (client) all.push(client);
      client = undefined;
      await Promise.all(all.map((c) => c.end({ timeout: 2 }).catch(() => {})));
    },
  };
}

/**
 * A `Sql` that resolves the pool at every call: `live(handle)` always talks to `handle.get()`, so
 * code that holds on to it across a dropped connection (e.g. after ending a site's sessions)
 * moves to the fresh pool instead of waiting on the old one. A transaction or reserved session
 * already started keeps its own connection.
 */
export function live(handle: { get: () => Sql }): Sql {
  const target = function () {} as unknown as Sql;
  return new Proxy(target, {
    apply: (_t, _this, args) => (handle.get() as unknown as (...a: unknown[]) => unknown)(...args),
    get: (_t, prop) => {
      const current = handle.get() as unknown as Record<PropertyKey, unknown>;
      const value = current[prop];
      return typeof value === "function"
        ? (value as (...a: unknown[]) => unknown).bind(current)
        : value;
    },
  }) as Sql;
}

/** A client created on first use, renewed after a dropped connection, closed with the app. */
export function lazySql(
  url: () => string,
  options: SqlOptions,
): { get: () => Sql; close: () => Promise<void> } {
  return healingSql(url, options);
}
