/**
 * One time-boxed chunk of a job: lease objects, copy them Storage -> S3 until the wall, byte or
 * CPU budget is spent, record every step, release what was not started.
 *
 * Objects up to the part size are read into one buffer of exactly their size, hashed (SHA-256,
 * MD5) and sent in one PutObject. Larger objects go part by part through a multipart upload
 * whose id, parts and checksums are stored as they complete; each part is fetched with its own
 * ranged GET, up to PART_WINDOW parts of one object are in memory (being read, waiting to be
 * hashed in order, or uploading), and a byte semaphore caps the buffers of the whole chunk.
 *
 * An object that fits what is left of the budget is hashed natively. One that does not is hashed
 * with the resumable hashes and its hash state is stored with every contiguous part, so the next
 * invocation continues the same upload from that byte with a Range request and the same
 * whole-object SHA-256 / MD5. Where the source eTag is a plain MD5 it must equal the MD5 of the
 * bytes read, else nothing becomes visible at the destination (the PUT is not sent, the
 * multipart upload is not completed).
 */
import { createHash } from "node:crypto";
import type { Sql } from "../db/mod.ts";
import type { Logger } from "../http/logger.ts";
import {
  ChunkBudget,
  type CpuMeter,
  ESTIMATED_CPU_MS_PER_MIB_NATIVE,
  ESTIMATED_CPU_MS_PER_MIB_RESUMABLE,
  type StopReason,
} from "./budget.ts";
import { CopyError, errorText, isAbortError } from "./errors.ts";
import {
  canRestore,
  hexToBase64,
  multipartEtag,
  nativeHash,
  ResumableHash,
  type StreamHash,
} from "./hashing.ts";
import * as jobs from "./jobs.ts";
import { buildMetadata, systemHeader } from "./metadata.ts";
import type { S3Sink } from "./sink.ts";
import type { SourceReader, StorageSource } from "./source.ts";

const MiB = 1024 * 1024;
/** Parts of one object in memory at once: being read (ranged GETs), waiting, or uploading. */
export const PART_WINDOW = 4;
/** S3: parts are 5 MiB to 5 GiB, at most 10,000 per upload. */
export const MIN_PART_SIZE = 5 * MiB;
export const MAX_PARTS = 10_000;
/** Bytes of object data a chunk buffers at once (never less than one part). */
export const MEMORY_BUDGET = 32 * MiB;

/** Named points in the copy; the crash tests kill the process at a seeded one. */
export type HookPoint =
  | "leased"
  | "object_start"
  | "source_chunk"
  | "before_put"
  | "after_put"
  | "before_create_upload"
  | "after_create_upload"
  | "part_read"
  | "before_upload_part"
  | "after_upload_part"
  | "after_record_part"
  | "before_complete"
  | "after_complete"
  | "before_record_copied"
  | "after_record_copied";

export interface CopyHooks {
  point(name: HookPoint): void;
}

export interface RunLimits {
  maxSeconds: number;
  maxBytes: number;
  maxCpuMs: number;
  concurrency: number;
  /** Multipart objects in flight at once (each with up to PART_WINDOW parts); the other
   * workers keep copying small objects meanwhile. */
  multipartConcurrency: number;
  partSize: number;
  leaseSeconds: number;
  retryDelaySeconds: number;
  maxAttempts: number;
}

export const DEFAULT_LIMITS: RunLimits = {
  maxSeconds: 60,
  maxBytes: 256 * MiB,
  maxCpuMs: 1500,
  concurrency: 32,
  multipartConcurrency: 4,
  partSize: 8 * MiB,
  leaseSeconds: 180,
  retryDelaySeconds: 30,
  maxAttempts: 8,
};

export interface ChunkDeps {
  sql: Sql;
  source: StorageSource;
  sink: S3Sink;
  log: Logger;
  clock?: () => number;
  cpu: CpuMeter;
  hooks?: CopyHooks;
}

export interface ChunkResult {
  stop_reason: StopReason;
  objects_copied: number;
  bytes_copied: number;
  objects_failed: number;
  objects_retrying: number;
  objects_partial: number;
  elapsed_ms: number;
  cpu_ms: number;
  cpu_measured: boolean;
  source_resumes: number;
  /** Set when a dependency stopped the chunk (the route answers 503 with it). */
  unavailable?: { dependency: "storage" | "s3" | "database"; code: string; message: string };
}

/** Part size for an object: the asked size, grown so the object needs at most 10,000 parts. */
export function choosePartSize(size: number, base: number): number {
  const needed = Math.ceil(size / MAX_PARTS / MiB) * MiB;
  return Math.max(base, MIN_PART_SIZE, needed);
}

