/**
 * The local stack: the servers a test, `deno task dev`, the demo or a benchmark asks for, on free
 * loopback ports in one temp dir, all stopped on exit, on Ctrl-C and when a test fails (then the
 * logs are kept under `.test-logs/` and their path is printed).
 */
import type { Env } from "../../shared/config/mod.ts";
import { mkdirOwned, type ServerUser, serverUser } from "./os_user.ts";
import {
  FAILED_LOGS_DIR,
  PGBOUNCER_DEPLOY_DIR,
  type PgVersion,
  RUN_ID,
  TEMP_PREFIX,
  tempRoot,
} from "./paths.ts";
import { PgBouncer } from "./pgbouncer.ts";
import { PgCluster } from "./postgres.ts";
import { trackDir, untrackDir } from "./process.ts";
import { S3Server } from "./s3.ts";
import { StorageStandIn } from "./storage.ts";
import { dbPush } from "./supabase_cli.ts";
import { type FunctionDeps, type FunctionsServer, serveFunctions } from "./functions.ts";
import { serverToolsDir } from "./tools.ts";
import { freePort } from "./ports.ts";
import { TcpProxy } from "./tcp_proxy.ts";
import type { LogSink } from "../../shared/http/logger.ts";

export interface StackOptions {
  /** Short label used in the temp dir name and in kept logs. */
  name?: string;
  /** PostgreSQL 15 with pg_cron and pg_stat_statements, wal_level=logical. */
  primary?: boolean;
  /** A second PostgreSQL 15 cluster (the warm standby). */
  standby?: boolean;
  /** Embedded PostgreSQL clusters for the version matrix. */
  versions?: Exclude<PgVersion, 15>[];
  /** PgBouncer (transaction mode) in front of the primary. */
  pgbouncer?: boolean;
  /** The S3-protocol server, with these buckets. */
  s3?: boolean | { buckets: string[] };
  /** The Supabase Storage stand-in (needs `primary`); `env()` then points SUPABASE_URL at it. */
  storage?: boolean;
  /** Apply supabase/migrations with `supabase db push` to primary and standby (and versions). */
  migrate?: boolean;
  /** Serve the four functions; port 0 picks a free one. */
  functions?: boolean | { port?: number; env?: Env; logSink?: LogSink; deps?: FunctionDeps };
  /**
   * The HA pair: primary + standby (sharing the application role's password, as PgBouncer logs
   * in to whichever is primary), PgBouncer and migrations. `env()` then gives the failover and
   * health functions superuser URLs: on PostgreSQL 15 only a superuser may own a subscription.
   */
  ha?: boolean;
  /**
   * HA pair only: put a TCP proxy in front of each site for everything but the site's own
   * clients — the functions, the other site's subscription, PgBouncer — so a test can cut a site
   * off (`stack.proxies.primary.cut()`) while its own Data API still reaches it.
   */
  partitionable?: boolean;
  /** Settings added to every PostgreSQL cluster's postgresql.conf. */
  pgSettings?: Record<string, string | number | boolean>;
}

export interface StackTokens {
  api: string;
  failover: string;
  health: string;
  /** HA_LEASE_TOKEN: what each site's Vault holds to renew its write lease. */
  lease: string;
  serviceRole: string;
  anon: string;
}

function token(bytes = 24): string {
  return Array.from(
    crypto.getRandomValues(new Uint8Array(bytes)),
    (b) => b.toString(16).padStart(2, "0"),
  ).join("");
}

