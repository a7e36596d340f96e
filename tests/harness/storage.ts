/**
 * A stand-in for Supabase Storage's REST API, for tests and benchmarks (the real storage-api
 * cannot be installed here). It serves the documented routes the migrator uses, from files plus
 * rows in the real `storage.buckets` / `storage.objects` tables with Supabase's columns:
 *
 *   GET  /storage/v1/bucket                                   list buckets (service role)
 *   GET  /storage/v1/bucket/{id}                              one bucket
 *   GET|HEAD /storage/v1/object/authenticated/{bucket}/{path} download (Range: bytes=a-b | a- | -n)
 *   GET|HEAD /storage/v1/object/{bucket}/{path}               same handler (public buckets need no key)
 *   GET|HEAD /storage/v1/object/public/{bucket}/{path}        public buckets only
 *   GET  /storage/v1/object/info/[authenticated/|public/]{bucket}/{path}  object info as JSON
 *
 * Like storage-api it answers errors with HTTP 400 and the real status in the body's
 * `statusCode` ("404" for a missing object, "403" for a bad key), returns 206 with
 * Content-Range and Accept-Ranges for a single range and 416 for an unsatisfiable one, and
 * decodes each path segment. Files live at `<dir>/<bucket>/<name>/<version>`, the layout of the
 * storage-api file backend.
 *
 * Faults can be injected per object for the retry and crash tests: an error status, a
 * connection cut after N bytes, a corrupted byte, a short body, a delay, or a server that ignores
 * Range. Every request is recorded in `requests`.
 */
import { createHash } from "node:crypto";
import type { Sql } from "../../shared/db/mod.ts";

export interface StorageStandInOptions {
  /** Directory for the object files (created). */
  dir: string;
  /** A superuser client of the database holding `storage.*` (the stand-in writes rows). */
  sql: Sql;
  serviceRoleKey: string;
  anonKey?: string;
  hostname?: string;
  port?: number;
}

export interface SeedBucket {
  id: string;
  public?: boolean;
  type?: "STANDARD" | "ANALYTICS" | "VECTOR";
}

export interface SeedObject {
  bucket: string;
  name: string;
  /** The content; or `size` random bytes. */
  body?: Uint8Array | string;
  size?: number;
  /** `metadata.mimetype`; default application/octet-stream. */
  mimetype?: string | null;
  /** `metadata.cacheControl`; default "no-cache" (what storage-api stores when none is sent). */
  cacheControl?: string | null;
  userMetadata?: unknown;
  ownerId?: string | null;
  /** Overrides `metadata.eTag` (e.g. a multipart-style "<md5>-3"). */
  eTag?: string;
}

export interface SeededObject {
  bucket: string;
  name: string;
  id: string;
  version: string;
  size: number;
  md5: string;
  sha256: string;
  path: string;
}

export type FaultKind =
  | { kind: "status"; status: number }
  | { kind: "cut"; afterBytes: number }
  | { kind: "short"; bytes: number }
  | { kind: "corrupt"; at: number }
  | { kind: "delay"; ms: number }
  | { kind: "ignore_range" };

export type Fault = FaultKind & {
  bucket?: string;
  name?: string;
  /** How many matching requests it applies to (default: all until removed). */
  times?: number;
};

export interface RequestRecord {
  method: string;
  route: "bucket" | "object" | "info" | "other";
  bucket?: string;
  name?: string;
  range?: string;
  status: number;
  authorized: boolean;
}

/**
 * Bytes per read when streaming a file out. Not part of the contract (storage-api streams what
 * its backend hands it); larger reads keep the stand-in, which shares the benchmark machine's
 * CPUs with the tools it serves, from costing more than a separate Storage server would.
 */
const CHUNK = 256 * 1024;

function storageError(statusCode: string, error: string, message: string): Response {
  return Response.json({ statusCode, error, message }, { status: 400 });
}

