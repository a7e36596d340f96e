/**
 * The test corpus of the storage migrator (issue 7): awkward keys, the sizes around the
 * multipart boundary, one object larger than a chunk's byte budget, nested / non-ASCII / oversized
 * user metadata, an HTML page, folder placeholders, a multipart-style source eTag, plus rows the
 * migrator must report rather than copy. Shared by the integration and e2e tests.
 */
import {
  CreateBucketCommand,
  GetObjectCommand,
  ListObjectsV2Command,
  type S3Client,
} from "@aws-sdk/client-s3";
import { createHash } from "node:crypto";
import { type Env, loadStorageConfig } from "../../../shared/config/mod.ts";
import type { Sql } from "../../../shared/db/mod.ts";
import type { FunctionApp } from "../../../shared/http/app.ts";
import { createStorageApp } from "../../../shared/storage/app.ts";
import type { SeededObject, SeedObject, StorageStandIn } from "../../harness/storage.ts";

export const MiB = 1024 * 1024;
/** Part size the tests use (S3's minimum), so 5 MiB - 1, 5 MiB and 5 MiB + 1 straddle it. */
export const PART_MIB = 5;
/** Byte budget per chunk in the tests: smaller than `sizes/large.bin`. */
export const CHUNK_BYTES = 8 * MiB;

const html = `<!doctype html>
<html><head><meta charset="utf-8"><title>Contact</title></head>
<body><p>Write to <a href="mailto:ops@example.com">ops@example.com</a> — merci !</p></body></html>
`;

export function corpusObjects(): SeedObject[] {
  const m = "media";
  return [
    { bucket: m, name: "with space.txt", body: "spaces", mimetype: "text/plain" },
    {
      bucket: m,
      name: "ünïcødé/文件 📄.txt",
      body: "unicode",
      mimetype: "text/plain; charset=utf-8",
    },
    { bucket: m, name: "odd/plus+question?and&colon:quote'paren(1)!.bin", body: "punctuation" },
    { bucket: m, name: "odd/50% off #1 ~tilde.txt", body: "percent and hash" },
    { bucket: m, name: "deep/a/b/c/d/e/f/g/h/i/j/k/l/leaf.txt", body: "deep", cacheControl: null },
    { bucket: m, name: ".emptyFolderPlaceholder", body: "" },
    { bucket: m, name: "deep/a/.emptyFolderPlaceholder", body: "" },
    { bucket: m, name: "sizes/zero", body: "", mimetype: null },
    { bucket: m, name: "sizes/one", body: "1" },
    { bucket: m, name: "sizes/5MiB-1", size: 5 * MiB - 1 },
    { bucket: m, name: "sizes/5MiB", size: 5 * MiB },
    { bucket: m, name: "sizes/5MiB+1", size: 5 * MiB + 1 },
    {
      bucket: m,
      name: "sizes/large.bin",
      size: 3 * CHUNK_BYTES - MiB + 3,
      mimetype: "application/x-large",
      userMetadata: { origin: "batch-7" },
    },
    {
      bucket: m,
      name: "site/index.html",
      body: html,
      mimetype: "text/html; charset=utf-8",
      cacheControl: "max-age=3600",
    },
    {
      bucket: m,
      name: "meta/plain.json",
      body: "{}",
      mimetype: "application/json",
      userMetadata: { team: "infra", ticket: "OPS-12" },
    },
    {
      bucket: m,
      name: "meta/nested.json",
      body: "{}",
      userMetadata: { a: { b: [1, 2.5, null, true] }, Upper: "Case", big: 12345678901234567890 },
    },
    {
      bucket: m,
      name: "meta/non-ascii.txt",
      body: "x",
      userMetadata: { "名前": "値", emoji: "🚀", accent: "é" },
    },
    {
      bucket: m,
      name: "meta/huge.txt",
      body: "y",
      userMetadata: { notes: "n".repeat(3000) },
    },
    {
      bucket: m,
      name: "meta/multipart-etag.bin",
      size: 1000,
      eTag: `"${"ab".repeat(16)}-2"`,
    },
    { bucket: "docs", name: "readme.md", body: "# docs\n", mimetype: "text/markdown" },
    { bucket: "docs", name: "old.txt", body: "to be deleted later" },
    { bucket: "docs", name: "guide/intro.txt", body: "intro" },
  ];
}

export interface Corpus {
  objects: SeededObject[];
  specs: SeedObject[];
  /** Rows that must be reported, never copied: name -> error code. */
  reported: Record<string, string>;
}

