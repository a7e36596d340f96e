/**
 * PgBouncer in front of the primary, started through the very entrypoint and templates we ship
 * for Fly.io (`deploy/fly-pgbouncer`), so what is tested is what is deployed.
 */
import { createSql, type Sql } from "../../shared/db/mod.ts";
import { asServerUser, mkdirOwned, type ServerUser } from "./os_user.ts";
import { PGBOUNCER_BIN, PGBOUNCER_DEPLOY_DIR } from "./paths.ts";
import { freePort } from "./ports.ts";
import { runCommand, ServerProcess } from "./process.ts";
import { waitUntilAccepting } from "./postgres.ts";

export interface PgBouncerOptions {
  baseDir: string;
  user: ServerUser;
  upstream: { host: string; port: number; dbname?: string };
  /** The application role and password PgBouncer authenticates clients as (and logs in with). */
  appUser: string;
  appPassword: string;
  database?: string;
  deployDir: string;
}

export class PgBouncer {
  readonly host = "127.0.0.1";
  readonly port = freePort();
  readonly dir: string;
  readonly confDir: string;
  readonly stateDir: string;
  readonly socketDir: string;
  readonly logPath: string;
  readonly database: string;
  readonly adminUser = "pgbouncer_admin";
  readonly adminPassword = crypto.randomUUID().replaceAll("-", "");
  /**
   * Entrypoint variables added to (or, when "", taking out) the defaults below, for `serve` and for
   * every exec alike: a machine's environment (ACTIVE_URLS, TLS, ADMIN_OVER_TCP, ...).
   */
  env: Record<string, string> = {};
  #options: PgBouncerOptions;
  #process?: ServerProcess;
  #clients = new Set<Sql>();

  constructor(options: PgBouncerOptions) {
    this.#options = options;
    this.dir = `${options.baseDir}/pgbouncer`;
    this.confDir = `${this.dir}/conf`;
    this.stateDir = `${this.dir}/state`;
    this.socketDir = `${this.dir}/sock`;
    this.logPath = `${this.dir}/pgbouncer.log`;
    this.database = options.database ?? "postgres";
  }

  /** Another PgBouncer with the same upstream and credentials (a second Fly machine). */
  sibling(baseDir: string): PgBouncer {
    return new PgBouncer({ ...this.#options, baseDir });
  }

  /** The `%include`d file the file router rewrites. */
  get databasesFile(): string {
    return `${this.stateDir}/databases.ini`;
  }

  get running(): boolean {
    return this.#process !== undefined && !this.#process.exited;
  }

  /** Environment of the shipped entrypoint; shared with `route`. */
  entrypointEnv(): Record<string, string> {
    const o = this.#options;
    return {
      PGBOUNCER_TEMPLATE_DIR: o.deployDir,
      PGBOUNCER_CONF_DIR: this.confDir,
      PGBOUNCER_STATE_DIR: this.stateDir,
      PGBOUNCER_BIN,
      PGBOUNCER_DATABASE: this.database,
      PGBOUNCER_ADMIN_USER: this.adminUser,
      PGBOUNCER_ADMIN_PASSWORD: this.adminPassword,
      DATABASE_USER: o.appUser,
      DATABASE_PASSWORD: o.appPassword,
      UPSTREAM_HOST: o.upstream.host,
      UPSTREAM_PORT: String(o.upstream.port),
      UPSTREAM_DBNAME: o.upstream.dbname ?? "postgres",
      LISTEN_ADDR: this.host,
      LISTEN_PORT: String(this.port),
      SOCKET_DIR: this.socketDir,
      MAX_CLIENT_CONN: "500",
      DEFAULT_POOL_SIZE: "20",
      QUERY_WAIT_TIMEOUT: "60",
      SERVER_TLS_SSLMODE: "disable",
      // Local only: loopback clients, no certificate. The shipped default refuses to start
      // without a certificate unless this is said explicitly.
      CLIENT_TLS_SSLMODE: "disable",
      // SA_PGBOUNCER_VERBOSE=1|2 turns on PgBouncer's debug log (diagnosing the harness only).
      VERBOSE: Deno.env.get("SA_PGBOUNCER_VERBOSE") ?? "0",
      ...this.env,
    };
  }

  async start(): Promise<void> {
    if (this.running) return;
    const proc = await this.launch();
    await waitUntilAccepting(proc, "PgBouncer", this.host, this.port, 20_000);
  }

  /**
   * Runs `entrypoint.sh serve` without waiting for PgBouncer to listen (its boot check may hold
   * it back, or end it): the process, to watch its exit.
   */
  async launch(): Promise<ServerProcess> {
    if (this.running) return this.#process!;
    const user = this.#options.user;
    for (const d of [this.dir, this.confDir, this.stateDir, this.socketDir]) {
      await mkdirOwned(user, d);
    }
    this.#process = ServerProcess.spawn({
      name: "pgbouncer",
      cmd: "/bin/sh",
      args: [`${this.#options.deployDir}/entrypoint.sh`, "serve"],
      env: this.entrypointEnv(),
      logPath: this.logPath,
      user,
      deathSignal: "SIGTERM",
    });
    return this.#process;
  }