function isPlainMd5(etag: string | null): string | undefined {
  const v = etag?.replaceAll('"', "").trim().toLowerCase();
  return v && /^[0-9a-f]{32}$/.test(v) ? v : undefined;
}

/** Caps the bytes buffered by the whole chunk; waiters are served in order. */
export class ByteSemaphore {
  readonly capacity: number;
  #free: number;
  #waiters: { n: number; resolve: () => void }[] = [];

  constructor(capacity: number) {
    this.capacity = capacity;
    this.#free = capacity;
  }

  async acquire(n: number): Promise<void> {
    const want = Math.min(n, this.capacity);
    if (this.#waiters.length === 0 && this.#free >= want) {
      this.#free -= want;
      return;
    }
    await new Promise<void>((resolve) => this.#waiters.push({ n: want, resolve }));
  }

  release(n: number): void {
    this.#free += Math.min(n, this.capacity);
    while (this.#waiters.length && this.#free >= this.#waiters[0].n) {
      const w = this.#waiters.shift()!;
      this.#free -= w.n;
      w.resolve();
    }
  }
}

/**
 * Part buffers of one chunk, reused from part to part: no zero-filled allocation per part, and
 * the isolate's memory stays near what the byte semaphore admits instead of growing with garbage
 * until the next collection. Only buffers of the chunk's part size are kept (other sizes, such as
 * an object's short last part, are allocated and dropped), at most `capacity` bytes of them.
 */
export class BufferPool {
  readonly capacity: number;
  readonly size: number;
  #free: Uint8Array[] = [];

  constructor(capacity: number, size: number) {
    this.capacity = capacity;
    this.size = size;
  }

