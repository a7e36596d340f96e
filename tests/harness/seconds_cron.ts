/**
 * A stand-in for pg_cron 1.5+'s seconds schedules ('5 seconds'): Debian's pg_cron is 1.4, which
 * schedules by the minute only. It runs one job's command on a cluster every `everyMs`, as the
 * job's owner would, one run at a time (pg_cron never overlaps a job with itself), each run in a
 * fresh session as pg_cron's background workers do (so it sees the database's current defaults,
 * e.g. a read-only default lifted since). `pause()` stops the ticks without forgetting the job.
 */
import { createSql } from "../../shared/db/mod.ts";
import { sleep } from "../../shared/ha/deadline.ts";
import type { PgCluster, PgRole } from "./postgres.ts";

export class SecondsCron {
  runs = 0;
  failures = 0;
  lastError?: string;
  #url: string;
  #running = false;
  #paused = false;
  #loop?: Promise<void>;

  constructor(
    readonly cluster: PgCluster,
    readonly command: string,
    readonly everyMs: number,
    role: PgRole = "postgres",
  ) {
    this.#url = cluster.url(role);
  }

  start(): this {
    this.#running = true;
    this.#loop = this.#run();
    return this;
  }

  pause(): void {
    this.#paused = true;
  }

  resume(): void {
    this.#paused = false;
  }

  async stop(): Promise<void> {
    this.#running = false;
    await this.#loop;
  }

  async #run(): Promise<void> {
    while (this.#running) {
      const started = Date.now();
      if (!this.#paused) {
        try {
          const sql = createSql(this.#url, {
            max: 1,
            applicationName: "pg_cron",
            connectTimeout: 2,
          });
          try {
            await sql.unsafe(this.command);
          } finally {
            await sql.end({ timeout: 1 }).catch(() => {});
          }
          this.runs++;
        } catch (e) {
          this.failures++;
          this.lastError = e instanceof Error ? e.message : String(e);
        }
      }
      await sleep(Math.max(10, this.everyMs - (Date.now() - started)));
    }
  }
}