/** Parses a single `bytes=` range against a size; "invalid" for multiple or malformed ranges. */
export function parseRange(
  header: string | null,
  size: number,
): { start: number; end: number } | "none" | "invalid" | "unsatisfiable" {
  if (!header) return "none";
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === "" && m[2] === "")) return "invalid";
  if (m[1] === "") {
    const n = Number(m[2]);
    if (n === 0) return "unsatisfiable";
    return { start: Math.max(0, size - n), end: size - 1 };
  }
  const start = Number(m[1]);
  const end = m[2] === "" ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (start >= size || (m[2] !== "" && Number(m[2]) < start)) return "unsatisfiable";
  return { start, end };
}

function segmentsOk(name: string): boolean {
  if (name === "" || name.startsWith("/")) return false;
  return name.split("/").every((s) => s !== "" && s !== "." && s !== "..");
}

export class StorageStandIn {
  readonly dir: string;
  readonly requests: RequestRecord[] = [];
  #sql: Sql;
  #serviceKey: string;
  #anonKey?: string;
  #faults: Fault[] = [];
  #server?: Deno.HttpServer;
  #origin = "";
  #hostname: string;
  #port: number;
  #abort = new AbortController();

  constructor(options: StorageStandInOptions) {
    this.dir = options.dir;
    this.#sql = options.sql;
    this.#serviceKey = options.serviceRoleKey;
    this.#anonKey = options.anonKey;
    this.#hostname = options.hostname ?? "127.0.0.1";
    this.#port = options.port ?? 0;
  }

  /** e.g. http://127.0.0.1:41234 — what SUPABASE_URL points at. */
  get origin(): string {
    return this.#origin;
  }

