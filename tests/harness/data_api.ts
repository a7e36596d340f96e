/**
 * The Data API's write path, statement for statement: PostgREST (behind every supabase-js
 * insert/update/delete) logs in as `authenticator` and runs each write as
 *
 *   BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE;
 *   SET LOCAL ROLE authenticated;            -- the role from the request's JWT
 *   SELECT set_config('request.jwt.claims', '<claims>', true), ...;
 *   <the statement>;
 *   COMMIT;
 *
 * An explicit READ WRITE overrides a database-level read-only default, which is why the write
 * guard, not the read-only default, is the fence. Debian has no PostgREST; this reproduces its
 * transaction exactly (see ../shared/reference/platform-facts.md).
 */
import { createSql, type Sql } from "../../shared/db/mod.ts";
import type { PgCluster } from "./postgres.ts";

export interface DataApiResult {
  ok: boolean;
  /** SQLSTATE of the refusal. */
  code?: string;
  message?: string;
}

export class DataApi {
  readonly #sql: Sql;

  /** `url`: a site's own endpoint (the project's PostgREST talks to its database directly). */
  constructor(
    readonly url: string,
    readonly role: "authenticated" | "anon" | "service_role" = "authenticated",
  ) {
    this.#sql = createSql(url, { max: 2, applicationName: "postgrest", connectTimeout: 5 });
  }

  static for(
    cluster: PgCluster,
    role: "authenticated" | "anon" | "service_role" = "authenticated",
  ) {
    return new DataApi(cluster.url("authenticator"), role);
  }

  /** One write request: `statement` is the SQL PostgREST would generate for it. */
  async write(statement: string, params: unknown[] = []): Promise<DataApiResult> {
    const claims = JSON.stringify({ role: this.role, sub: crypto.randomUUID(), aud: this.role });
    try {
      await this.#sql.begin("isolation level read committed read write", async (tx) => {
        await tx.unsafe(`set local role ${this.role}`);
        await tx`select set_config('request.jwt.claims', ${claims}, true),
                        set_config('request.method', 'POST', true)`;
        await tx.unsafe(statement, params as never[]);
      });
      return { ok: true };
    } catch (e) {
      return { ok: false, code: (e as { code?: string }).code, message: (e as Error).message };
    }
  }

  async close(): Promise<void> {
    await this.#sql.end({ timeout: 2 }).catch(() => {});
  }
}
