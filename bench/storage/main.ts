/**
 * Storage -> S3 against rclone, on the same machine, the same s3rver and the same source data.
 *
 *   ./toolkit bench storage        (or: deno task bench:storage)
 *
 * Corpora (seeded once into the Storage stand-in: files + storage.objects rows):
 *   small: BENCH_SMALL objects (default 10,000) of 1-64 KiB
 *   large: BENCH_LARGE objects (default 4) of BENCH_LARGE_MIB (default 256) MiB
 *
 * Ours: the storage-to-s3 function in its own process (bench/storage/serve.ts), driven like pg_cron
 * would, back to back: POST /jobs, then POST /jobs/{id}/run until nothing remains, with the
 * shipped defaults (per invocation 60 s wall, 256 MiB, 1,500 ms CPU; 32 objects at once, 4 of
 * them multipart, 8 MiB parts); source = the stand-in over HTTP (Range, auth, per-object DB
 * lookup), destination = s3rver. BENCH_SMALL_CONCURRENCY (default 32) sets the objects at once of
 * both tools on the small corpus.
 * rclone (Debian 1.60): `rclone copy --checksum` from the stand-in's own files on local disk
 * (hard links laid out as <bucket>/<name>) into the same s3rver bucket — no HTTP hop on its
 * source side, so the comparison favours rclone — and `rclone copy` reading the stand-in over
 * HTTP. Small: --transfers N --checkers N; large: --transfers 4 --s3-upload-concurrency 4
 * --s3-chunk-size 8M.
 * Each round runs ours then rclone (then the reverse order in the next round), on fresh prefixes.
 */
import { withStack } from "../../tests/harness/mod.ts";
import type { SeedObject } from "../../tests/harness/storage.ts";
import { fmt, printTable } from "../lib/stats.ts";

const MiB = 1024 * 1024;
const SMALL = Number(Deno.env.get("BENCH_SMALL") ?? 10_000);
const LARGE = Number(Deno.env.get("BENCH_LARGE") ?? 4);
const LARGE_MIB = Number(Deno.env.get("BENCH_LARGE_MIB") ?? 256);
const ROUNDS = Number(Deno.env.get("BENCH_ROUNDS") ?? 2);
const SMALL_CONCURRENCY = Number(Deno.env.get("BENCH_SMALL_CONCURRENCY") ?? 32);
/** BENCH_BUDGET=unbounded: no CPU/byte budget per invocation (self-hosted); default: the shipped one. */
const UNBUDGETED = Deno.env.get("BENCH_BUDGET") === "unbounded";

interface Measure {
  corpus: "small" | "large";
  tool: "ours" | "rclone" | "rclone-http";
  wallMs: number;
  verifyMs?: number;
  objects: number;
  bytes: number;
  peakRssMiB: number;
  baseRssMiB?: number;
  /** Peak V8 heap used + external (ArrayBuffers) of the function's isolate. */
  peakIsolateMiB?: number;
  processCpuMs: number;
  budgetCpuMs?: number;
  invocations?: number;
  maxChunkCpuMs?: number;
}

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** utime + stime of a process (all threads), ms. */
async function processCpuMs(pid: number): Promise<number> {
  const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) * 10;
}

async function vm(pid: number, field: "VmHWM" | "VmRSS"): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status);
  return m ? Number(m[1]) / 1024 : NaN;
}