  async start(): Promise<void> {
    await Deno.mkdir(this.dir, { recursive: true });
    await new Promise<void>((resolve) => {
      this.#server = Deno.serve({
        hostname: this.#hostname,
        port: this.#port,
        signal: this.#abort.signal,
        onListen: (addr) => {
          this.#origin = `http://${addr.hostname}:${addr.port}`;
          resolve();
        },
      }, (req) => this.#handle(req));
    });
  }

  async stop(): Promise<void> {
    if (!this.#server) return;
    this.#abort.abort();
    await this.#server.finished.catch(() => {});
    this.#server = undefined;
  }

  // ---- seeding -------------------------------------------------------------------------------

  async createBucket(bucket: SeedBucket | string): Promise<void> {
    const b = typeof bucket === "string" ? { id: bucket } : bucket;
    await this.#sql`
      insert into storage.buckets (id, name, public, type)
      values (${b.id}, ${b.id}, ${b.public ?? false}, ${b.type ?? "STANDARD"}::storage.buckettype)
      on conflict (id) do nothing`;
  }

  filePath(bucket: string, name: string, version: string): string {
    return `${this.dir}/${bucket}/${name}/${version}`;
  }

  /** Writes the files and upserts the rows (a re-seeded name gets a new version, like an upsert). */
  async seed(
    objects: SeedObject[],
    options: { concurrency?: number } = {},
  ): Promise<SeededObject[]> {
    const out: SeededObject[] = new Array(objects.length);
    let next = 0;
    const worker = async () => {
      while (next < objects.length) {
        const i = next++;
        out[i] = await this.#writeFile(objects[i]);
      }
    };
    await Promise.all(Array.from({ length: options.concurrency ?? 8 }, worker));
    for (let i = 0; i < objects.length; i += 1000) {
      const rows = objects.slice(i, i + 1000).map((o, j) => {
        const s = out[i + j];
        const metadata: Record<string, unknown> = {
          eTag: o.eTag ?? `"${s.md5}"`,
          size: s.size,
          mimetype: o.mimetype === undefined ? "application/octet-stream" : o.mimetype,
          cacheControl: o.cacheControl === undefined ? "no-cache" : o.cacheControl,
          lastModified: new Date().toISOString(),
          contentLength: s.size,
          httpStatusCode: 200,
        };
        for (const k of Object.keys(metadata)) if (metadata[k] === null) delete metadata[k];
        return {
          id: s.id,
          bucket_id: o.bucket,
          name: o.name,
          version: s.version,
          owner_id: o.ownerId ?? null,
          metadata,
          user_metadata: o.userMetadata === undefined ? null : o.userMetadata,
        };
      });
      const previous = await this.#sql`
        select o.bucket_id, o.name, o.version from storage.objects o
        join jsonb_to_recordset(${this.#sql.json(rows as never)}) as r(bucket_id text, name text)
          on r.bucket_id = o.bucket_id and r.name = o.name`;
      await this.#sql`
        insert into storage.objects (id, bucket_id, name, version, owner_id, metadata, user_metadata)
        select r.id, r.bucket_id, r.name, r.version, r.owner_id, r.metadata, r.user_metadata
        from jsonb_to_recordset(${this.#sql.json(rows as never)}) as r(
          id uuid, bucket_id text, name text, version text, owner_id text, metadata jsonb, user_metadata jsonb)
        on conflict (bucket_id, name) do update
          set version = excluded.version, metadata = excluded.metadata,
              user_metadata = excluded.user_metadata, owner_id = excluded.owner_id, updated_at = now()`;
      // An upsert keeps the row's id, as storage-api does.
      const ids = await this.#sql`
        select o.id::text, o.bucket_id, o.name from storage.objects o
        join jsonb_to_recordset(${this.#sql.json(rows as never)}) as r(bucket_id text, name text)
          on r.bucket_id = o.bucket_id and r.name = o.name`;
      const byKey = new Map(ids.map((r) => [`${r.bucket_id}\u0000${r.name}`, r.id as string]));
      for (let j = 0; j < rows.length; j++) {
        out[i + j].id = byKey.get(`${rows[j].bucket_id}\u0000${rows[j].name}`) ?? out[i + j].id;
      }
      for (const p of previous) {
        if (
          !rows.some((r) =>
            r.bucket_id === p.bucket_id && r.name === p.name && r.version === p.version
          )
        ) {
          await Deno.remove(this.filePath(p.bucket_id, p.name, p.version)).catch(() => {});
        }
      }
    }
    return out;
  }

  async #writeFile(o: SeedObject): Promise<SeededObject> {
    if (!segmentsOk(o.name)) {
      throw new Error(
        `The stand-in cannot store ${JSON.stringify(o.name)} as a file; insert such rows directly.`,
      );
    }
    const version = crypto.randomUUID();
    const path = this.filePath(o.bucket, o.name, version);
    await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
    const md5 = createHash("md5");
    const sha = createHash("sha256");
    let size = 0;
    const file = await Deno.open(path, { write: true, create: true, truncate: true });
    try {
      const write = async (chunk: Uint8Array) => {
        md5.update(chunk);
        sha.update(chunk);
        size += chunk.length;
        let off = 0;
        while (off < chunk.length) off += await file.write(chunk.subarray(off));
      };
      if (o.body !== undefined) {
        await write(typeof o.body === "string" ? new TextEncoder().encode(o.body) : o.body);
      } else {
        let left = o.size ?? 0;
        const block = new Uint8Array(1024 * 1024);
        while (left > 0) {
          const n = Math.min(left, block.length);
          for (let i = 0; i < n; i += 65536) {
            crypto.getRandomValues(block.subarray(i, Math.min(n, i + 65536)));
          }
          await write(block.subarray(0, n));
          left -= n;
        }
      }
    } finally {
      file.close();
    }
    return {
      bucket: o.bucket,
      name: o.name,
      id: crypto.randomUUID(),
      version,
      size,
      md5: md5.digest("hex"),
      sha256: sha.digest("hex"),
      path,
    };
  }

  /** Deletes the row and the file (storage-api's delete). */
  async remove(bucket: string, name: string): Promise<void> {
    const rows = await this.#sql`
      delete from storage.objects where bucket_id = ${bucket} and name = ${name} returning version`;
    for (const r of rows) await Deno.remove(this.filePath(bucket, name, r.version)).catch(() => {});
  }

  /** The object's current bytes, read from its file. */
  async read(bucket: string, name: string): Promise<Uint8Array> {
    const [row] = await this.#sql`
      select version from storage.objects where bucket_id = ${bucket} and name = ${name}`;
    if (!row) throw new Error(`No object ${bucket}/${name}`);
    return await Deno.readFile(this.filePath(bucket, name, row.version));
  }

  // ---- faults --------------------------------------------------------------------------------

  addFault(fault: Fault): () => void {
    this.#faults.push(fault);
    return () => {
      this.#faults = this.#faults.filter((f) => f !== fault);
    };
  }

  clearFaults(): void {
    this.#faults = [];
  }

  #takeFaults(bucket: string, name: string): FaultKind[] {
    const hits: FaultKind[] = [];
    for (const f of this.#faults) {
      if (f.bucket !== undefined && f.bucket !== bucket) continue;
      if (f.name !== undefined && f.name !== name) continue;
      if (f.times !== undefined) {
        if (f.times <= 0) continue;
        f.times--;
      }
      hits.push(f);
    }
    this.#faults = this.#faults.filter((f) => f.times === undefined || f.times > 0);
    return hits;
  }

  // ---- HTTP ----------------------------------------------------------------------------------

  #role(req: Request): "service_role" | "anon" | undefined {
    const m = /^Bearer\s+(\S+)$/i.exec(req.headers.get("authorization") ?? "");
    const token = m?.[1];
    if (token && token === this.#serviceKey) return "service_role";
    if (token && this.#anonKey && token === this.#anonKey) return "anon";
    return undefined;
  }

  async #handle(req: Request): Promise<Response> {
    const url = new URL(req.url);
    const raw = url.pathname;
    const record: RequestRecord = {
      method: req.method,
      route: "other",
      status: 0,
      authorized: false,
      range: req.headers.get("range") ?? undefined,
    };
    this.requests.push(record);
    const respond = (res: Response) => {
      record.status = res.status;
      return res;
    };
    try {
      if (raw.startsWith("/rclone/")) return respond(await this.#rcloneIndex(req, raw));
      if (!raw.startsWith("/storage/v1/")) {
        return respond(Response.json({ message: "no Route matched with those values" }, {
          status: 404,
        }));
      }
      let segments: string[];
      try {
        segments = raw.slice("/storage/v1/".length).split("/").map(decodeURIComponent);
      } catch {
        return respond(storageError("400", "InvalidKey", "Invalid key"));
      }
      const role = this.#role(req);
      record.authorized = role !== undefined;
      if (segments[0] === "bucket") {
        record.route = "bucket";
        if (req.method !== "GET") return respond(storageError("405", "Method", "Not allowed"));
        if (role !== "service_role") {
          return respond(storageError("403", "Unauthorized", "invalid signature"));
        }
        return respond(await this.#buckets(segments[1]));
      }
      if (segments[0] !== "object" || segments.length < 3) {
        return respond(storageError("404", "not_found", "Route not found"));
      }
      let rest = segments.slice(1);
      let info = false;
      if (rest[0] === "info") {
        info = true;
        rest = rest.slice(1);
      }
      let mode: "authenticated" | "public" | "default" = "default";
      if (rest[0] === "authenticated" || rest[0] === "public") {
        mode = rest[0];
        rest = rest.slice(1);
      }
      const bucket = rest[0];
      const name = rest.slice(1).join("/");
      record.route = info ? "info" : "object";
      record.bucket = bucket;
      record.name = name;
      if (!bucket || !name) return respond(storageError("400", "InvalidKey", "Invalid key"));
      if (req.method !== "GET" && req.method !== "HEAD") {
        return respond(storageError("405", "Method", "Not allowed"));
      }
      // One query for the bucket's visibility and the object's row (storage-api also reads both).
      const [found] = await this.#sql`
        select b.public, o.id::text as id, o.version, o.metadata, o.user_metadata,
               o.created_at, o.updated_at
        from storage.buckets b
        left join storage.objects o on o.bucket_id = b.id and o.name = ${name}
        where b.id = ${bucket}`;
      const publicBucket = found?.public === true;
      const allowed = role === "service_role" ||
        ((mode === "public" || mode === "default") && publicBucket);
      if (mode === "public" && !publicBucket) {
        return respond(storageError("404", "not_found", "Object not found"));
      }
      if (!allowed) {
        return respond(
          role === undefined && req.headers.has("authorization")
            ? storageError("403", "Unauthorized", "invalid signature")
            : storageError("404", "not_found", "Object not found"),
        );
      }
      const faults = this.#takeFaults(bucket, name);
      for (const f of faults) {
        if (f.kind === "delay") await new Promise((r) => setTimeout(r, f.ms));
      }
      const status = faults.find((f) => f.kind === "status");
      if (status && status.kind === "status") {
        return respond(Response.json({
          statusCode: String(status.status),
          error: "injected",
          message: "Injected failure",
        }, { status: status.status }));
      }
      const row = found?.id ? found : undefined;
      if (!row) return respond(storageError("404", "not_found", "Object not found"));
      if (info) return respond(this.#info(bucket, name, row));
      return respond(await this.#download(req, bucket, name, row, faults));
    } catch (e) {
      console.error("[storage stand-in]", e);
      return respond(storageError("500", "internal", "Internal Server Error"));
    }
  }

  /**
   * NOT a Storage route: a plain directory index of the same objects for the benchmark, so that
   * rclone's `http` backend can read the very source the migrator reads (same server, same DB
   * lookup per object). `GET /rclone/<bucket>/<dir>/` lists, `GET /rclone/<bucket>/<name>`
   * downloads. Needs the service role key.
   */
  async #rcloneIndex(req: Request, raw: string): Promise<Response> {
    if (this.#role(req) !== "service_role") return new Response("forbidden", { status: 403 });
    const parts = raw.slice("/rclone/".length).split("/").map(decodeURIComponent);
    const bucket = parts[0];
    const rest = parts.slice(1).join("/");
    if (!bucket) return new Response("no bucket", { status: 404 });
    if (raw.endsWith("/")) {
      const rows = await this.#sql<{ child: string; dir: boolean }[]>`
        select distinct split_part(substr(name, length(${rest}) + 1), '/', 1) as child,
               position('/' in substr(name, length(${rest}) + 1)) > 0 as dir
        from storage.objects where bucket_id = ${bucket} and starts_with(name, ${rest})`;
      const links = rows.map((r) => {
        const href = encodeURIComponent(r.child) + (r.dir ? "/" : "");
        return `<a href="${href}">${href}</a>`;
      });
      return new Response(`<html><body>${links.join("\n")}</body></html>`, {
        headers: { "content-type": "text/html" },
      });
    }
    const [row] = await this.#sql`
      select id::text, version, metadata from storage.objects
      where bucket_id = ${bucket} and name = ${rest}`;
    if (!row) return new Response("not found", { status: 404 });
    return await this.#download(req, bucket, rest, row, []);
  }

  async #buckets(id?: string): Promise<Response> {
    const rows = await this.#sql`
      select id, name, owner, public, file_size_limit, allowed_mime_types, created_at, updated_at, type::text
      from storage.buckets where ${id ?? null}::text is null or id = ${id ?? null}::text
      order by id`;
    if (id !== undefined) {
      return rows[0]
        ? Response.json(rows[0])
        : storageError("404", "not_found", "Bucket not found");
    }
    return Response.json(rows);
  }

  #info(bucket: string, name: string, row: Record<string, unknown>): Response {
    const m = (row.metadata ?? {}) as Record<string, unknown>;
    return Response.json({
      id: row.id,
      version: row.version,
      name,
      bucket_id: bucket,
      size: m.size,
      content_type: m.mimetype,
      cache_control: m.cacheControl,
      etag: m.eTag,
      metadata: row.user_metadata,
      last_modified: m.lastModified,
      created_at: row.created_at,
    });
  }

  async #download(
    req: Request,
    bucket: string,
    name: string,
    row: Record<string, unknown>,
    faults: FaultKind[],
  ): Promise<Response> {
    const path = this.filePath(bucket, name, row.version as string);
    let size: number;
    try {
      size = (await Deno.stat(path)).size;
    } catch {
      return storageError("404", "not_found", "Object not found");
    }
    const m = (row.metadata ?? {}) as Record<string, unknown>;
    const headers = new Headers({
      "content-type": String(m.mimetype ?? "application/octet-stream"),
      "accept-ranges": "bytes",
      // storage-api does not compress; this stops Deno.serve from doing it (and weakening ETags).
      "content-encoding": "identity",
    });
    if (m.cacheControl !== undefined) headers.set("cache-control", String(m.cacheControl));
    if (m.eTag !== undefined) headers.set("etag", String(m.eTag));
    if (m.lastModified !== undefined) {
      headers.set("last-modified", new Date(String(m.lastModified)).toUTCString());
    }
    const ignoreRange = faults.some((f) => f.kind === "ignore_range");
    const range = ignoreRange ? "none" : parseRange(req.headers.get("range"), size);
    if (range === "unsatisfiable") {
      headers.set("content-range", `bytes */${size}`);
      return new Response(null, { status: 416, headers });
    }
    const span = typeof range === "object" ? range : { start: 0, end: size - 1 };
    const length = Math.max(0, span.end - span.start + 1);
    const status = typeof range === "object" ? 206 : 200;
    if (status === 206) headers.set("content-range", `bytes ${span.start}-${span.end}/${size}`);
    const short = faults.find((f) => f.kind === "short");
    if (!short) headers.set("content-length", String(length));
    if (req.method === "HEAD" || length === 0) return new Response(null, { status, headers });
    const cut = faults.find((f) => f.kind === "cut");
    const corrupt = faults.filter((f) => f.kind === "corrupt");
    const limit = short && short.kind === "short" ? Math.min(short.bytes, length) : length;
    const file = await Deno.open(path, { read: true });
    await file.seek(span.start, Deno.SeekMode.Start);
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      pull: async (controller) => {
        try {
          if (sent >= limit) {
            file.close();
            controller.close();
            return;
          }
          if (cut && cut.kind === "cut" && sent >= cut.afterBytes) {
            // Error on the pull after the last byte went out, a moment later: a reset drops
            // whatever the client has not read yet, and the test wants exactly afterBytes.
            file.close();
            await new Promise((r) => setTimeout(r, 30));
            controller.error(new Error("injected connection cut"));
            return;
          }
          const want = cut && cut.kind === "cut" ? Math.min(CHUNK, cut.afterBytes - sent) : CHUNK;
          const buf = new Uint8Array(Math.min(want, limit - sent));
          const n = await file.read(buf);
          if (n === null) {
            file.close();
            controller.close();
            return;
          }
          let chunk = buf.subarray(0, n);
          for (const c of corrupt) {
            if (c.kind !== "corrupt") continue;
            const at = c.at - span.start - sent;
            if (at >= 0 && at < n) {
              chunk = chunk.slice();
              chunk[at] ^= 0xff;
            }
          }
          sent += n;
          controller.enqueue(chunk);
        } catch (e) {
          try {
            file.close();
          } catch {
            // already closed
          }
          controller.error(e);
        }
      },
      cancel: () => {
        try {
          file.close();
        } catch {
          // already closed
        }
      },
    });
    return new Response(body, { status, headers });
  }
}
