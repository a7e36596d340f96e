/**
 * The source: Supabase Storage's documented REST API, with the service role key.
 *
 *   GET {SUPABASE_URL}/storage/v1/bucket                                   (pre-flight)
 *   GET {SUPABASE_URL}/storage/v1/object/authenticated/{bucket}/{name}     (download)
 *
 * Every name segment is percent-encoded on its own ("a b/c?d" -> "a%20b/c%3Fd"); a name with a
 * "." or ".." segment cannot be addressed in a URL at all (URL parsers collapse it) and is
 * reported instead of being fetched from the wrong place. Downloads ask for `identity` encoding,
 * stream (never buffering the object), check the length against the manifest (a CDN that
 * rewrites HTML changes it, supabase/supabase#45584), and when the connection breaks they resume
 * from the exact byte with `Range: bytes=<pos>-<last>`, which storage-api answers with 206 and
 * Content-Range. storage-api reports most errors as HTTP 400 with the real status in the body's
 * `statusCode`; both forms are understood.
 */
import { CopyError, errorText, isAbortError, isConnectFailure, sleep } from "./errors.ts";

const SCRATCH_BYTES = 256 * 1024;

export interface SourceOptions {
  /** SUPABASE_URL, e.g. https://<ref>.supabase.co */
  baseUrl: string;
  /** The service role key. */
  key: string;
  fetch?: typeof fetch;
  /** Time to the response headers. */
  headerTimeoutMs?: number;
  /** Longest pause between two body chunks. */
  idleTimeoutMs?: number;
  /** Resumptions of one download after a broken connection. */
  retries?: number;
  retryDelayMs?: number;
}

/** Percent-encodes each segment of an object name (and the bucket) for a URL path. */
export function objectPath(bucket: string, name: string): string {
  return `${encodeURIComponent(bucket)}/${name.split("/").map(encodeURIComponent).join("/")}`;
}

/** Why a name cannot be fetched through a URL, or undefined when it can. */
export function addressProblem(name: string): string | undefined {
  if (name.split("/").some((s) => s === "." || s === "..")) {
    return `The name has a "." or ".." segment, which no URL can address (URL parsers collapse it).`;
  }
  return undefined;
}