/** Creates the buckets, seeds the corpus and inserts the rows no URL can fetch. */
export async function seedCorpus(storage: StorageStandIn, sql: Sql): Promise<Corpus> {
  await storage.createBucket("media");
  await storage.createBucket({ id: "docs", public: true });
  await storage.createBucket({ id: "lake", type: "ANALYTICS" });
  const specs = corpusObjects();
  const objects = await storage.seed(specs);
  await storage.seed([{ bucket: "lake", name: "table/part-0.parquet", body: "not copied" }]);
  // Rows storage-api can hold but no download URL can reach, or that are not finished.
  await sql`
    insert into storage.objects (bucket_id, name, metadata, version) values
      ('media', 'bad/../name.txt', '{"size": 3, "eTag": "\\"x\\"", "mimetype": "text/plain"}', 'v1'),
      ('media', 'uploading.bin', null, 'v1')`;
  return {
    objects,
    specs,
    reported: { "bad/../name.txt": "name_not_addressable", "uploading.bin": "source_incomplete" },
  };
}

export async function sha256Of(stream: ReadableStream<Uint8Array>): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of stream) h.update(chunk);
  return h.digest("hex");
}

export async function getObject(s3: S3Client, bucket: string, key: string) {
  const out = await s3.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
  return { out, sha256: await sha256Of(out.Body!.transformToWebStream()) };
}

export async function listKeys(s3: S3Client, bucket: string, prefix = ""): Promise<string[]> {
  const keys: string[] = [];
  let token: string | undefined;
  do {
    const page = await s3.send(
      new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token }),
    );
    for (const o of page.Contents ?? []) keys.push(o.Key!);
    token = page.NextContinuationToken;
  } while (token);
  return keys.sort();
}

export async function createBucket(s3: S3Client, bucket: string): Promise<void> {
  await s3.send(new CreateBucketCommand({ Bucket: bucket })).catch(() => {});
}

/** Every file under s3rver's data dir with size and mtime: equal before and after = no writes. */
export async function dataDirState(dir: string): Promise<string> {
  const out: string[] = [];
  const walk = async (d: string) => {
    for await (const e of Deno.readDir(d)) {
      const p = `${d}/${e.name}`;
      if (e.isDirectory) await walk(p);
      else {
        const st = await Deno.stat(p);
        out.push(`${p}\t${st.size}\t${st.mtime?.getTime()}`);
      }
    }
  };
  await walk(dir);
  return out.sort().join("\n");
}

/** Multipart uploads s3rver still holds open (it keeps them as directories). */
export async function openUploads(dataDir: string, bucket: string): Promise<string[]> {
  try {
    const ids: string[] = [];
    for await (const e of Deno.readDir(`${dataDir}/${bucket}/._S3rver_uploads`)) ids.push(e.name);
    return ids;
  } catch {
    return [];
  }
}

/** An S3 client whose every command is logged as "Command key". */
export function countRequests(client: S3Client): { log: { command: string; key?: string }[] } {
  const state = { log: [] as { command: string; key?: string }[] };
  client.middlewareStack.add(
    (next, context) => (args) => {
      const input = args.input as { Key?: string };
      state.log.push({ command: context.commandName ?? "?", key: input.Key });
      return next(args);
    },
    { step: "initialize", name: "testRequestLog" },
  );
  return state;
}

/**
 * Serves only the storage-to-s3 function over real HTTP, at the URL shape of Supabase's gateway
 * (`<origin>/functions/v1/storage-to-s3/...`), built like the entrypoint:
 * createStorageApp(loadStorageConfig(env)). Independent of the other functions' state.
 */
export function serveStorageFunction(
  env: Env,
): { url: string; app: FunctionApp; stop: () => Promise<void> } {
  const app = createStorageApp(loadStorageConfig(env), { logSink: () => {} });
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const url = new URL(req.url);
    const m = /^\/functions\/v1\/storage-to-s3(\/.*)?$/.exec(url.pathname);
    if (!m) return Response.json({ error: "function_not_found" }, { status: 404 });
    url.pathname = `/storage-to-s3${m[1] ?? ""}`;
    return app.fetch(new Request(url, req));
  });
  return {
    url: `http://127.0.0.1:${server.addr.port}/functions/v1/storage-to-s3`,
    app,
    stop: async () => {
      await server.shutdown();
      await app.close();
    },
  };
}
