/**
 * A worker process for the crash tests: runs one chunk of a job through the function's own app
 * (`POST /storage-to-s3/jobs/{id}/run`) and SIGKILLs itself at the Nth named point of the copy
 * (leases, source chunks, PUTs, parts, completes, manifest writes). No cleanup runs: sockets
 * drop, the Postgres session ends and its open transaction rolls back, exactly as when the Edge
 * runtime kills an invocation.
 *
 *   CRASH_CONFIG='{"env": {...}, "jobId": 1, "killAt": 17, "run": {...}}' deno run -A crash_worker.ts
 *
 * Prints one JSON line when it was not killed: {"status", "points", "body"}.
 */
import { type Env, loadStorageConfig } from "../../../shared/config/mod.ts";
import { createStorageApp } from "../../../shared/storage/app.ts";
import type { HookPoint } from "../../../shared/storage/copier.ts";

interface CrashConfig {
  env: Env;
  jobId: number;
  /** Kill at this point (1-based); 0 never. */
  killAt: number;
  run: Record<string, unknown>;
}

const cfg: CrashConfig = JSON.parse(Deno.env.get("CRASH_CONFIG") ?? "{}");
let points = 0;
const seen: HookPoint[] = [];
const app = createStorageApp(loadStorageConfig(cfg.env), {
  logSink: () => {},
  hooks: {
    point(name) {
      points++;
      seen.push(name);
      if (points === cfg.killAt) {
        console.error(`killing at point ${points}: ${name}`);
        Deno.kill(Deno.pid, "SIGKILL");
      }
    },
  },
});
const res = await app.request(`/storage-to-s3/jobs/${cfg.jobId}/run`, {
  method: "POST",
  headers: {
    authorization: `Bearer ${cfg.env.TOOLKIT_API_TOKEN}`,
    "content-type": "application/json",
  },
  body: JSON.stringify(cfg.run),
});
const body = await res.json();
await app.close();
console.log(JSON.stringify({ status: res.status, points, kinds: [...new Set(seen)], body }));
// Idle keep-alive sockets of the S3 client's agent would keep the process up for seconds.
Deno.exit(0);