function normalizeEtag(v: string | null | undefined): string | undefined {
  if (!v) return undefined;
  return v.replace(/^W\//, "").replaceAll('"', "").trim().toLowerCase();
}

/** storage-api puts the real status in the body ({"statusCode":"404",...}) of an HTTP 400. */
async function realStatus(res: Response): Promise<{ status: number; message: string }> {
  const text = await res.text().catch(() => "");
  let status = res.status;
  let message = text.slice(0, 300);
  try {
    const body = JSON.parse(text);
    const code = Number(body?.statusCode);
    if (res.status === 400 && Number.isInteger(code) && code >= 400 && code < 600) status = code;
    if (typeof body?.message === "string") message = body.message;
  } catch {
    // not JSON
  }
  return { status, message };
}

export class StorageSource {
  readonly baseUrl: string;
  readonly #key: string;
  readonly #fetch: typeof fetch;
  readonly headerTimeoutMs: number;
  readonly idleTimeoutMs: number;
  readonly retries: number;
  readonly retryDelayMs: number;

  constructor(options: SourceOptions) {
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.#key = options.key;
    this.#fetch = options.fetch ?? fetch;
    this.headerTimeoutMs = options.headerTimeoutMs ?? 30_000;
    this.idleTimeoutMs = options.idleTimeoutMs ?? 30_000;
    this.retries = options.retries ?? 3;
    this.retryDelayMs = options.retryDelayMs ?? 200;
  }

  objectUrl(bucket: string, name: string): string {
    return `${this.baseUrl}/storage/v1/object/authenticated/${objectPath(bucket, name)}`;
  }

  headers(extra: Record<string, string> = {}): Record<string, string> {
    return {
      authorization: `Bearer ${this.#key}`,
      apikey: this.#key,
      "accept-encoding": "identity",
      ...extra,
    };
  }

  /** Pre-flight: Storage answers and accepts the key. Returns the bucket ids it lists. */
  async listBuckets(signal?: AbortSignal): Promise<string[]> {
    let res: Response;
    try {
      res = await this.#fetch(`${this.baseUrl}/storage/v1/bucket`, {
        headers: this.headers(),
        signal: AbortSignal.any([
          AbortSignal.timeout(this.headerTimeoutMs),
          ...(signal ? [signal] : []),
        ]),
      });
    } catch (e) {
      throw new CopyError(
        "storage_unreachable",
        `Supabase Storage cannot be reached: ${errorText(e)}`,
        true,
        "storage",
      );
    }
    if (!res.ok) {
      const { status, message } = await realStatus(res);
      throw new CopyError(
        status === 401 || status === 403 ? "storage_rejected_key" : "storage_error",
        status === 401 || status === 403
          ? `Supabase Storage rejected the service role key (${status}: ${message}).`
          : `Supabase Storage answered ${status}: ${message}`,
        status >= 500,
        "storage",
      );
    }
    const body = await res.json().catch(() => undefined);
    if (!Array.isArray(body)) {
      throw new CopyError(
        "storage_error",
        "Supabase Storage's bucket list is not a JSON array.",
        true,
        "storage",
      );
    }
    return body.map((b) => String(b?.id ?? b?.name));
  }

  /** A reader of [start, end) of one object (end defaults to its size). */
  open(
    bucket: string,
    name: string,
    expect: { size: number; etag?: string | null },
    start = 0,
    signal?: AbortSignal,
    end = expect.size,
  ): SourceReader {
    return new SourceReader(this, bucket, name, expect, start, signal, end);
  }

  /** One GET (ranged unless it is the whole object); checks the status and the range. */
  async request(
    bucket: string,
    name: string,
    expect: { size: number; etag?: string | null },
    from: number,
    signal?: AbortSignal,
    end = expect.size,
  ): Promise<{ body: ReadableStream<Uint8Array> | null; skip: number }> {
    const ranged = from > 0 || end < expect.size;
    const headers = this.headers(ranged ? { range: `bytes=${from}-${end - 1}` } : {});
    let res: Response;
    try {
      res = await this.#fetch(this.objectUrl(bucket, name), {
        headers,
        signal: AbortSignal.any([
          AbortSignal.timeout(this.headerTimeoutMs),
          ...(signal ? [signal] : []),
        ]),
      });
    } catch (e) {
      if (signal?.aborted) {
        throw new CopyError("interrupted", "The chunk was stopped.", true, "interrupted");
      }
      if (isConnectFailure(e)) {
        throw new CopyError(
          "storage_unreachable",
          `Supabase Storage cannot be reached: ${errorText(e)}`,
          true,
          "storage",
        );
      }
      throw new CopyError(
        isAbortError(e) ? "source_timeout" : "source_network_error",
        `Downloading from Storage failed: ${errorText(e)}`,
        true,
      );
    }
    if (res.status !== 200 && res.status !== 206) {
      const { status, message } = await realStatus(res);
      if (status === 404) {
        throw new CopyError(
          "source_not_found",
          "The object is no longer in Storage (deleted after the snapshot).",
          false,
        );
      }
      if (status === 401 || status === 403) {
        throw new CopyError(
          "storage_rejected_key",
          `Supabase Storage rejected the service role key (${status}: ${message}).`,
          false,
          "storage",
        );
      }
      if (status === 416) {
        throw new CopyError(
          "source_changed",
          "The object is shorter than when it was snapshotted (it was replaced); a new job copies the new version.",
          false,
        );
      }
      const transient = status >= 500 || status === 429 || status === 408;
      throw new CopyError(
        `source_http_${status}`,
        `Supabase Storage answered ${status}: ${message}`,
        transient,
      );
    }
    const etag = normalizeEtag(res.headers.get("etag"));
    const wanted = normalizeEtag(expect.etag);
    if (etag && wanted && etag !== wanted) {
      await res.body?.cancel().catch(() => {});
      throw new CopyError(
        "source_changed",
        "The object's eTag differs from the snapshot (it was replaced); a new job copies the new version.",
        false,
      );
    }
    let skip = 0;
    if (res.status === 206) {
      const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(res.headers.get("content-range") ?? "");
      if (!m || Number(m[1]) !== from || Number(m[2]) !== end - 1) {
        await res.body?.cancel().catch(() => {});
        throw new CopyError(
          "source_bad_range",
          `Storage answered a range other than the one asked for (${
            res.headers.get("content-range")
          }).`,
          true,
        );
      }
      if (m[3] !== "*" && Number(m[3]) !== expect.size) {
        await res.body?.cancel().catch(() => {});
        throw new CopyError(
          "source_changed",
          `The object is ${m[3]} bytes now, ${expect.size} in the snapshot (it was replaced).`,
          false,
        );
      }
    } else {
      // A 200: the whole object. A server that ignored Range: skip what comes before `from`
      // (and the reader stops at `end`).
      skip = from;
      const length = res.headers.get("content-length");
      const encoding = res.headers.get("content-encoding");
      if (length !== null && (encoding === null || encoding === "identity")) {
        if (Number(length) !== expect.size) {
          await res.body?.cancel().catch(() => {});
          throw new CopyError(
            "source_size_mismatch",
            `Storage sends ${length} bytes but the object has ${expect.size} (altered in transit, e.g. by a CDN?).`,
            false,
          );
        }
      }
    }
    return { body: res.body, skip };
  }
}