  /** Whether anything accepts TCP connections on PgBouncer's port. */
  async listening(): Promise<boolean> {
    try {
      const conn = await Deno.connect({ hostname: this.host, port: this.port });
      conn.close();
      return true;
    } catch {
      return false;
    }
  }

  /** SIGTERM: PgBouncer 1.18 shuts down immediately, dropping clients (like a crash or restart). */
  async stop(): Promise<void> {
    await this.closeClients();
    await this.#process?.stop("SIGTERM", 10_000);
    this.#process = undefined;
  }

  /** SIGKILL, as when the machine dies. */
  async kill(): Promise<void> {
    await this.#process?.stop("SIGKILL", 5_000);
    this.#process = undefined;
  }

  /** Connection string for applications (through the pooler). */
  url(): string {
    const o = this.#options;
    return `postgresql://${o.appUser}:${o.appPassword}@${this.host}:${this.port}/${this.database}`;
  }

  /**
   * Connection string for the admin console: through the local socket (libpq's `host=/dir`), the
   * only way in unless ADMIN_OVER_TCP=1.
   */
  adminUrl(): string {
    return `postgresql://${this.adminUser}:${this.adminPassword}@localhost:${this.port}/pgbouncer?host=${this.socketDir}`;
  }

  /** The admin console over TCP: refused unless the entrypoint runs with ADMIN_OVER_TCP=1. */
  adminTcpUrl(): string {
    return `postgresql://${this.adminUser}:${this.adminPassword}@${this.host}:${this.port}/pgbouncer`;
  }

  /** A client through the pooler (transaction mode: no prepared statements). */
  sql(options: { max?: number } = {}): Sql {
    const c = createSql(this.url(), {
      max: options.max ?? 4,
      applicationName: "sa-toolkit-test",
      connectTimeout: 10,
    });
    this.#clients.add(c);
    return c;
  }

  /** A client for the admin console (simple query protocol only). */
  admin(): Sql {
    const c = createSql(this.adminUrl(), { max: 1, adminConsole: true, connectTimeout: 5 });
    this.#clients.add(c);
    return c;
  }

  async closeClients(): Promise<void> {
    const clients = [...this.#clients];
    this.#clients.clear();
    await Promise.all(clients.map((c) => c.end({ timeout: 2 }).catch(() => {})));
  }

  /**
   * Runs the shipped entrypoint with `args` (route, show, pause, resume, kill, target) as the
   * server user, the way a Fly machine's exec does.
   */
  async entrypoint(
    args: string[],
    timeoutSeconds = 15,
  ): Promise<{ code: number; stdout: string; stderr: string }> {
    const argv = asServerUser(this.#options.user, "SIGKILL", "/bin/sh", [
      `${this.#options.deployDir}/entrypoint.sh`,
      ...args,
    ]);
    return await runCommand("timeout", [String(timeoutSeconds), ...argv], {
      env: { ...this.entrypointEnv(), PATH: "/usr/bin:/bin:/usr/sbin:/sbin" },
      clearEnv: true,
    });
  }

  async tailLog(): Promise<string> {
    return (await this.#process?.tailLog()) ?? "(not running)";
  }
}

export { PGBOUNCER_DEPLOY_DIR };