function base64url(text: string): string {
  return btoa(text).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

/** A JWT shaped like Supabase's anon/service keys (signature is random: nothing verifies it here). */
export function fakeSupabaseKey(role: "anon" | "service_role"): string {
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = base64url(JSON.stringify({ iss: "supabase-demo", role, exp: 1983812996 }));
  return `${header}.${payload}.${base64url(token(32))}`;
}

interface StackOwner {
  pid: number;
  runId: string;
  name: string;
}

export class Stack {
  readonly name: string;
  readonly dir: string;
  readonly user: ServerUser;
  readonly tokens: StackTokens;
  primary?: PgCluster;
  standby?: PgCluster;
  readonly clusters = new Map<PgVersion, PgCluster>();
  pgbouncer?: PgBouncer;
  s3?: S3Server;
  storage?: StorageStandIn;
  functions?: FunctionsServer;
  /** Started as an HA pair (see StackOptions.ha). */
  ha = false;
  /** The port the functions listen on (chosen before they start, so env() can name it). */
  functionsPort?: number;
  /** With StackOptions.partitionable: the path to each site from the functions and the other site. */
  proxies?: { primary: TcpProxy; standby: TcpProxy };
  /** Background helpers (lease ticker, pg_net worker) stopped with the stack. */
  readonly helpers: { stop(): Promise<void> }[] = [];
  /** Milliseconds each phase of start-up took. */
  readonly timings: Record<string, number> = {};
  #stopped = false;
  #failed = false;
  #signalHandler?: () => void;

  constructor(name: string, dir: string, user: ServerUser, tokens?: Partial<StackTokens>) {
    this.name = name;
    this.dir = dir;
    this.user = user;
    this.tokens = {
      api: tokens?.api ?? token(),
      failover: tokens?.failover ?? token(),
      health: tokens?.health ?? token(),
      lease: tokens?.lease ?? token(),
      serviceRole: tokens?.serviceRole ?? fakeSupabaseKey("service_role"),
      anon: tokens?.anon ?? fakeSupabaseKey("anon"),
    };
  }

  /** Every PostgreSQL cluster of the stack. */
  get allClusters(): PgCluster[] {
    return [this.primary, this.standby, ...this.clusters.values()].filter((c): c is PgCluster =>
      !!c
    );
  }

  /** The environment the functions get (names are the DESIGN.md contract). */
  env(): Env {
    const env: Env = {
      TOOLKIT_API_TOKEN: this.tokens.api,
      FAILOVER_TOKEN: this.tokens.failover,
      HEALTH_TOKEN: this.tokens.health,
      HA_LEASE_TOKEN: this.tokens.lease,
      SUPABASE_SERVICE_ROLE_KEY: this.tokens.serviceRole,
      SUPABASE_ANON_KEY: this.tokens.anon,
      PGBOUNCER_ROUTER: "file",
      S3_FORCE_PATH_STYLE: "true",
      S3_PREFIX: "",
      SUPABASE_BUCKETS: "all",
    };
    if (this.primary) {
      env.SUPABASE_DB_URL = this.primary.url("postgres");
      env.PRIMARY_DB_URL = this.primary.url("postgres");
    }
    if (this.standby) env.STANDBY_DB_URL = this.standby.url("postgres");
    if (this.ha && this.primary && this.standby) {
      env.PRIMARY_DB_URL = this.#viaProxy(this.primary.url("supabase_admin"), "primary");
      env.STANDBY_DB_URL = this.#viaProxy(this.standby.url("supabase_admin"), "standby");
    }
    if (this.functionsPort) {
      // One local gateway serves both "regions": each site's lease is renewed through it.
      const failover = `http://127.0.0.1:${this.functionsPort}/functions/v1/failover`;
      env.PRIMARY_FAILOVER_URL = failover;
      env.STANDBY_FAILOVER_URL = failover;
    }
    if (this.pgbouncer) {
      // The admin console through PgBouncer's local socket (`?host=<socketDir>`): TCP logins to
      // it are rejected (deploy/fly-pgbouncer/pgbouncer_hba.conf.template).
      env.PGBOUNCER_ADMIN_URL = this.pgbouncer.adminUrl();
      env.PGBOUNCER_DATABASE = this.pgbouncer.database;
      env.PGBOUNCER_DATABASES_FILE = this.pgbouncer.databasesFile;
    }
    if (this.s3) {
      env.AWS_S3_BUCKET = this.s3.buckets[0];
      env.AWS_REGION = this.s3.region;
      env.AWS_ACCESS_KEY_ID = this.s3.accessKeyId;
      env.AWS_SECRET_ACCESS_KEY = this.s3.secretAccessKey;
      env.S3_ENDPOINT = this.s3.endpoint;
    }
    if (this.storage) env.SUPABASE_URL = this.storage.origin;
    return env;
  }

  #viaProxy(url: string, site: "primary" | "standby"): string {
    const proxy = this.proxies?.[site];
    if (!proxy) return url;
    const u = new URL(url);
    u.port = String(proxy.port);
    return u.toString();
  }

  /** Marks the stack's run as failed so `withStack` keeps its logs (test steps report, not throw). */
  markFailed(): void {
    this.#failed = true;
  }

  get failed(): boolean {
    return this.#failed;
  }

  /** Runs a Deno test step; a failed step marks the stack failed. */
  async step(t: Deno.TestContext, name: string, fn: () => Promise<void> | void): Promise<boolean> {
    const ok = await t.step(name, fn);
    if (!ok) this.markFailed();
    return ok;
  }

  /** Stops everything; with `failed` the logs are copied to `.test-logs/` first. */
  async stop(options: { failed?: boolean } = {}): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    if (this.#signalHandler) {
      Deno.removeSignalListener("SIGINT", this.#signalHandler);
      Deno.removeSignalListener("SIGTERM", this.#signalHandler);
    }
    await Promise.all(this.helpers.map((h) => h.stop().catch(() => {})));
    await Promise.all(Object.values(this.proxies ?? {}).map((p) => p.stop()));
    await this.functions?.stop().catch(() => {});
    await this.pgbouncer?.stop().catch(() => {});
    await this.storage?.stop().catch(() => {});
    await Promise.all([
      ...this.allClusters.map((c) => c.stop("fast").catch(() => c.stop("immediate"))),
      this.s3?.stop().catch(() => {}),
    ]);
    if (options.failed) await this.keepLogs();
    await Deno.remove(this.dir, { recursive: true }).catch(() => {});
    untrackDir(this.dir);
  }

  /** Copies every *.log of the stack to `.test-logs/<time>-<name>/` and prints the path. */
  async keepLogs(): Promise<string | undefined> {
    const target = `${FAILED_LOGS_DIR}/${
      new Date().toISOString().replace(/[:.]/g, "-")
    }-${this.name}`;
    let copied = 0;
    for await (const entry of walkLogs(this.dir)) {
      const rel = entry.slice(this.dir.length + 1).replaceAll("/", "__");
      await Deno.mkdir(target, { recursive: true });
      await Deno.copyFile(entry, `${target}/${rel}`).then(() => copied++).catch(() => {});
    }
    if (copied === 0) return undefined;
    console.error(`[harness] stack "${this.name}" failed; its server logs are kept in ${target}`);
    return target;
  }

  /** Stop the stack on Ctrl-C / SIGTERM (used by dev, demo and benchmarks). */
  stopOnSignals(onStopped: () => void = () => Deno.exit(130)): void {
    this.#signalHandler = () => {
      console.error("\n[harness] stopping the local stack ...");
      this.stop().finally(onStopped);
    };
    Deno.addSignalListener("SIGINT", this.#signalHandler);
    Deno.addSignalListener("SIGTERM", this.#signalHandler);
  }
}

async function* walkLogs(dir: string): AsyncGenerator<string> {
  let entries: Deno.DirEntry[];
  try {
    entries = await Array.fromAsync(Deno.readDir(dir));
  } catch {
    return;
  }
  for (const e of entries) {
    const path = `${dir}/${e.name}`;
    if (e.isDirectory && e.name !== "data") yield* walkLogs(path);
    else if (e.isFile && e.name.endsWith(".log")) yield path;
  }
}

function processAlive(pid: number): boolean {
  try {
    Deno.kill(pid, "SIGCONT");
    return true;
  } catch {
    return false;
  }
}

let swept = false;

/** Removes stack dirs left by harness processes that died without cleaning up. */
async function sweepStaleStacks(): Promise<void> {
  if (swept) return;
  swept = true;
  for await (const entry of Deno.readDir(tempRoot())) {
    if (!entry.isDirectory || !entry.name.startsWith(TEMP_PREFIX)) continue;
    const dir = `${tempRoot()}/${entry.name}`;
    try {
      const owner: StackOwner = JSON.parse(await Deno.readTextFile(`${dir}/owner.json`));
      if (processAlive(owner.pid)) continue;
    } catch {
      // No owner file: a half-created dir; old enough to be stale?
      const info = await Deno.stat(dir).catch(() => undefined);
      if (!info?.mtime || Date.now() - info.mtime.getTime() < 10 * 60_000) continue;
    }
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Starts what `options` asks for. On any start-up failure everything already started is stopped. */
export async function startStack(
  options: StackOptions = {},
  tokens?: Partial<StackTokens>,
): Promise<Stack> {
  const t0 = performance.now();
  const mark = (phase: string) => (stack.timings[phase] = Math.round(performance.now() - t0));
  await sweepStaleStacks();
  const user = await serverUser();
  const name = (options.name ?? "stack").replace(/[^a-z0-9-]/gi, "-").slice(0, 40);
  const dir = await Deno.makeTempDir({
    dir: tempRoot(),
    prefix: `${TEMP_PREFIX}${RUN_ID}-${name}-`,
  });
  trackDir(dir);
  await mkdirOwned(user, dir, 0o711);
  await Deno.writeTextFile(
    `${dir}/owner.json`,
    JSON.stringify({ pid: Deno.pid, runId: RUN_ID, name }),
  );
  if (options.ha) {
    options = { ...options, primary: true, standby: true, pgbouncer: true, migrate: true };
  }
  const stack = new Stack(name, dir, user, tokens);
  stack.ha = options.ha ?? false;
  const secret = () => crypto.randomUUID().replaceAll("-", "");
  // The HA pair shares the roles a client logs in with: PgBouncer and PostgREST reach either site.
  const shared = options.ha
    ? { postgres: secret(), app_writer: secret(), authenticator: secret() }
    : undefined;
  try {
    if (options.versions?.length) await serverToolsDir(user);
    const settings = options.pgSettings;
    const creating: Promise<void>[] = [];
    // The HA pair: PostgreSQL 15 with pg_cron, as on Supabase (and one password when paired).
    const pg15 = (name: "primary" | "standby") =>
      PgCluster.create({
        name,
        version: 15,
        baseDir: dir,
        user,
        cron: true,
        settings,
        passwords: shared,
      }).then((c) => {
        stack[name] = c;
      });
    if (options.primary || options.pgbouncer) creating.push(pg15("primary"));
    if (options.standby) creating.push(pg15("standby"));
    for (const v of options.versions ?? []) {
      creating.push(
        PgCluster.create({ name: `pg${v}`, version: v, baseDir: dir, user, settings }).then((c) => {
          stack.clusters.set(v, c);
        }),
      );
    }
    if (options.s3) {
      const buckets = typeof options.s3 === "object" ? options.s3.buckets : undefined;
      stack.s3 = new S3Server({ baseDir: dir, user, buckets });
      creating.push(stack.s3.start());
    }
    await Promise.all(creating);
    mark("initdb");
    await Promise.all(stack.allClusters.map(async (c) => {
      await c.start();
      await c.bootstrapPlatform();
    }));
    mark("postgres");
    if (options.ha) {
      await Promise.all([stack.primary!, stack.standby!].map((c) => c.createAppRole()));
      if (options.partitionable) {
        stack.proxies = {
          primary: new TcpProxy(stack.primary!.host, stack.primary!.port).start(),
          standby: new TcpProxy(stack.standby!.host, stack.standby!.port).start(),
        };
      }
    }
    if (options.storage) {
      if (!stack.primary) {
        throw new Error("The storage stand-in needs the primary (storage.objects).");
      }
      stack.storage = new StorageStandIn({
        dir: `${dir}/storage`,
        sql: stack.primary.sql("supabase_admin", { max: 8, applicationName: "storage-stand-in" }),
        serviceRoleKey: stack.tokens.serviceRole,
        anonKey: stack.tokens.anon,
      });
      await stack.storage.start();
      mark("storage");
    }
    if (options.pgbouncer && stack.primary) {
      stack.pgbouncer = new PgBouncer({
        baseDir: dir,
        user,
        upstream: {
          host: stack.primary.host,
          port: stack.proxies?.primary.port ?? stack.primary.port,
        },
        // The HA endpoint logs in as the application role, never as postgres (app_role.sql).
        appUser: options.ha ? "app_writer" : "postgres",
        appPassword: options.ha
          ? stack.primary.passwords.app_writer
          : stack.primary.passwords.postgres,
        deployDir: PGBOUNCER_DEPLOY_DIR,
      });
      await stack.pgbouncer.start();
      mark("pgbouncer");
    }
    if (options.migrate) {
      // The CLI is a Go binary with its own start-up cost; push to the clusters in parallel.
      await Promise.all(stack.allClusters.map((c) => dbPush(c.url("postgres"))));
      mark("migrations");
    }
    if (options.functions) {
      const f = typeof options.functions === "object" ? options.functions : {};
      stack.functionsPort = f.port || freePort();
      stack.functions = await serveFunctions({ ...stack.env(), ...f.env }, {
        port: stack.functionsPort,
        logSink: f.logSink,
        deps: f.deps,
      });
      mark("functions");
    }
    mark("total");
    return stack;
  } catch (e) {
    await stack.stop({ failed: true });
    throw e;
  }
}

/** Runs `fn` with a fresh stack; stops it afterwards and keeps the logs when `fn` throws. */
export async function withStack<T>(
  options: StackOptions,
  fn: (stack: Stack) => Promise<T>,
): Promise<T> {
  const stack = await startStack(options);
  let failed = true;
  try {
    const result = await fn(stack);
    failed = false;
    return result;
  } finally {
    await stack.stop({ failed: failed || stack.failed });
  }
}
