/**
 * One PostgreSQL cluster of the local stack: initdb'd into the stack's temp dir, configured like a
 * Supabase database (logical WAL, pg_stat_statements, pg_cron on 15), bootstrapped with the
 * platform's roles and schemas, and run as the server user on a free loopback port.
 */
import { createSql, type Sql } from "../../shared/db/mod.ts";
import { mkdirOwned, type ServerUser, writeOwned } from "./os_user.ts";
import { PG15_BIN, PG_ISREADY, PGBOUNCER_DEPLOY_DIR, type PgVersion } from "./paths.ts";
import { freePort } from "./ports.ts";
import { runCommand, ServerProcess, waitFor } from "./process.ts";
import { pgBinDir } from "./tools.ts";

export type ShutdownMode = "smart" | "fast" | "immediate";
/**
 * Roles a test logs in as: the bootstrap superuser, the platform's `postgres`, PostgREST's
 * `authenticator`, and the application role PgBouncer uses (deploy/fly-pgbouncer/app_role.sql).
 */
export type PgRole = "postgres" | "supabase_admin" | "authenticator" | "app_writer";

const SHUTDOWN_SIGNAL: Record<ShutdownMode, Deno.Signal> = {
  smart: "SIGTERM",
  fast: "SIGINT",
  immediate: "SIGQUIT",
};

export interface PgClusterOptions {
  name: string;
  version: PgVersion;
  /** The stack's temp dir; the cluster lives in `<baseDir>/<name>`. */
  baseDir: string;
  user: ServerUser;
  /** Load pg_cron (only the Debian PostgreSQL 15 has it). */
  cron?: boolean;
  settings?: Record<string, string | number | boolean>;
  /** Fixed passwords (the HA pair shares the application role's, as PgBouncer logs in to either). */
  passwords?: Partial<Record<PgRole, string>>;
}

function secret(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(18));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function confValue(v: string | number | boolean): string {
  if (typeof v === "number") return String(v);
  if (typeof v === "boolean") return v ? "on" : "off";
  return `'${v.replaceAll("'", "''")}'`;
}

/** Waits until a server speaking the Postgres protocol (postgres, PgBouncer) accepts connections. */
export async function waitUntilAccepting(
  proc: ServerProcess,
  label: string,
  host: string,
  port: number,
  timeoutMs: number,
): Promise<void> {
  await waitFor(
    `${label} to accept connections`,
    async () => {
      if (proc.exited) throw new Error(`${label} exited during start-up:\n${await proc.tailLog()}`);
      const r = await runCommand(PG_ISREADY, ["-q", "-h", host, "-p", String(port), "-t", "1"]);
      return r.code === 0;
    },
    timeoutMs,
    40,
  );
}

export class PgCluster {
  readonly host = "127.0.0.1";
  readonly name: string;
  readonly version: PgVersion;
  readonly dir: string;
  readonly dataDir: string;
  readonly socketDir: string;
  readonly logPath: string;
  readonly port: number;
  readonly cron: boolean;
  readonly passwords: Record<PgRole, string>;
  #user: ServerUser;
  #binDir = "";
  #process?: ServerProcess;
  #clients = new Set<Sql>();
  #settings: Record<string, string | number | boolean>;

  private constructor(options: PgClusterOptions) {
    this.name = options.name;
    this.version = options.version;
    this.dir = `${options.baseDir}/${options.name}`;
    this.dataDir = `${this.dir}/data`;
    this.socketDir = `${this.dir}/sock`;
    this.logPath = `${this.dir}/postgres.log`;
    this.port = freePort();
    this.cron = options.cron ?? false;
    this.#user = options.user;
    this.#settings = options.settings ?? {};
    this.passwords = {
      supabase_admin: options.passwords?.supabase_admin ?? secret(),
      postgres: options.passwords?.postgres ?? secret(),
      authenticator: options.passwords?.authenticator ?? secret(),
      app_writer: options.passwords?.app_writer ?? secret(),
    };
  }

