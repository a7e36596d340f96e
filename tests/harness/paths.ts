/** Where the harness finds the repository, the pinned npm tools and the Debian binaries. */

export const REPO_ROOT = decodeURIComponent(new URL("../../", import.meta.url).pathname).replace(
  /\/$/,
  "",
);
export const TOOLS_NODE_MODULES = `${REPO_ROOT}/.tools/node_modules`;
export const PG15_BIN = "/usr/lib/postgresql/15/bin";
export const PGBOUNCER_BIN = "/usr/sbin/pgbouncer";
export const PG_ISREADY = `${PG15_BIN}/pg_isready`;
export const SUPABASE_CLI = `${TOOLS_NODE_MODULES}/.bin/supabase`;
export const PGBOUNCER_DEPLOY_DIR = `${REPO_ROOT}/deploy/fly-pgbouncer`;

/** A test run id shared by every stack of one `deno test` process (and its children). */
export const RUN_ID: string = (() => {
  const fromEnv = Deno.env.get("SA_TOOLKIT_RUN_ID");
  if (fromEnv && /^[a-z0-9]{4,16}$/.test(fromEnv)) return fromEnv;
  const id = crypto.randomUUID().replaceAll("-", "").slice(0, 8);
  Deno.env.set("SA_TOOLKIT_RUN_ID", id);
  return id;
})();

/** Every temp dir the harness makes starts with this, so leftovers can be found and asserted. */
export const TEMP_PREFIX = "sa-toolkit-stack-";

export function tempRoot(): string {
  return Deno.env.get("TMPDIR") ?? "/tmp";
}

/** Directory where the logs of a failed run are kept (outside any temp dir). */
export const FAILED_LOGS_DIR = `${REPO_ROOT}/.test-logs`;

export type PgVersion = 15 | 16 | 17 | 18;
