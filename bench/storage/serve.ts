/**
 * The storage-to-s3 function alone in its own process, built exactly like its entrypoint, so the
 * benchmark can read this process's peak RSS and CPU: `deno run -A serve.ts <port>` with the
 * function's environment. Prints "ready" once listening.
 *
 * It also samples the isolate's memory (V8 heap used + external, i.e. ArrayBuffers) every 10 ms,
 * which is what an Edge isolate's 256 MB limit is about (process RSS also counts the runtime
 * and freed-but-retained pages); `GET /__bench/memory` returns the peaks and resets them.
 */
import { loadStorageConfig } from "../../shared/config/mod.ts";
import { createStorageApp } from "../../shared/storage/app.ts";

const port = Number(Deno.args[0] ?? 0);
const app = createStorageApp(loadStorageConfig(Deno.env.toObject()), { logSink: () => {} });
const MiB = 1024 * 1024;
let peakIsolate = 0;
let peakHeap = 0;
setInterval(() => {
  const m = Deno.memoryUsage();
  peakIsolate = Math.max(peakIsolate, m.heapUsed + m.external);
  peakHeap = Math.max(peakHeap, m.heapUsed);
}, 10);
Deno.serve({ hostname: "127.0.0.1", port, onListen: () => console.log("ready") }, (req) => {
  if (new URL(req.url).pathname === "/__bench/memory") {
    const body = { isolate_mib: peakIsolate / MiB, heap_mib: peakHeap / MiB };
    const now = Deno.memoryUsage();
    peakIsolate = now.heapUsed + now.external;
    peakHeap = now.heapUsed;
    return Response.json(body);
  }
  return app.fetch(req);
});