  /** A buffer of exactly `length` bytes (contents undefined). */
  take(length: number): Uint8Array {
    return (length === this.size ? this.#free.pop() : undefined) ?? new Uint8Array(length);
  }

  /** Returns a buffer from `take`; the caller must not use it afterwards. */
  give(buf: Uint8Array): void {
    if (
      buf.byteLength === this.size && buf.byteOffset === 0 &&
      buf.buffer.byteLength === this.size && (this.#free.length + 1) * this.size <= this.capacity
    ) this.#free.push(buf);
  }
}

type Outcome =
  | { kind: "copied"; record: jobs.CopiedRecord; bytes: number }
  | { kind: "partial"; bytes: number }
  | { kind: "lost_lease" };

interface Ctx {
  deps: ChunkDeps;
  job: jobs.Job;
  limits: RunLimits;
  budget: ChunkBudget;
  worker: string;
  memory: ByteSemaphore;
  pool: BufferPool;
  signal: AbortSignal;
  hook: (p: HookPoint) => void;
  stats: { resumes: number };
}

/** Batches "copied" records: one UPDATE per 64 objects or 250 ms. */
class CopiedRecorder {
  #pending: jobs.CopiedRecord[] = [];
  #flushing: Promise<void> = Promise.resolve();
  #timer?: number;
  #error?: unknown;
  confirmed = 0;

  constructor(private sql: Sql, private worker: string, private hook: (p: HookPoint) => void) {}

  add(r: jobs.CopiedRecord): void {
    this.#pending.push(r);
    if (this.#pending.length >= 64) void this.flush();
    else this.#timer ??= setTimeout(() => void this.flush(), 250);
  }

  flush(): Promise<void> {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const batch = this.#pending.splice(0);
    this.#flushing = this.#flushing.then(async () => {
      if (batch.length === 0) return;
      try {
        this.hook("before_record_copied");
        const ids = await jobs.db(() => jobs.recordCopied(this.sql, this.worker, batch));
        this.confirmed += ids.length;
        this.hook("after_record_copied");
      } catch (e) {
        this.#error ??= e;
      }
    });
    return this.#flushing;
  }

  async close(): Promise<void> {
    await this.flush();
    if (this.#error) throw this.#error;
  }

  get error(): unknown {
    return this.#error;
  }
}

/** Runs one chunk of a (non dry-run, snapshotted) job. Never throws for object-level errors. */
export async function copyChunk(
  deps: ChunkDeps,
  job: jobs.Job,
  limits: RunLimits,
): Promise<ChunkResult> {
  const clock = deps.clock ?? (() => performance.now());
  const budget = new ChunkBudget(limits, clock, deps.cpu);
  const worker = crypto.randomUUID();
  const abort = new AbortController();
  const hook = (p: HookPoint) => deps.hooks?.point(p);
  // Part buffers of the whole chunk. fetch copies every request body and the copies live until a
  // later collection, so the isolate holds several times this: with 48 MiB the benchmark's large
  // corpus peaked at 258 MiB of heap + ArrayBuffers (over the Edge's 256 MB), with 32 MiB at 186.
  const memory = new ByteSemaphore(Math.max(MEMORY_BUDGET, choosePartSize(0, limits.partSize)));
  const ctx: Ctx = {
    deps,
    job,
    limits,
    budget,
    worker,
    memory,
    pool: new BufferPool(memory.capacity, choosePartSize(0, limits.partSize)),
    signal: abort.signal,
    hook,
    stats: { resumes: 0 },
  };
  const { sql, log } = deps;
  const recorder = new CopiedRecorder(sql, worker, hook);
  const result: ChunkResult = {
    stop_reason: "done",
    objects_copied: 0,
    bytes_copied: 0,
    objects_failed: 0,
    objects_retrying: 0,
    objects_partial: 0,
    elapsed_ms: 0,
    cpu_ms: 0,
    cpu_measured: false,
    source_resumes: 0,
  };
  let stop: StopReason | undefined;
  let fatal: unknown;
  const stopAll = (reason: StopReason, error?: unknown) => {
    stop ??= reason;
    if (error !== undefined) fatal ??= error;
    abort.abort();
  };

  await jobs.db(() => jobs.markStarted(sql, job.id));
  const runId = await jobs.db(() => jobs.startRun(sql, job.id, "copy", worker));

  const queue: jobs.ManifestRow[] = [];
  const leasedIds = new Set<number>();
  let exhausted = false;
  let leasing: Promise<void> | undefined;
  const batchSize = Math.min(256, Math.max(16, limits.concurrency * 4));

  // Multipart objects hold up to PART_WINDOW part buffers each: at most multipartConcurrency of
  // them run at once, while the other workers take the small objects of the queue.
  let multipartActive = 0;
  const slotWaiters: (() => void)[] = [];
  const isMultipart = (row: jobs.ManifestRow) => !isSinglePut(row, partSizeOf(row, limits));
  const multipartDone = () => {
    multipartActive--;
    slotWaiters.shift()?.();
  };

  const next = async (): Promise<Planned | undefined> => {
    for (;;) {
      if (stop) return undefined;
      const reason = budget.exhausted();
      if (reason) {
        stop = reason;
        return undefined;
      }
      const slot = multipartActive < limits.multipartConcurrency;
      const at = slot ? (queue.length ? 0 : -1) : queue.findIndex((r) => !isMultipart(r));
      if (at >= 0) {
        const [row] = queue.splice(at, 1);
        if (isMultipart(row)) multipartActive++;
        // Planned (and its bytes reserved) before any other worker looks at the budget again.
        return planObject(ctx, row);
      }
      if (queue.length && (exhausted || queue.length >= 2 * batchSize)) {
        // Only multipart objects are queued and every slot is taken: wait for one.
        await new Promise<void>((resolve) => slotWaiters.push(resolve));
        continue;
      }
      // An empty queue, or one of multipart objects only: lease more (small objects may follow).
      if (exhausted) return undefined;
      leasing ??= (async () => {
        try {
          const rows = await jobs.db(() =>
            jobs.lease(sql, job.id, worker, batchSize, limits.leaseSeconds)
          );
          if (rows.length === 0) exhausted = true;
          for (const r of rows) leasedIds.add(r.id);
          queue.push(...rows);
          // Workers waiting for a multipart slot may find small objects among the new rows.
          if (rows.length) slotWaiters.splice(0).forEach((wake) => wake());
          if (rows.length) hook("leased");
        } catch (e) {
          stopAll("database_unavailable", e);
        } finally {
          leasing = undefined;
        }
      })();
      await leasing;
    }
  };

  const handle = async (planned: Planned) => {
    const row = planned.row;
    if (row.attempts > limits.maxAttempts) {
      await jobs.db(() =>
        jobs.recordFailure(sql, worker, row.id, {
          code: "too_many_attempts",
          message:
            `Gave up after ${limits.maxAttempts} attempts (each ended without finishing the copy).`,
          permanent: true,
          retryInSeconds: 0,
        })
      );
      leasedIds.delete(row.id);
      result.objects_failed++;
      return;
    }
    budget.addObject();
    try {
      const outcome = await copyObject(ctx, planned);
      leasedIds.delete(row.id);
      if (outcome.kind === "copied") {
        recorder.add(outcome.record);
        result.objects_copied++;
        result.bytes_copied += outcome.bytes;
      } else if (outcome.kind === "partial") {
        result.objects_partial++;
        result.bytes_copied += outcome.bytes;
        // Progress was made and saved: not a failed attempt.
        await jobs.db(() => jobs.release(sql, worker, [row.id], true));
      }
    } catch (e) {
      if (e instanceof jobs.DatabaseUnavailable) {
        stopAll("database_unavailable", e);
        return;
      }
      const err = e instanceof CopyError
        ? e
        : isAbortError(e) && abort.signal.aborted
        ? new CopyError("interrupted", "The chunk was stopped.", true, "interrupted")
        : new CopyError("unexpected", errorText(e), true);
      if (err.code === "unexpected") log.error("copy_unexpected_error", { error: e });
      if (err.scope === "storage" || err.scope === "s3") {
        stopAll("dependency_unavailable", err);
        return; // released as unstarted below
      }
      if (err.scope === "interrupted") return; // released below
      leasedIds.delete(row.id);
      const permanent = !err.transient || row.attempts >= limits.maxAttempts;
      const delay = limits.retryDelaySeconds * 2 ** Math.min(row.attempts - 1, 10) *
        (0.75 + Math.random() * 0.5);
      try {
        await jobs.db(() =>
          jobs.recordFailure(sql, worker, row.id, {
            code: err.code,
            message: err.message,
            permanent,
            retryInSeconds: Math.min(delay, 3600),
          })
        );
      } catch (dbErr) {
        stopAll("database_unavailable", dbErr);
        return;
      }
      if (permanent) result.objects_failed++;
      else result.objects_retrying++;
      log.warn("object_failed", {
        job_id: job.id,
        object: row.id,
        code: err.code,
        permanent,
        attempts: row.attempts,
      });
    }
  };

  const workers = Array.from({ length: limits.concurrency }, async () => {
    for (let row = await next(); row; row = await next()) {
      try {
        await handle(row);
      } catch (e) {
        // Only the manifest writes outside handle's own catch can get here.
        stopAll("database_unavailable", e);
      } finally {
        if (row.mode !== "single") multipartDone();
      }
    }
    // A worker that ends frees nothing, but waiters must see the stop (or the empty queue).
    slotWaiters.splice(0).forEach((wake) => wake());
  });
  await Promise.all(workers);
  try {
    await recorder.close();
  } catch (e) {
    stopAll("database_unavailable", e);
  }
  result.stop_reason = stop ?? (exhausted ? "no_leasable_work" : "done");
  if (queue.length || leasedIds.size) {
    // Unstarted, or interrupted by a dependency outage: not the object's fault.
    const ids = [...new Set([...queue.map((r) => r.id), ...leasedIds])];
    await jobs.db(() => jobs.release(sql, worker, ids, true)).catch(() => {});
  }
  result.elapsed_ms = Math.round(budget.elapsedMs());
  result.cpu_ms = budget.finalCpuMs();
  result.cpu_measured = budget.cpuMeasured;
  result.source_resumes = ctx.stats.resumes;
  if (fatal instanceof CopyError && (fatal.scope === "storage" || fatal.scope === "s3")) {
    result.unavailable = { dependency: fatal.scope, code: fatal.code, message: fatal.message };
  } else if (fatal !== undefined) {
    result.unavailable = {
      dependency: "database",
      code: "database_unavailable",
      message: "The database cannot be reached right now.",
    };
  }
  if (result.stop_reason === "no_leasable_work" && !result.unavailable) {
    result.stop_reason = "done";
  }
  if (result.unavailable?.dependency !== "database") {
    await jobs.db(() =>
      jobs.endRun(sql, runId, {
        objectsCopied: result.objects_copied,
        bytesCopied: result.bytes_copied,
        objectsFailed: result.objects_failed,
        objectsRetrying: result.objects_retrying,
        cpuMs: result.cpu_ms,
        stopReason: result.stop_reason,
      })
    );
    await jobs.db(() => jobs.refreshStatus(sql, job.id));
  }
  log.info("chunk_done", { job_id: job.id, ...result });
  return result;
}

/**
 * How an object will be copied in this chunk, decided when a worker takes it, and its bytes
 * reserved in the budget at that moment (so concurrent workers cannot all start past it):
 * `single` (one PUT), `one_go` (a multipart upload finished in this chunk, native hashes),
 * `resume` (continue a stored hash state) or `resumable` (may outlive this chunk: resumable
 * hashes, part by part).
 */
interface Planned {
  row: jobs.ManifestRow;
  partSize: number;
  mode: "single" | "one_go" | "resume" | "resumable";
}

function canResume(row: jobs.ManifestRow, partSize: number): boolean {
  const state = row.resume_state;
  return !!(row.upload_id && state && row.bytes_done > 0 && row.bytes_done < row.size &&
    row.bytes_done % partSize === 0 && canRestore(state.sha256) &&
    (!isPlainMd5(row.source_etag) || canRestore(state.md5)));
}

/** The part size an object is (or will be) uploaded with. */
function partSizeOf(row: jobs.ManifestRow, limits: RunLimits): number {
  return row.part_size ?? choosePartSize(row.size, limits.partSize);
}

/** One PutObject: fits one part and no multipart upload was ever started for it. */
function isSinglePut(row: jobs.ManifestRow, partSize: number): boolean {
  return row.size <= partSize && !row.upload_id;
}

function planObject(ctx: Ctx, row: jobs.ManifestRow): Planned {
  const { budget } = ctx;
  const partSize = partSizeOf(row, ctx.limits);
  if (isSinglePut(row, partSize)) {
    budget.addBytes(row.size);
    return { row, partSize, mode: "single" };
  }
  if (canResume(row, partSize)) {
    budget.addBytes(Math.min(partSize, row.size - row.bytes_done), true);
    return { row, partSize, mode: "resume" };
  }
  // Resumable hashing costs more CPU; use it only when the object may outlive this chunk (or
  // already failed to finish in one).
  const cpuNeeded = (row.size / MiB) * ESTIMATED_CPU_MS_PER_MIB_NATIVE;
  if (
    row.size <= budget.remainingBytes() && cpuNeeded <= budget.remainingCpuMs() &&
    !(row.attempts > 1 && row.upload_id !== null)
  ) {
    budget.addBytes(row.size);
    return { row, partSize, mode: "one_go" };
  }
  budget.addBytes(Math.min(partSize, row.size), true);
  return { row, partSize, mode: "resumable" };
}

async function copyObject(ctx: Ctx, planned: Planned): Promise<Outcome> {
  ctx.hook("object_start");
  if (planned.mode === "single") return await copySingle(ctx, planned.row);
  return await copyMultipart(ctx, planned);
}

function headersFor(row: jobs.ManifestRow) {
  return {
    contentType: systemHeader(row.mimetype),
    cacheControl: systemHeader(row.cache_control),
  };
}

async function copySingle(ctx: Ctx, row: jobs.ManifestRow): Promise<Outcome> {
  const { source, sink } = ctx.deps;
  await ctx.memory.acquire(row.size);
  const reader = source.open(
    row.bucket_id,
    row.name,
    { size: row.size, etag: row.source_etag },
    0,
    ctx.signal,
  );
  try {
    const buf = new Uint8Array(row.size);
    await reader.fill(buf, () => ctx.hook("source_chunk"));
    await reader.finish();
    ctx.stats.resumes += reader.resumed;
    const md5 = createHash("md5").update(buf).digest("hex");
    const sha256 = createHash("sha256").update(buf).digest("hex");
    const expected = isPlainMd5(row.source_etag);
    if (expected && expected !== md5) {
      throw new CopyError(
        "source_checksum_mismatch",
        `The bytes read hash to MD5 ${md5} but Storage recorded ${expected}: the read was altered; nothing was written.`,
        true,
      );
    }
    ctx.hook("before_put");
    const etag = await sink.putObject({
      key: row.dest_key,
      body: buf,
      md5Base64: hexToBase64(md5),
      sha256Hex: sha256,
      ...headersFor(row),
      metadata: buildMetadata(jobs.factsOf(row), row.user_metadata_mode, sha256),
    }, ctx.signal);
    ctx.hook("after_put");
    if (/^[0-9a-f]{32}$/.test(etag) && etag !== md5) {
      throw new CopyError(
        "dest_checksum_mismatch",
        `S3 reports ETag ${etag} for bytes whose MD5 is ${md5}.`,
        true,
      );
    }
    return {
      kind: "copied",
      bytes: row.size,
      record: { id: row.id, sha256, md5, etag, md5Checked: expected !== undefined },
    };
  } finally {
    ctx.memory.release(row.size);
    await reader.close();
  }
}

type Hashers =
  | { resumable: true; sha: ResumableHash; md5?: ResumableHash }
  | { resumable: false; sha: StreamHash; md5: StreamHash };

async function newHashers(resumable: boolean, withMd5: boolean): Promise<Hashers> {
  if (resumable) {
    return {
      resumable,
      sha: await ResumableHash.create("sha256"),
      md5: withMd5 ? await ResumableHash.create("md5") : undefined,
    };
  }
  return { resumable, sha: nativeHash("sha256"), md5: nativeHash("md5") };
}

/** Aborts uploads an earlier invocation may have opened without recording their id. */
async function settleStrayIntents(ctx: Ctx, row: jobs.ManifestRow): Promise<void> {
  const { sql, sink } = ctx.deps;
  const stray = await jobs.db(() => jobs.strayIntents(sql, row.id));
  if (stray.length === 0) return;
  const ids = await sink.listUploads(row.dest_key);
  if (ids === undefined) {
    await jobs.db(() =>
      jobs.closeIntents(
        sql,
        stray,
        "lost",
        "An invocation stopped while creating the upload and this S3 server cannot list uploads: it may be left open (a lifecycle rule removes it).",
      )
    );
    return;
  }
  const known = await jobs.db(() => jobs.knownUploadIds(sql, ids));
  for (const id of ids) if (!known.has(id)) await sink.abortUpload(row.dest_key, id);
  await jobs.db(() =>
    jobs.closeIntents(sql, stray, "aborted", "aborted after listing the key's uploads")
  );
}

async function copyMultipart(ctx: Ctx, planned: Planned): Promise<Outcome> {
  const { row, partSize } = planned;
  const { sql, source, sink } = ctx.deps;
  const { limits, budget, worker } = ctx;
  const size = row.size;
  const totalParts = Math.ceil(size / partSize);
  const expectedMd5 = isPlainMd5(row.source_etag);
  let uploadId = row.upload_id;
  let start = 0;

  const state = row.resume_state;
  let restored: Hashers | undefined;
  if (planned.mode === "resume" && state) {
    try {
      restored = {
        resumable: true,
        sha: await ResumableHash.restore(state.sha256, "sha256"),
        md5: expectedMd5 && state.md5 ? await ResumableHash.restore(state.md5, "md5") : undefined,
      };
      start = row.bytes_done;
    } catch (e) {
      // A state this build cannot continue (corrupt, or another engine's under the same tag):
      // read the object again from byte 0; parts already uploaded are skipped by their hashes.
      ctx.deps.log.warn("resume_state_unusable", { object: row.id, error: errorText(e) });
      await jobs.db(() => jobs.resetResume(sql, worker, row.id));
    }
  }
  const hashers: Hashers = restored ??
    await newHashers(planned.mode !== "one_go", expectedMd5 !== undefined);

  if (!uploadId) {
    if (row.attempts > 1) await settleStrayIntents(ctx, row);
    const intent = await jobs.db(() =>
      jobs.recordUploadIntent(sql, worker, row, ctx.job.s3_bucket)
    );
    if (intent === undefined) return { kind: "lost_lease" };
    ctx.hook("before_create_upload");
    uploadId = await sink.createUpload({
      key: row.dest_key,
      ...headersFor(row),
      metadata: buildMetadata(jobs.factsOf(row), row.user_metadata_mode),
    }, ctx.signal);
    const ok = await jobs.db(() =>
      jobs.recordUploadStarted(
        sql,
        worker,
        row.id,
        intent,
        uploadId!,
        partSize,
        limits.leaseSeconds,
      )
    );
    ctx.hook("after_create_upload");
    if (!ok) {
      await sink.abortUpload(row.dest_key, uploadId);
      return { kind: "lost_lease" };
    }
  }
  const upload = uploadId;
  const known = await jobs.db(() => jobs.loadParts(sql, row.id, upload));
  const parts = new Map<number, jobs.PartRow>(known);

  // Contiguous commit of resumable state: a part's state is stored once all before it are in.
  const finished = new Map<number, { end: number; state?: jobs.ResumeState }>();
  let committed = start / partSize;
  let commitChain: Promise<void> = Promise.resolve();
  let lostLease = false;
  const commit = (part: jobs.PartRow, end: number, st: jobs.ResumeState | undefined) => {
    commitChain = commitChain.then(async () => {
      finished.set(part.partNumber, { end, state: st });
      let resume: { bytesDone: number; state: jobs.ResumeState } | undefined;
      while (finished.has(committed + 1)) {
        const f = finished.get(committed + 1)!;
        finished.delete(committed + 1);
        committed++;
        if (hashers.resumable && f.state) resume = { bytesDone: f.end, state: f.state };
      }
      const ok = await jobs.db(() =>
        jobs.recordPart(sql, worker, row.id, upload, part, resume, limits.leaseSeconds)
      );
      if (!ok) lostLease = true;
      ctx.hook("after_record_part");
    });
    return commitChain;
  };

  // Parts are fetched with their own ranged GETs, up to PART_WINDOW ahead (like rclone's
  // multi-thread streams), hashed strictly in order, and uploaded PART_WINDOW at a time.
  const first = start / partSize + 1;
  const reads = new Map<number, Promise<Uint8Array>>();
  const readers = new Set<SourceReader>();
  const inflight = new Set<Promise<void>>();
  let nextToRead = first;
  const partCpu = (len: number) => (len / MiB) * ESTIMATED_CPU_MS_PER_MIB_RESUMABLE;
  let hashedUpTo = first - 1;
  let buffered = 0; // parts read or being read, not yet uploaded
  let failure: unknown;
  let stoppedEarly = false;
  let bytesThisChunk = 0;
  let resumes = 0;

  const freePart = (buf: Uint8Array) => {
    ctx.memory.release(buf.length);
    ctx.pool.give(buf);
  };
  const startRead = (n: number) => {
    const offset = (n - 1) * partSize;
    const len = Math.min(partSize, size - offset);
    // The first part was reserved in the budget when the object was planned.
    if (hashers.resumable && n > first) budget.addBytes(len, true);
    if (hashers.resumable) budget.reserveCpu(partCpu(len));
    buffered++;
    const task = (async () => {
      await ctx.memory.acquire(len);
      let buf: Uint8Array;
      try {
        buf = ctx.pool.take(len);
      } catch (e) {
        ctx.memory.release(len);
        throw e;
      }
      const reader = source.open(
        row.bucket_id,
        row.name,
        { size, etag: row.source_etag },
        offset,
        ctx.signal,
        offset + len,
      );
      readers.add(reader);
      try {
        await reader.fill(buf, () => ctx.hook("source_chunk"));
        resumes += reader.resumed;
        return buf;
      } catch (e) {
        freePart(buf);
        throw e;
      } finally {
        readers.delete(reader);
        await reader.close();
      }
    })();
    task.catch(() => {}); // observed when awaited in order
    reads.set(n, task);
  };
  /**
   * Keeps up to PART_WINDOW parts in memory. In resumable mode none is started past the budget;
   * the CPU a started part will cost is reserved in the (chunk-wide) budget until it is hashed.
   */
  const readAhead = () => {
    while (
      nextToRead <= totalParts && buffered < PART_WINDOW &&
      !(hashers.resumable && nextToRead > first && budget.exhausted())
    ) startRead(nextToRead++);
  };

  try {
    parts: for (let n = first; n <= totalParts; n++) {
      if (failure !== undefined || lostLease) break;
      if (ctx.signal.aborted) {
        throw new CopyError("interrupted", "The chunk was stopped.", true, "interrupted");
      }
      readAhead();
      while (!reads.has(n)) {
        if (buffered < PART_WINDOW) {
          // readAhead had room but did not start it: the budget ran out, and a resumable
          // object stops at this part boundary.
          stoppedEarly = true;
          break parts;
        }
        // The window is full of parts still uploading: wait for one.
        if (inflight.size === 0) throw new Error(`part ${n} was never read`);
        await Promise.race(inflight);
        if (failure !== undefined || lostLease) break parts;
        readAhead();
      }
      const pending = reads.get(n)!;
      reads.delete(n);
      const buf = await pending;
      const offset = (n - 1) * partSize;
      const len = buf.length;
      ctx.hook("part_read");
      const partMd5 = createHash("md5").update(buf).digest("hex");
      const partSha = createHash("sha256").update(buf).digest("hex");
      hashers.sha.update(buf);
      hashers.md5?.update(buf);
      if (hashers.resumable) budget.settleCpu(partCpu(len));
      hashedUpTo = n;
      const st: jobs.ResumeState | undefined = hashers.resumable
        ? {
          sha256: hashers.sha.save(),
          md5: hashers.md5?.save(),
        }
        : undefined;
      bytesThisChunk += len;
      const prior = parts.get(n);
      if (prior && prior.md5 === partMd5 && prior.sha256 === partSha && prior.size === len) {
        // Uploaded by an earlier attempt of this same upload: identical bytes, nothing to send.
        freePart(buf);
        buffered--;
        await commit(prior, offset + len, st);
        continue;
      }
      while (inflight.size >= PART_WINDOW) await Promise.race(inflight);
      const partNumber = n;
      const task = (async () => {
        try {
          ctx.hook("before_upload_part");
          const etag = await sink.uploadPart({
            key: row.dest_key,
            uploadId: upload,
            partNumber,
            body: buf,
            md5Base64: hexToBase64(partMd5),
            sha256Hex: partSha,
          }, ctx.signal);
          ctx.hook("after_upload_part");
          if (/^[0-9a-f]{32}$/.test(etag) && etag !== partMd5) {
            throw new CopyError(
              "dest_checksum_mismatch",
              `S3 reports ETag ${etag} for part ${partNumber} whose MD5 is ${partMd5}.`,
              true,
            );
          }
          const rec = { partNumber, size: len, etag, md5: partMd5, sha256: partSha };
          parts.set(partNumber, rec);
          await commit(rec, offset + len, st);
        } finally {
          freePart(buf);
          buffered--;
          readAhead();
        }
      })().catch((e) => {
        failure ??= e;
      });
      inflight.add(task);
      void task.finally(() => inflight.delete(task));
    }
    await Promise.all(inflight);
    await commitChain;
    if (failure !== undefined) throw failure;
    if (lostLease) return { kind: "lost_lease" };
    if (stoppedEarly) return { kind: "partial", bytes: bytesThisChunk };
  } catch (e) {
    await Promise.allSettled(inflight);
    await commitChain.catch(() => {});
    const err = e instanceof CopyError ? e : undefined;
    if (err?.code === "upload_lost") {
      await jobs.db(() =>
        jobs.resetUpload(sql, worker, row.id, upload, "lost", "S3 no longer knew the upload")
      );
    }
    throw e;
  } finally {
    // Parts read ahead that will not be used in this chunk (budget, failure): stop them.
    for (const r of readers) await r.close();
    for (const [, task] of reads) {
      await task.then(freePart, () => {});
    }
    if (hashers.resumable) {
      for (let n = hashedUpTo + 1; n < nextToRead; n++) {
        budget.settleCpu(partCpu(Math.min(partSize, size - (n - 1) * partSize)));
      }
    }
    ctx.stats.resumes += resumes;
  }

  const sha256 = hashers.sha.hex();
  const md5 = hashers.md5?.hex() ?? null;
  if (expectedMd5 && md5 !== expectedMd5) {
    // Not completed, so nothing is visible. The upload is kept: the next attempt reads the
    // object again from byte 0 and re-sends exactly the parts whose bytes differ.
    await jobs.db(() => jobs.resetResume(sql, worker, row.id));
    throw new CopyError(
      "source_checksum_mismatch",
      `The bytes read hash to MD5 ${md5} but Storage recorded ${expectedMd5}: the read was altered; the upload was not completed.`,
      true,
    );
  }
  const ordered: jobs.PartRow[] = [];
  for (let n = 1; n <= totalParts; n++) {
    const p = parts.get(n);
    if (!p) throw new CopyError("part_missing", `Part ${n} of the upload is not recorded.`, true);
    ordered.push(p);
  }
  ctx.hook("before_complete");
  // An earlier invocation may have completed this upload and died before recording it: S3 then
  // answers NoSuchUpload (or, on some servers, a 500). Either way the object itself decides: the
  // same size and our multipart ETag (or the same Storage version) means it is done.
  const completedEarlier = async (): Promise<string | undefined> => {
    const head = await sink.head(row.dest_key, ctx.signal);
    const expectedEtags = new Set([multipartEtag(ordered.map((p) => p.md5)), md5].filter(Boolean));
    const sameSource = head?.metadata["supabase-version"] === (row.version ?? undefined) &&
      head?.metadata["supabase-id"] === (row.object_id ?? undefined);
    return head && head.size === size && (expectedEtags.has(head.etag) || sameSource)
      ? head.etag
      : undefined;
  };
  let etag: string;
  try {
    etag = await sink.completeUpload(
      row.dest_key,
      upload,
      ordered.map((p) => ({ partNumber: p.partNumber, etag: p.etag })),
      ctx.signal,
    );
  } catch (e) {
    const done = await completedEarlier().catch(() => undefined);
    if (done === undefined) throw e;
    // If the upload is still open after all (the object was already there), do not leave it.
    await sink.abortUpload(row.dest_key, upload);
    etag = done;
  }
  if (etag === "missing") {
    const done = await completedEarlier();
    if (done !== undefined) {
      etag = done;
    } else {
      await jobs.db(() =>
        jobs.resetUpload(sql, worker, row.id, upload, "lost", "S3 no longer knew the upload")
      );
      throw new CopyError(
        "upload_lost",
        "S3 no longer knows the multipart upload; it will be restarted.",
        true,
      );
    }
  }
  ctx.hook("after_complete");
  return {
    kind: "copied",
    bytes: bytesThisChunk,
    record: { id: row.id, sha256, md5, etag, md5Checked: expectedMd5 !== undefined },
  };
}
