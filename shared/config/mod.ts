/**
 * Each function's environment, validated with zod once at start-up. Loading never throws: a
 * missing or malformed variable becomes a `ConfigProblem`, and the routes that need it answer
 * 503 `not_configured` naming the variable (never its value). Names are the DESIGN.md contract.
 */
import { z } from "zod";
import { HttpError } from "../http/errors.ts";

export type Env = Record<string, string | undefined>;

export interface ConfigProblem {
  variable: string;
  message: string;
}

const postgresUrl = z
  .string()
  .trim()
  .refine((v) => {
    try {
      const u = new URL(v);
      return (u.protocol === "postgres:" || u.protocol === "postgresql:") && u.hostname !== "";
    } catch {
      return false;
    }
  }, "must be a postgresql:// connection string");

const httpUrl = z
  .string()
  .trim()
  .refine((v) => {
    try {
      const u = new URL(v);
      return u.protocol === "http:" || u.protocol === "https:";
    } catch {
      return false;
    }
  }, "must be an http(s) URL")
  .transform((v) => v.replace(/\/+$/, ""));

const nonEmpty = z.string().trim().min(1);
const booleanish = z
  .string()
  .trim()
  .toLowerCase()
  .refine((v) => ["true", "false", "1", "0", "yes", "no"].includes(v), "must be true or false")
  .transform((v) => v === "true" || v === "1" || v === "yes");

/** The S3 key prefix: empty, or segments ending in "/", without "..", "//" or a leading "/". */
export const s3Prefix = z
  .string()
  .refine(
    (v) => v === "" || (/^[^/].*\/$/.test(v) && !v.includes("//") && !v.split("/").includes("..")),
    {
      message: "must be empty or look like 'path/to/' (no leading '/', ending in '/')",
    },
  );

/** `all`, or bucket names separated by commas or spaces. */
export const bucketSelection = z
  .string()
  .trim()
  .min(1)
  .transform((
    v,
  ) => (v.toLowerCase() === "all" ? ("all" as const) : v.split(/[\s,]+/).filter(Boolean)));

/** Reads one variable through a schema; records a problem instead of throwing. */
function read<S extends z.ZodType>(
  env: Env,
  variable: string,
  schema: S,
  problems: ConfigProblem[],
  required: boolean,
): z.infer<S> | undefined {
  const raw = env[variable];
  if (raw === undefined || raw.trim() === "") {
    if (required) problems.push({ variable, message: `${variable} is not set` });
    return undefined;
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    problems.push({
      variable,
      message: `${variable} ${parsed.error.issues[0]?.message ?? "is invalid"}`,
    });
    return undefined;
  }
  return parsed.data;
}

interface BaseConfig {
  problems: ConfigProblem[];
}

export interface TelemetryConfig extends BaseConfig {
  apiToken?: string;
  dbUrl?: string;
}

export interface S3Config {
  bucket?: string;
  region: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  endpoint?: string;
  forcePathStyle: boolean;
  prefix: string;
}

export interface StorageConfig extends BaseConfig {
  apiToken?: string;
  dbUrl?: string;
  supabaseUrl?: string;
  serviceRoleKey?: string;
  buckets: "all" | string[];
  s3: S3Config;
}

export interface HaConfig extends BaseConfig {
  primaryDbUrl?: string;
  standbyDbUrl?: string;
  pgbouncerAdminUrl?: string;
  pgbouncerDatabase: string;
  router: "file" | "fly";
  databasesFile?: string;
  fly: { appName?: string; apiToken?: string; apiUrl: string };
  supabaseUrl?: string;
  /** The Supabase project URL of each site, answered by GET /failover/active. */
  primarySupabaseUrl?: string;
  standbySupabaseUrl?: string;
  /**
   * The failover function deployed with each site (default: its project URL +
   * /functions/v1/failover). A site's lease is renewed by the OTHER site's function.
   */
  primaryFailoverUrl?: string;
  standbyFailoverUrl?: string;
  /** Accepted by POST /failover/lease only; stored in each site's Vault by setup. */
  leaseToken?: string;
}

export interface HealthConfig extends HaConfig {
  healthToken?: string;
}

export interface FailoverConfig extends HaConfig {
  failoverToken?: string;
  /** Also opens the read-only GET /failover/active. */
  healthToken?: string;
}

export function loadTelemetryConfig(env: Env): TelemetryConfig {
  const problems: ConfigProblem[] = [];
  return {
    apiToken: read(env, "TOOLKIT_API_TOKEN", nonEmpty, [], false),
    dbUrl: read(env, "SUPABASE_DB_URL", postgresUrl, problems, true),
    problems,
  };
}

