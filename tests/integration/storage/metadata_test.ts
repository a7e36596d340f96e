/**
 * How Supabase metadata maps to S3 metadata: plain ASCII pairs as headers, everything else
 * encoded losslessly, too much kept in the manifest (and flagged), never silently dropped; plus
 * how names become URLs and keys.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { S3Client } from "@aws-sdk/client-s3";
import { S3Sink } from "../../../shared/storage/sink.ts";
import {
  buildMetadata,
  decodeUserMetadata,
  type ObjectFacts,
  S3_METADATA_LIMIT,
  userMetadataMode,
} from "../../../shared/storage/metadata.ts";
import { deriveRow } from "../../../shared/storage/jobs.ts";
import { addressProblem, objectPath } from "../../../shared/storage/source.ts";
import { CreateJobBody, ObjectPrefix, RunBody } from "../../../shared/storage/schemas.ts";

const facts = (userMetadataText: string | null): ObjectFacts => ({
  objectId: "0b9a2c7e-6a43-4c53-9d5e-2f1f1c7d3e11",
  version: "5f6d0d7a-2c8e-4a53-8c2e-8e3f7a1b9c00",
  createdAt: "2026-11-27T01:02:03.123456Z",
  updatedAt: "2026-11-27T01:02:04.000001Z",
  lastModified: "2026-11-27T01:02:04.000Z",
  sourceEtag: '"0cc175b9c0f1b6a831c399e269772661"',
  ownerId: null,
  userMetadataText,
});

const bytesOf = (m: Record<string, string>) =>
  Object.entries(m).reduce(
    (n, [k, v]) => n + new TextEncoder().encode(`x-amz-meta-${k}${v}`).length,
    0,
  );

Deno.test("flat ASCII user metadata becomes one x-amz-meta header per pair and reads back equal", () => {
  const f = facts('{"team": "infra", "ticket": "OPS-12 (urgent)!"}');
  assert.equal(userMetadataMode(f), "headers");
  const m = buildMetadata(f, "headers", "ab".repeat(32));
  assert.equal(m.team, "infra");
  assert.equal(m.ticket, "OPS-12 (urgent)!");
  assert.equal(m["supabase-id"], f.objectId);
  assert.equal(m["supabase-etag"], "0cc175b9c0f1b6a831c399e269772661");
  assert.equal(m["supabase-created-at"], "2026-11-27T01:02:03.123456Z");
  assert.equal(m["supabase-sha256"], "ab".repeat(32));
  assert.deepEqual(decodeUserMetadata(m), { team: "infra", ticket: "OPS-12 (urgent)!" });
});

Deno.test("nested, non-ASCII, numeric and upper-case user metadata is encoded losslessly", () => {
  const cases = [
    '{"a": {"b": [1, 2.5, null, true]}}',
    '{"name": "Zoë – 東京 🚀"}',
    '{"Upper": "x"}',
    '{"big": 123456789012345678901234567890}',
    '{"spaces": " padded "}',
    '{"supabase-id": "spoof"}',
    '["not", "an", "object"]',
  ];
  for (const text of cases) {
    const f = facts(text);
    assert.equal(userMetadataMode(f), "encoded", text);
    const m = buildMetadata(f, "encoded");
    for (const v of Object.values(m)) assert.match(v, /^[\x20-\x7e]*$/, "header-safe");
    assert.equal(m["supabase-id"], f.objectId, "facts are not spoofable by user keys");
    // Decoding gives exactly the jsonb text's value, large integers included.
    const decoded = new TextDecoder().decode(
      Uint8Array.from(
        atob(m["supabase-user-metadata"].replaceAll("-", "+").replaceAll("_", "/")),
        (c) => c.charCodeAt(0),
      ),
    );
    assert.equal(decoded, text);
    assert.deepEqual(decodeUserMetadata(m), JSON.parse(text));
  }
});

Deno.test("user metadata over S3's 2 KB stays in the manifest and the object says so", () => {
  const big = JSON.stringify({ notes: "x".repeat(3000) });
  const f = facts(big);
  assert.equal(userMetadataMode(f), "manifest");
  const m = buildMetadata(f, "manifest", "ab".repeat(32));
  assert.equal(m["supabase-user-metadata-location"], "manifest");
  assert.equal(decodeUserMetadata(m), "manifest");
  assert.ok(bytesOf(m) <= S3_METADATA_LIMIT);
  // Right up to the limit pairs still travel as headers (the SHA-256 slot is always reserved,
  // so the mode decided at snapshot time holds at copy time); one byte more and they do not.
  const pairs = (n: number) => facts(JSON.stringify({ a: "y".repeat(1000), b: "z".repeat(n) }));
  let n = 0;
  while (userMetadataMode(pairs(n + 1)) === "headers") n++;
  assert.ok(n > 100);
  assert.equal(userMetadataMode(pairs(n)), "headers");
  assert.notEqual(userMetadataMode(pairs(n + 1)), "headers");
  assert.equal(bytesOf(buildMetadata(pairs(n), "headers", "ab".repeat(32))), S3_METADATA_LIMIT);
});

Deno.test("empty or absent user metadata adds nothing", () => {
  for (const text of [null, "{}", "null"]) {
    assert.equal(userMetadataMode(facts(text)), "none");
    const m = buildMetadata(facts(text), "none");
    assert.deepEqual(Object.keys(m).filter((k) => !k.startsWith("supabase-")), []);
    assert.equal(decodeUserMetadata(m), null);
  }
});

Deno.test("object names are percent-encoded per segment; dot segments are reported, not fetched", () => {
  assert.equal(
    objectPath("my bucket", "a b/c?d&e:f+g'(h)!/ü.txt"),
    "my%20bucket/a%20b/c%3Fd%26e%3Af%2Bg'(h)!/%C3%BC.txt",
  );
  assert.equal(objectPath("b", "50%/#1"), "b/50%25/%231");
  assert.equal(addressProblem("a/./b"), addressProblem("../x"));
  assert.ok(addressProblem("a/../b"));
  assert.equal(addressProblem("a/.emptyFolderPlaceholder"), undefined);
  assert.equal(addressProblem("a/..b/c."), undefined);
});

Deno.test("manifest rows get the destination key, and problems that would make a copy fail", () => {
  const row = (name: string, metadata: Record<string, unknown> | null = { size: 3, eTag: '"x"' }) =>
    deriveRow({ s3_prefix: "backup/" }, {
      bucket_id: "docs",
      name,
      object_id: null,
      version: null,
      metadata,
      user_metadata_text: null,
      created_iso: null,
      updated_iso: null,
      owner_id: null,
    });
  assert.equal(row("a/b.txt").dest_key, "backup/docs/a/b.txt");
  assert.equal(row("a/b.txt").problem_code, null);
  assert.equal(row("a/../b").problem_code, "name_not_addressable");
  assert.equal(row("x".repeat(1020)).problem_code, "key_too_long");
  assert.equal(row("pending", null).problem_code, "source_incomplete");
  assert.equal(row("weird", { size: "12" }).size, 12);
});

Deno.test("request schemas refuse malformed prefixes, bucket lists and budgets", () => {
  for (const bad of ["/abs", "a//b", "../x", "a/./b", "a\u0000b", "x".repeat(1025)]) {
    assert.equal(ObjectPrefix.safeParse(bad).success, false, JSON.stringify(bad));
  }
  for (const ok of ["", "photos/", "a/.hidden", "2024-", "ü/ "]) {
    assert.equal(ObjectPrefix.safeParse(ok).success, true, JSON.stringify(ok));
  }
  for (
    const bad of [
      { buckets: 42 },
      { buckets: [] },
      { buckets: ["a/b"] },
      { buckets: "some" },
      { dry_run: "yes" },
      { s3_prefix: "/x/" },
      { s3_prefix: "x" },
      { bogus: 1 },
    ]
  ) {
    assert.equal(CreateJobBody.safeParse(bad).success, false, JSON.stringify(bad));
  }
  assert.equal(CreateJobBody.safeParse({ buckets: "all", dry_run: true }).success, true);
  for (
    const bad of [{ max_seconds: 0 }, { concurrency: 100 }, { part_size_mib: 4 }, {
      max_bytes: 10,
    }]
  ) {
    assert.equal(RunBody.safeParse(bad).success, false, JSON.stringify(bad));
  }
});

Deno.test("the signed payload hash and Content-MD5 of a PUT are the hashes computed while reading", async () => {
  const sent: { headers: Record<string, string>; body: unknown }[] = [];
  const client = new S3Client({
    region: "us-east-1",
    endpoint: "http://127.0.0.1:9",
    forcePathStyle: true,
    credentials: { accessKeyId: "AKIDEXAMPLE", secretAccessKey: "secret" },
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
    requestHandler: {
      handle: (request: { headers: Record<string, string>; body: unknown }) => {
        sent.push({ headers: { ...request.headers }, body: request.body });
        return Promise.resolve({
          response: { statusCode: 200, headers: { etag: '"abc"' }, body: new Uint8Array() },
        });
      },
    } as never,
  });
  const body = new TextEncoder().encode("payload that S3 verifies");
  const sha = createHash("sha256").update(body).digest("hex");
  const md5 = createHash("md5").update(body).digest("base64");
  const sink = new S3Sink(client, "dest");
  await sink.putObject({
    key: "a b/ü.txt",
    body,
    md5Base64: md5,
    sha256Hex: sha,
    contentType: "text/plain",
    cacheControl: "max-age=60",
    metadata: { "supabase-id": "x" },
  });
  await sink.uploadPart({
    key: "k",
    uploadId: "u",
    partNumber: 2,
    body,
    md5Base64: md5,
    sha256Hex: sha,
  });
  assert.equal(sent.length, 2);
  for (const req of sent) {
    assert.equal(req.headers["x-amz-content-sha256"], sha);
    assert.equal(req.headers["content-md5"], md5);
    assert.match(req.headers["authorization"], /SignedHeaders=[^,]*x-amz-content-sha256/);
    assert.equal(req.body, body, "the buffer itself, of known length, is sent");
    assert.equal(req.headers["content-length"], String(body.length));
    assert.equal(
      Object.keys(req.headers).filter((h) => h.startsWith("x-amz-checksum")).length,
      0,
      "no SDK checksum (WHEN_REQUIRED)",
    );
  }
  assert.equal(sent[0].headers["x-amz-meta-supabase-id"], "x");
  assert.equal(sent[0].headers["cache-control"], "max-age=60");
  client.destroy();
});