  /** initdb + configuration; the cluster is not started yet. */
  static async create(options: PgClusterOptions): Promise<PgCluster> {
    if (options.cron && options.version !== 15) {
      throw new Error("pg_cron is only available for the Debian PostgreSQL 15 server.");
    }
    const cluster = new PgCluster(options);
    await cluster.#init();
    return cluster;
  }

  get binDir(): string {
    return this.#binDir;
  }

  get running(): boolean {
    return this.#process !== undefined && !this.#process.exited;
  }

  get pid(): number | undefined {
    return this.running ? this.#process!.pid : undefined;
  }

  async #init(): Promise<void> {
    this.#binDir = await pgBinDir(this.version, this.#user);
    await mkdirOwned(this.#user, this.dir);
    await mkdirOwned(this.#user, this.socketDir);
    const pwfile = `${this.dir}/pwfile`;
    await writeOwned(this.#user, pwfile, `${this.passwords.supabase_admin}\n`);
    await writeOwned(this.#user, this.logPath, "");
    const initdb = ServerProcess.spawn({
      name: `${this.name}-initdb`,
      cmd: `${this.#binDir}/initdb`,
      args: [
        "-D",
        this.dataDir,
        "-U",
        "supabase_admin",
        `--pwfile=${pwfile}`,
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "-E",
        "UTF8",
        "--locale=C.UTF-8",
        "--no-sync",
      ],
      logPath: this.logPath,
      user: this.#user,
      deathSignal: "SIGKILL",
    });
    const status = await initdb.status;
    await Deno.remove(pwfile);
    if (!status.success) {
      throw new Error(
        `initdb failed for ${this.name} (PG${this.version}):\n${await initdb.tailLog()}`,
      );
    }
    const preload = this.cron ? "pg_cron,pg_stat_statements" : "pg_stat_statements";
    const settings: Record<string, string | number | boolean> = {
      listen_addresses: "127.0.0.1",
      port: this.port,
      unix_socket_directories: this.socketDir,
      max_connections: 300,
      shared_buffers: "64MB",
      // Test clusters trade durability against an OS crash for speed; a postgres crash (the kind
      // the tests inject) is still recovered from WAL in the page cache.
      fsync: false,
      wal_level: "logical",
      max_wal_senders: 16,
      max_replication_slots: 16,
      max_worker_processes: 24,
      max_logical_replication_workers: 8,
      wal_sender_timeout: "15s",
      wal_receiver_timeout: "15s",
      track_io_timing: true,
      track_wal_io_timing: true,
      shared_preload_libraries: preload,
      "pg_stat_statements.track": "all",
      log_line_prefix: "%m [%p] %q%u@%d ",
      lc_messages: "C",
      timezone: "UTC",
      log_timezone: "UTC",
      ...(this.cron
        ? {
          "cron.database_name": "postgres",
          "cron.use_background_workers": true,
          "cron.timezone": "UTC",
        }
        : {}),
      ...this.#settings,
    };
    const conf = Object.entries(settings).map(([k, v]) => `${k} = ${confValue(v)}`).join("\n");
    const confPath = `${this.dataDir}/postgresql.conf`;
    await Deno.writeTextFile(confPath, `\n# sa-toolkit local stack\n${conf}\n`, { append: true });
    const hba = [
      "local all all trust",
      "host all all 127.0.0.1/32 scram-sha-256",
      "host replication all 127.0.0.1/32 scram-sha-256",
    ].join("\n");
    await Deno.writeTextFile(`${this.dataDir}/pg_hba.conf`, `${hba}\n`);
  }

  async start(): Promise<void> {
    if (this.running) return;
    this.#process = ServerProcess.spawn({
      name: this.name,
      cmd: `${this.#binDir}/postgres`,
      args: ["-D", this.dataDir],
      logPath: this.logPath,
      user: this.#user,
      deathSignal: "SIGQUIT",
    });
    await waitUntilAccepting(
      this.#process,
      `${this.name} (PostgreSQL ${this.version})`,
      this.host,
      this.port,
      60_000,
    );
  }

  /** Stops the postmaster: smart waits for clients, fast rolls them back, immediate crashes. */
  async stop(mode: ShutdownMode = "fast"): Promise<void> {
    await this.closeClients();
    if (!this.#process) return;
    await this.#process.stop(SHUTDOWN_SIGNAL[mode], 30_000);
    this.#process = undefined;
  }

  async restart(mode: ShutdownMode = "fast"): Promise<void> {
    await this.stop(mode);
    await this.start();
  }

  /** Connection string for a role (password included: never log it). */
  url(role: PgRole = "postgres", database = "postgres"): string {
    return `postgresql://${role}:${this.passwords[role]}@${this.host}:${this.port}/${database}`;
  }

  /** A postgres.js client closed automatically when the cluster stops. */
  sql(
    role: PgRole = "postgres",
    options: { max?: number; applicationName?: string; statementTimeoutMs?: number } = {},
  ): Sql {
    const client = createSql(this.url(role), {
      max: options.max ?? 4,
      applicationName: options.applicationName ?? "sa-toolkit-test",
      connectTimeout: 10,
      // A test blocked on a lock fails after a minute instead of hanging the suite.
      statementTimeoutMs: options.statementTimeoutMs ?? 60_000,
    });
    this.#clients.add(client);
    return client;
  }

  async closeClients(): Promise<void> {
    const clients = [...this.#clients];
    this.#clients.clear();
    await Promise.all(clients.map((c) => c.end({ timeout: 2 }).catch(() => {})));
  }

  /**
   * Runs SQL text with psql as a role, the way an operator does (migrations, maintenance): its
   * session lifts the read-only default a fenced or standby site has, so only the write guard
   * stands between it and application tables. Secrets reach it through `env` and `\getenv`.
   */
  async psql(
    sqlText: string,
    options: { role?: PgRole; env?: Record<string, string> } = {},
  ): Promise<{ stdout: string; stderr: string }> {
    const role = options.role ?? "supabase_admin";
    const args = [
      "-X",
      "-q",
      "-v",
      "ON_ERROR_STOP=1",
      "-h",
      this.host,
      "-p",
      String(this.port),
      "-U",
      role,
      "-d",
      "postgres",
    ];
    args.push("-f", "-");
    const r = await runCommand(`${PG15_BIN}/psql`, args, {
      env: {
        ...options.env,
        PGPASSWORD: this.passwords[role],
        PGCONNECT_TIMEOUT: "10",
        PGOPTIONS: "-c default_transaction_read_only=off",
      },
      stdin: sqlText,
    });
    if (r.code !== 0) throw new Error(`psql on ${this.name} failed: ${r.stderr.trim()}`);
    return { stdout: r.stdout, stderr: r.stderr };
  }

  /** Creates what the Supabase platform provides before any customer migration runs. */
  async bootstrapPlatform(): Promise<void> {
    const sqlText = await Deno.readTextFile(new URL("./sql/platform.sql", import.meta.url));
    await this.psql(sqlText, {
      env: {
        SA_POSTGRES_PASSWORD: this.passwords.postgres,
        SA_AUTHENTICATOR_PASSWORD: this.passwords.authenticator,
      },
    });
    // Stand-ins for pg_net and Vault, which cannot be installed here (see the file's header).
    await this.psql(
      await Deno.readTextFile(new URL("./sql/platform_standins.sql", import.meta.url)),
    );
  }

  /** The application role PgBouncer logs in as, created by the very SQL we ship for it. */
  async createAppRole(): Promise<void> {
    await this.psql(await Deno.readTextFile(`${PGBOUNCER_DEPLOY_DIR}/app_role.sql`), {
      role: "postgres",
      env: { APP_DB_PASSWORD: this.passwords.app_writer },
    });
  }
}