export function loadStorageConfig(env: Env): StorageConfig {
  const problems: ConfigProblem[] = [];
  return {
    apiToken: read(env, "TOOLKIT_API_TOKEN", nonEmpty, [], false),
    dbUrl: read(env, "SUPABASE_DB_URL", postgresUrl, problems, true),
    supabaseUrl: read(env, "SUPABASE_URL", httpUrl, problems, true),
    serviceRoleKey: read(env, "SUPABASE_SERVICE_ROLE_KEY", nonEmpty, problems, true),
    buckets: read(env, "SUPABASE_BUCKETS", bucketSelection, problems, false) ?? "all",
    s3: {
      bucket: read(env, "AWS_S3_BUCKET", nonEmpty, problems, true),
      region: read(env, "AWS_REGION", nonEmpty, problems, false) ?? "us-east-1",
      accessKeyId: read(env, "AWS_ACCESS_KEY_ID", nonEmpty, problems, false),
      secretAccessKey: read(env, "AWS_SECRET_ACCESS_KEY", nonEmpty, problems, false),
      endpoint: read(env, "S3_ENDPOINT", httpUrl, problems, false),
      forcePathStyle: read(env, "S3_FORCE_PATH_STYLE", booleanish, problems, false) ?? false,
      prefix: read(env, "S3_PREFIX", s3Prefix, problems, false) ?? "",
    },
    problems,
  };
}

function loadHa(env: Env, problems: ConfigProblem[]): HaConfig {
  const router = read(env, "PGBOUNCER_ROUTER", z.enum(["file", "fly"]), problems, false) ?? "file";
  const config: HaConfig = {
    primaryDbUrl: read(env, "PRIMARY_DB_URL", postgresUrl, problems, true),
    standbyDbUrl: read(env, "STANDBY_DB_URL", postgresUrl, problems, true),
    pgbouncerAdminUrl: read(env, "PGBOUNCER_ADMIN_URL", postgresUrl, problems, false),
    pgbouncerDatabase: read(env, "PGBOUNCER_DATABASE", nonEmpty, problems, false) ?? "postgres",
    router,
    databasesFile: read(env, "PGBOUNCER_DATABASES_FILE", nonEmpty, problems, false),
    fly: {
      appName: read(env, "FLY_APP_NAME", nonEmpty, problems, router === "fly"),
      apiToken: read(env, "FLY_API_TOKEN", nonEmpty, problems, router === "fly"),
      apiUrl: read(env, "FLY_API_URL", httpUrl, problems, false) ?? "https://api.machines.dev",
    },
    supabaseUrl: read(env, "SUPABASE_URL", httpUrl, problems, false),
    primarySupabaseUrl: read(env, "PRIMARY_SUPABASE_URL", httpUrl, problems, false),
    standbySupabaseUrl: read(env, "STANDBY_SUPABASE_URL", httpUrl, problems, false),
    leaseToken: read(env, "HA_LEASE_TOKEN", nonEmpty, [], false),
    problems,
  };
  config.primaryFailoverUrl = read(env, "PRIMARY_FAILOVER_URL", httpUrl, problems, false) ??
    (config.primarySupabaseUrl ? `${config.primarySupabaseUrl}/functions/v1/failover` : undefined);
  config.standbyFailoverUrl = read(env, "STANDBY_FAILOVER_URL", httpUrl, problems, false) ??
    (config.standbySupabaseUrl ? `${config.standbySupabaseUrl}/functions/v1/failover` : undefined);
  return config;
}

export function loadHealthConfig(env: Env): HealthConfig {
  const problems: ConfigProblem[] = [];
  return {
    ...loadHa(env, problems),
    healthToken: read(env, "HEALTH_TOKEN", nonEmpty, [], false),
    problems,
  };
}

export function loadFailoverConfig(env: Env): FailoverConfig {
  const problems: ConfigProblem[] = [];
  return {
    ...loadHa(env, problems),
    failoverToken: read(env, "FAILOVER_TOKEN", nonEmpty, [], false),
    healthToken: read(env, "HEALTH_TOKEN", nonEmpty, [], false),
    problems,
  };
}

/** Throws 503 `not_configured` when any of the named variables has a problem. */
export function requireConfigured(config: BaseConfig, variables: string[]): void {
  const missing = config.problems.filter((p) => variables.includes(p.variable));
  if (missing.length > 0) {
    throw new HttpError(
      503,
      "not_configured",
      `This function is not configured: ${missing.map((p) => p.message).join("; ")}.`,
      { variables: missing.map((p) => p.variable) },
    );
  }
}