await withStack(
  { name: "bench-storage", primary: true, migrate: true, s3: true, storage: true },
  async (stack) => {
    stack.stopOnSignals();
    const st = stack.storage!;
    const s3 = stack.s3!;
    const t0 = performance.now();
    await st.createBucket("small");
    await st.createBucket("large");
    const rand = rng(7);
    const small: SeedObject[] = Array.from({ length: SMALL }, (_, i) => ({
      bucket: "small",
      name: `dir${i % 50}/obj-${String(i).padStart(5, "0")}.bin`,
      size: 1024 + Math.floor(rand() * 63 * 1024),
    }));
    const large: SeedObject[] = Array.from({ length: LARGE }, (_, i) => ({
      bucket: "large",
      name: `blob-${i}.bin`,
      size: LARGE_MIB * MiB,
    }));
    const seeded = [
      ...await st.seed(small, { concurrency: 16 }),
      ...await st.seed(large, { concurrency: 2 }),
    ];
    const bytesOf = (bucket: string) =>
      seeded.filter((o) => o.bucket === bucket).reduce((n, o) => n + o.size, 0);
    // rclone's source: the very same files, hard-linked as <bucket>/<name>.
    const src = `${stack.dir}/rclone-src`;
    for (const o of seeded) {
      const path = `${src}/${o.bucket}/${o.name}`;
      await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
      await Deno.link(o.path, path);
    }
    console.error(
      `seeded ${SMALL} small (${
        fmt(bytesOf("small") / MiB, 1)
      } MiB) and ${LARGE} x ${LARGE_MIB} MiB in ${fmt((performance.now() - t0) / 1000, 1)} s`,
    );

    // Our function in its own process.
    const port = 20000 + Math.floor(Math.random() * 20000);
    const server = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "--quiet",
        // BENCH_PROF=<file>: a V8 tick log of the function process (`node --prof-process <file>`).
        ...(Deno.env.get("BENCH_PROF")
          ? [`--v8-flags=--prof,--no-logfile-per-isolate,--logfile=${Deno.env.get("BENCH_PROF")}`]
          : []),
        new URL("./serve.ts", import.meta.url).pathname,
        String(port),
      ],
      env: stack.env() as Record<string, string>,
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const reader = server.stdout.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error("the function process exited before listening");
      if (value.includes("ready")) break;
    }
    reader.releaseLock();
    void server.stdout.cancel().catch(() => {});
    const base = `http://127.0.0.1:${port}/storage-to-s3`;
    const headers = {
      authorization: `Bearer ${stack.tokens.api}`,
      "content-type": "application/json",
    };
    const post = async (path: string, body: unknown = {}) => {
      const res = await fetch(`${base}${path}`, {
        method: "POST",
        headers,
        body: JSON.stringify(body),
      });
      const json = await res.json();
      if (!res.ok) throw new Error(`${path}: ${res.status} ${JSON.stringify(json)}`);
      return json;
    };
    const baseRss = await vm(server.pid, "VmRSS");

    const ours = async (corpus: "small" | "large", round: number): Promise<Measure> => {
      const run = {
        ...(corpus === "small" ? { concurrency: SMALL_CONCURRENCY } : {}),
        ...(UNBUDGETED
          ? { max_cpu_ms: 600_000, max_bytes: 1024 * 1024 * MiB, max_seconds: 300 }
          : {}),
      };
      await fetch(`http://127.0.0.1:${port}/__bench/memory`).then((r) => r.body?.cancel());
      const cpu0 = await processCpuMs(server.pid);
      const start = performance.now();
      const created = await post("/jobs", { buckets: [corpus], s3_prefix: `ours/${round}/` });
      let invocations = 0;
      let budgetCpu = 0;
      let maxChunkCpu = 0;
      // The memory endpoint resets its peaks when read: keep the highest of every read.
      let peakIsolate = 0;
      for (;;) {
        const sent = performance.now();
        const r = await post(`/jobs/${created.job_id}/run`, run);
        invocations++;
        if (Deno.env.get("BENCH_VERBOSE")) {
          // BENCH_VERBOSE=1: one line per invocation (where a run's wall time goes).
          const c = r.chunk;
          const m = await (await fetch(`http://127.0.0.1:${port}/__bench/memory`)).json();
          peakIsolate = Math.max(peakIsolate, m.isolate_mib);
          console.error(
            `  #${invocations} ${
              fmt(performance.now() - sent, 0)
            } ms (in chunk ${c.elapsed_ms}), cpu ${c.cpu_ms} ms, ${
              fmt(c.bytes_copied / MiB, 0)
            } MiB, ${c.objects_copied} objects, ${c.stop_reason}; peak isolate ${
              fmt(m.isolate_mib, 0)
            } MiB (heap ${fmt(m.heap_mib, 0)})`,
          );
        }
        budgetCpu += r.chunk.cpu_ms;
        maxChunkCpu = Math.max(maxChunkCpu, r.chunk.cpu_ms);
        if (r.progress.objects.remaining === 0) {
          if (r.progress.objects.failed !== 0) throw new Error(JSON.stringify(r.progress.failures));
          break;
        }
      }
      const wallMs = performance.now() - start;
      const cpu1 = await processCpuMs(server.pid);
      const memory = await (await fetch(`http://127.0.0.1:${port}/__bench/memory`)).json();
      const v0 = performance.now();
      for (;;) {
        const v = await post(`/jobs/${created.job_id}/verify`, { concurrency: 16 });
        if (v.complete) {
          if (!v.all_verified) throw new Error(`verify failed: ${JSON.stringify(v)}`);
          break;
        }
      }
      return {
        corpus,
        tool: "ours",
        wallMs,
        verifyMs: performance.now() - v0,
        objects: corpus === "small" ? SMALL : LARGE,
        bytes: bytesOf(corpus),
        peakRssMiB: await vm(server.pid, "VmHWM"),
        baseRssMiB: baseRss,
        peakIsolateMiB: Math.max(peakIsolate, memory.isolate_mib),
        processCpuMs: cpu1 - cpu0,
        budgetCpuMs: budgetCpu,
        invocations,
        maxChunkCpuMs: maxChunkCpu,
      };
    };

    const rclone = async (
      corpus: "small" | "large",
      round: number,
      source: "disk" | "http",
    ): Promise<Measure> => {
      const flags = corpus === "small"
        ? ["--transfers", String(SMALL_CONCURRENCY), "--checkers", String(SMALL_CONCURRENCY)]
        : ["--transfers", "4", "--s3-upload-concurrency", "4", "--s3-chunk-size", "8M"];
      const from = source === "disk" ? [`${src}/${corpus}`, "--checksum"] : [
        `:http:${corpus}/`,
        "--http-url",
        `${st.origin}/rclone/`,
        "--http-headers",
        `Authorization,Bearer ${stack.tokens.serviceRole}`,
        "--http-no-head",
      ];
      const start = performance.now();
      const child = new Deno.Command("rclone", {
        args: [
          "copy",
          ...from,
          `dest:${s3.buckets[0]}/rclone-${source}/${round}/${corpus}`,
          "--s3-no-check-bucket",
          ...flags,
        ],
        // A clean environment: an inherited AWS_CA_BUNDLE breaks rclone's plain-HTTP transport.
        clearEnv: true,
        env: {
          PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
          HOME: Deno.env.get("HOME") ?? "/tmp",
          RCLONE_CONFIG_DEST_TYPE: "s3",
          RCLONE_CONFIG_DEST_PROVIDER: "Other",
          RCLONE_CONFIG_DEST_ENDPOINT: s3.endpoint,
          RCLONE_CONFIG_DEST_ACCESS_KEY_ID: s3.accessKeyId,
          RCLONE_CONFIG_DEST_SECRET_ACCESS_KEY: s3.secretAccessKey,
          RCLONE_CONFIG_DEST_REGION: s3.region,
          RCLONE_CONFIG_DEST_FORCE_PATH_STYLE: "true",
        },
        stdout: "null",
        stderr: "piped",
      }).spawn();
      let peak = 0;
      let cpu = 0;
      const poll = setInterval(async () => {
        try {
          peak = Math.max(peak, await vm(child.pid, "VmHWM"));
          cpu = await processCpuMs(child.pid);
        } catch {
          // exited
        }
      }, 50);
      const out = await child.output();
      clearInterval(poll);
      if (!out.success) throw new Error(`rclone failed: ${new TextDecoder().decode(out.stderr)}`);
      return {
        corpus,
        tool: source === "disk" ? "rclone" : "rclone-http",
        wallMs: performance.now() - start,
        objects: corpus === "small" ? SMALL : LARGE,
        bytes: bytesOf(corpus),
        peakRssMiB: peak,
        processCpuMs: cpu,
      };
    };

    const results: Measure[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      for (const corpus of ["small", "large"] as const) {
        if ((corpus === "small" ? SMALL : LARGE) === 0) continue;
        const tools = [
          (c: typeof corpus, r: number) => ours(c, r),
          (c: typeof corpus, r: number) => rclone(c, r, "disk"),
          (c: typeof corpus, r: number) => rclone(c, r, "http"),
        ];
        const order = round % 2 === 0 ? tools : [...tools].reverse();
        for (const fn of order) {
          const m = await fn(corpus, round);
          results.push(m);
          console.error(`${corpus} ${m.tool} round ${round}: ${fmt(m.wallMs / 1000, 2)} s`);
        }
      }
    }
    server.kill("SIGTERM");
    await server.status;

    const rows: (string | number)[][] = [];
    for (const corpus of ["small", "large"] as const) {
      if ((corpus === "small" ? SMALL : LARGE) === 0) continue;
      const o = results.filter((m) => m.corpus === corpus && m.tool === "ours");
      const r = results.filter((m) => m.corpus === corpus && m.tool === "rclone");
      const rh = results.filter((m) => m.corpus === corpus && m.tool === "rclone-http");
      const mean = (ms: Measure[], f: (m: Measure) => number) =>
        ms.reduce((n, m) => n + f(m), 0) / ms.length;
      const ratio = mean(o, (m) => m.wallMs) / mean(r, (m) => m.wallMs);
      const ratioHttp = mean(o, (m) => m.wallMs) / mean(rh, (m) => m.wallMs);
      for (const [tool, ms] of [["ours", o], ["rclone", r], ["rclone-http", rh]] as const) {
        const wall = mean(ms, (m) => m.wallMs) / 1000;
        const objects = ms[0].objects;
        const mib = ms[0].bytes / MiB;
        const cpu = mean(ms, (m) => m.budgetCpuMs ?? m.processCpuMs);
        rows.push([
          `${corpus} (${objects} objects, ${fmt(mib, 0)} MiB)`,
          tool,
          fmt(wall, 2),
          tool === "ours" ? `${fmt(ratio, 2)} / ${fmt(ratioHttp, 2)}` : "-",
          fmt(objects / wall, 0),
          fmt(mib / wall, 1),
          fmt(Math.max(...ms.map((m) => m.peakRssMiB)), 0),
          tool === "ours" ? fmt(Math.max(...ms.map((m) => m.peakIsolateMiB!)), 0) : "-",
          fmt(mean(ms, (m) => m.processCpuMs) / objects, 2),
          fmt(mean(ms, (m) => m.processCpuMs) / mib, 2),
          tool === "ours" ? fmt(cpu / objects, 2) : "-",
          tool === "ours" ? fmt(cpu / mib, 2) : "-",
          tool === "ours" ? fmt(mean(ms, (m) => m.invocations!), 1) : "-",
          tool === "ours" ? fmt(Math.max(...ms.map((m) => m.maxChunkCpuMs!)), 0) : "-",
          tool === "ours" ? fmt(mean(ms, (m) => m.verifyMs!) / 1000, 2) : "-",
        ]);
      }
    }
    console.log(
      `\nStorage -> S3, ${ROUNDS} round(s), budget per invocation: ${
        UNBUDGETED ? "unbounded" : "default (60 s, 256 MiB, 1500 ms CPU)"
      }, ${Deno.build.os}/${Deno.build.arch}, ${navigator.hardwareConcurrency} cores; function process RSS at start ${
        fmt(baseRss, 0)
      } MiB\n`,
    );
    printTable([
      "corpus",
      "tool",
      "wall s",
      "ours / rclone (disk / http)",
      "objects/s",
      "MiB/s",
      "peak RSS MiB",
      "peak isolate heap+external MiB",
      "process CPU ms/object",
      "process CPU ms/MiB",
      "budgeted CPU ms/object",
      "budgeted CPU ms/MiB",
      "invocations",
      "max CPU ms in one invocation",
      "verify s",
    ], rows);
  },
);
