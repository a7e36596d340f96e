/**
 * A stand-in for pg_net's background worker (pg_net cannot be installed here). Like the real
 * worker it takes committed requests out of net.http_request_queue, sends each with its timeout,
 * and records the outcome in net._http_response under the request's id (status_code,
 * content_type, headers, content, timed_out, error_msg) — a timeout or a refused connection as
 * timed_out / error_msg with no status, the way pg_net leaves them. Tests read outcomes where real
 * pg_net leaves them.
 *
 * Like the real worker (a long-lived background worker whose session keeps the database defaults
 * it started with), an error ends the session and the next round starts a new one: on a site whose
 * read-only default was lifted since, the real worker's failing DELETE makes it restart the same way.
 *
 * `cut()` is the network partition of a site: its requests are lost (recorded as timed out after
 * their own timeout), as when the region cannot reach the other one.
 */
import { healingSql } from "../../shared/db/mod.ts";
import { sleep } from "../../shared/ha/deadline.ts";
import type { PgCluster } from "./postgres.ts";

export interface PgNetCounts {
  sent: number;
  answered: number;
  failed: number;
  lost: number;
}

export class PgNetWorker {
  readonly counts: PgNetCounts = { sent: 0, answered: 0, failed: 0, lost: 0 };
  // Not the cluster's own clients: those end when a test stops the cluster, and this worker
  // must carry on when it comes back (a healing pool reconnects).
  #pool: ReturnType<typeof healingSql>;
  #url: string;
  #running = false;
  #loop?: Promise<void>;
  #cut = false;

  constructor(readonly cluster: PgCluster, readonly intervalMs = 100) {
    this.#url = cluster.url("supabase_admin");
    this.#pool = this.#newPool();
  }

  #newPool() {
    return healingSql(() => this.#url, {
      max: 2,
      applicationName: "pg_net stand-in",
      connectTimeout: 2,
    });
  }

  start(): this {
    this.#running = true;
    this.#loop = this.#run();
    return this;
  }

  /** Partition: from now on this site's requests are lost. */
  cut(): void {
    this.#cut = true;
  }

  heal(): void {
    this.#cut = false;
  }

  get isCut(): boolean {
    return this.#cut;
  }

  async stop(): Promise<void> {
    this.#running = false;
    await this.#loop;
    await this.#pool.close();
  }

  async #run(): Promise<void> {
    while (this.#running) {
      try {
        const batch = await this.#pool.get()`
          delete from net.http_request_queue
          where id in (select id from net.http_request_queue order by id limit 20 for update skip locked)
          returning id, method, url, headers, convert_from(body, 'UTF8') as body, timeout_milliseconds`;
        await Promise.all(batch.map((r) => this.#send(r)));
      } catch {
        // The cluster is down, or this session cannot write (see above): restart the session.
        const old = this.#pool;
        this.#pool = this.#newPool();
        await old.close();
      }
      await sleep(this.intervalMs);
    }
  }

  async #send(r: Record<string, unknown>): Promise<void> {
    const id = Number(r.id);
    const timeout = Number(r.timeout_milliseconds);
    this.counts.sent++;
    let row: Record<string, unknown>;
    if (this.#cut) {
      this.counts.lost++;
      await sleep(timeout);
      row = {
        status_code: null,
        content_type: null,
        headers: null,
        content: null,
        timed_out: true,
        error_msg: `Timeout of ${timeout} ms reached`,
      };
    } else {
      try {
        const res = await fetch(String(r.url), {
          method: String(r.method),
          headers: r.headers as Record<string, string>,
          body: r.method === "GET" ? undefined : (r.body as string | null) ?? undefined,
          signal: AbortSignal.timeout(timeout),
        });
        const content = await res.text();
        this.counts.answered++;
        row = {
          status_code: res.status,
          content_type: res.headers.get("content-type"),
          headers: Object.fromEntries(res.headers),
          content,
          timed_out: false,
          error_msg: null,
        };
      } catch (e) {
        this.counts.failed++;
        const timedOut = e instanceof DOMException && e.name === "TimeoutError";
        row = {
          status_code: null,
          content_type: null,
          headers: null,
          content: null,
          timed_out: timedOut,
          error_msg: timedOut ? `Timeout of ${timeout} ms reached` : String(e),
        };
      }
    }
    const sql = this.#pool.get();
    await sql`
      insert into net._http_response (id, status_code, content_type, headers, content, timed_out, error_msg)
      values (${id}, ${row.status_code as number | null}, ${row.content_type as string | null},
              ${row.headers ? sql.json(row.headers as never) : null}, ${row.content as
      | string
      | null},
              ${row.timed_out as boolean}, ${row.error_msg as string | null})`.catch(() => {});
  }
}