/** Reads [start, size) of one object, resuming with Range when the connection breaks. */
export class SourceReader {
  readonly #source: StorageSource;
  readonly #bucket: string;
  readonly #name: string;
  readonly #expect: { size: number; etag?: string | null };
  readonly #signal?: AbortSignal;
  #pos: number;
  readonly #end: number;
  #reader?: { read(): Promise<Uint8Array | null>; cancel(): Promise<void> };
  /** Reused for every read of a byte stream, so a download allocates no garbage per chunk. */
  #scratch = new Uint8Array(SCRATCH_BYTES);
  #skip = 0;
  #leftover?: Uint8Array;
  #resumes = 0;
  /** Ranged requests made after the first (for tests and logs). */
  resumed = 0;

  constructor(
    source: StorageSource,
    bucket: string,
    name: string,
    expect: { size: number; etag?: string | null },
    start: number,
    signal?: AbortSignal,
    end = expect.size,
  ) {
    this.#source = source;
    this.#bucket = bucket;
    this.#name = name;
    this.#expect = expect;
    this.#pos = start;
    this.#end = end;
    this.#signal = signal;
  }

  get position(): number {
    return this.#pos;
  }

  async #connect(): Promise<void> {
    const { body, skip } = await this.#source.request(
      this.#bucket,
      this.#name,
      this.#expect,
      this.#pos,
      this.#signal,
      this.#end,
    );
    this.#skip = skip;
    this.#reader = body ? this.#wrap(body) : undefined;
  }

  /** A BYOB reader into the scratch buffer when the body is a byte stream (fetch's is). */
  #wrap(
    body: ReadableStream<Uint8Array>,
  ): { read(): Promise<Uint8Array | null>; cancel(): Promise<void> } {
    let byob: ReadableStreamBYOBReader | undefined;
    try {
      byob = body.getReader({ mode: "byob" });
    } catch {
      byob = undefined;
    }
    if (!byob) {
      const plain = body.getReader();
      return {
        read: async () => {
          const r = await plain.read();
          return r.done ? null : r.value;
        },
        cancel: () => plain.cancel(),
      };
    }
    const reader = byob;
    return {
      read: async () => {
        // The scratch buffer is transferred to the stream and comes back in `value`. If the
        // read fails it is gone, so it is replaced (the bytes in it were already copied out).
        const view = this.#scratch.byteLength > 0
          ? this.#scratch
          : (this.#scratch = new Uint8Array(SCRATCH_BYTES));
        this.#scratch = new Uint8Array(0);
        const r = await reader.read(view);
        if (r.value) this.#scratch = new Uint8Array(r.value.buffer);
        return r.done ? null : r.value!;
      },
      cancel: () => reader.cancel(),
    };
  }

  async #readRaw(): Promise<Uint8Array | null> {
    const reader = this.#reader!;
    let timer: number | undefined;
    const idle = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new CopyError(
              "source_timeout",
              `No data from Storage for ${this.#source.idleTimeoutMs} ms.`,
              true,
            ),
          ),
        this.#source.idleTimeoutMs,
      );
    });
    try {
      return await Promise.race([reader.read(), idle]);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * The next chunk (at most `max` bytes), or null at the end of the range. The chunk is only
   * valid until the next call (it may be a view of the reused scratch buffer): copy it.
   */
  async read(max: number): Promise<Uint8Array | null> {
    if (this.#leftover) {
      const chunk = this.#leftover.subarray(0, max);
      this.#leftover = chunk.length < this.#leftover.length
        ? this.#leftover.subarray(chunk.length)
        : undefined;
      this.#pos += chunk.length;
      return chunk;
    }
    if (this.#pos >= this.#end) return null;
    for (;;) {
      try {
        if (!this.#reader) {
          if (this.#expect.size === 0) return null;
          await this.#connect();
          if (!this.#reader) {
            throw new CopyError("source_truncated", "Storage sent no body.", true);
          }
        }
        let chunk = await this.#readRaw();
        if (chunk === null) {
          throw new CopyError(
            "source_truncated",
            `Storage ended the object at byte ${this.#pos} of ${this.#end}.`,
            true,
          );
        }
        if (this.#skip > 0) {
          const drop = Math.min(this.#skip, chunk.length);
          this.#skip -= drop;
          chunk = chunk.subarray(drop);
          if (chunk.length === 0) continue;
        }
        const room = this.#end - this.#pos;
        if (chunk.length > room && this.#end < this.#expect.size) {
          // A server that ignored Range sends the rest of the object: keep what we asked for.
          chunk = chunk.subarray(0, room);
        } else if (chunk.length > room) {
          throw new CopyError(
            "source_size_mismatch",
            `Storage sent more than the ${this.#expect.size} bytes the object has (altered in transit, e.g. by a CDN?).`,
            false,
          );
        }
        if (chunk.length > max) {
          this.#leftover = chunk.subarray(max);
          chunk = chunk.subarray(0, max);
        }
        this.#pos += chunk.length;
        return chunk;
      } catch (e) {
        await this.#reader?.cancel().catch(() => {});
        this.#reader = undefined;
        if (this.#signal?.aborted) {
          throw new CopyError("interrupted", "The chunk was stopped.", true, "interrupted");
        }
        const err = e instanceof CopyError ? e : new CopyError(
          "source_network_error",
          `Reading from Storage failed at byte ${this.#pos}: ${errorText(e)}`,
          true,
        );
        if (!err.transient || err.scope !== "object" || this.#resumes >= this.#source.retries) {
          throw err;
        }
        this.#resumes++;
        this.resumed++;
        await sleep(this.#source.retryDelayMs * 2 ** (this.#resumes - 1), this.#signal);
      }
    }
  }

  /** Fills `buf` completely from the current position. */
  async fill(buf: Uint8Array, onChunk?: (chunk: Uint8Array) => void): Promise<void> {
    let off = 0;
    while (off < buf.length) {
      const chunk = await this.read(buf.length - off);
      if (chunk === null) {
        throw new CopyError(
          "source_truncated",
          `Storage ended the object at byte ${this.#pos}.`,
          true,
        );
      }
      buf.set(chunk, off);
      off += chunk.length;
      onChunk?.(chunk);
    }
  }

  /** At the end: no byte may follow (a longer body means the content was altered). */
  async finish(): Promise<void> {
    if (this.#leftover?.length) {
      throw new CopyError(
        "source_size_mismatch",
        "Storage sent more bytes than the object has.",
        false,
      );
    }
    if (this.#reader) {
      const extra = await this.#readRaw().catch(() => null);
      await this.#reader.cancel().catch(() => {});
      this.#reader = undefined;
      if (extra && extra.length > 0) {
        throw new CopyError(
          "source_size_mismatch",
          `Storage sent more than the ${this.#expect.size} bytes the object has (altered in transit, e.g. by a CDN?).`,
          false,
        );
      }
    }
  }

  async close(): Promise<void> {
    await this.#reader?.cancel().catch(() => {});
    this.#reader = undefined;
  }
}
