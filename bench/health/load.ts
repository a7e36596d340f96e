/**
 * Open-loop load generator (run as its own process, so the load does not share an event loop
 * with the function under test): fires GETs at a fixed rate across the given URLs for a duration
 * and prints one JSON line with every latency and status.
 *
 *   deno run -A bench/health/load.ts '{"urls":[...],"rate":200,"seconds":20,"token":"..."}'
 */
const { urls, rate, seconds, token } = JSON.parse(Deno.args[0]) as {
  urls: string[];
  rate: number;
  seconds: number;
  token: string;
};
const latencies: number[] = [];
const statuses: Record<string, number> = {};
const total = rate * seconds;
const interval = 1000 / rate;
const started = performance.now();
const inflight: Promise<void>[] = [];
let lateStarts = 0;
for (let i = 0; i < total; i++) {
  const due = started + i * interval;
  const wait = due - performance.now();
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  else if (wait < -interval) lateStarts++;
  const url = urls[i % urls.length];
  inflight.push((async () => {
    const t = performance.now();
    try {
      const res = await fetch(url, { headers: { authorization: `Bearer ${token}` } });
      await res.arrayBuffer();
      statuses[res.status] = (statuses[res.status] ?? 0) + 1;
    } catch {
      statuses.error = (statuses.error ?? 0) + 1;
    }
    latencies.push(performance.now() - t);
  })());
}
await Promise.all(inflight);
const elapsed = (performance.now() - started) / 1000;
console.log(JSON.stringify({ latencies, statuses, elapsed, lateStarts, sent: total }));
