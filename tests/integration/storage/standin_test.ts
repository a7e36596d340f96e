/**
 * The Storage stand-in behaves like the documented storage-api routes the migrator relies on:
 * bucket list, authenticated download with single ranges, HEAD, object info, storage-api's
 * error shape, per-segment decoding of names; its rows look like storage-api's; and its fault
 * injection does what the retry and crash tests need.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { objectPath } from "../../../shared/storage/source.ts";
import { withStack } from "../../harness/mod.ts";

Deno.test("the Storage stand-in serves the documented routes the migrator uses", async (t) => {
  await withStack({ name: "storage-standin", primary: true, storage: true }, async (stack) => {
    const st = stack.storage!;
    const base = `${st.origin}/storage/v1`;
    const service = { authorization: `Bearer ${stack.tokens.serviceRole}` };
    const sql = stack.primary!.sql("supabase_admin");
    await st.createBucket("docs");
    await st.createBucket({ id: "pics", public: true });
    await st.createBucket({ id: "lake", type: "ANALYTICS" });
    const body = new TextEncoder().encode("0123456789abcdefghij");
    const [seeded] = await st.seed([{
      bucket: "docs",
      name: "a b/c?d#e%f/ü (1)!.txt",
      body,
      mimetype: "text/plain; charset=utf-8",
      cacheControl: "max-age=3600",
      userMetadata: { owner: "ops", nested: { n: 1 } },
    }]);
    const url = `${base}/object/authenticated/${objectPath("docs", seeded.name)}`;

    await stack.step(t, "rows carry storage-api's columns and metadata keys", async () => {
      const [row] = await sql`
        select id::text, version, metadata, user_metadata, path_tokens from storage.objects
        where bucket_id = 'docs' and name = ${seeded.name}`;
      assert.equal(row.id, seeded.id);
      assert.equal(row.version, seeded.version);
      assert.deepEqual(Object.keys(row.metadata).sort(), [
        "cacheControl",
        "contentLength",
        "eTag",
        "httpStatusCode",
        "lastModified",
        "mimetype",
        "size",
      ]);
      assert.equal(row.metadata.eTag, `"${createHash("md5").update(body).digest("hex")}"`);
      assert.equal(row.metadata.size, 20);
      assert.deepEqual(row.user_metadata, { owner: "ops", nested: { n: 1 } });
      assert.deepEqual(row.path_tokens, ["a b", "c?d#e%f", "ü (1)!.txt"]);
    });

    await stack.step(t, "the bucket list needs the service role key", async () => {
      const ok = await fetch(`${base}/bucket`, { headers: service });
      assert.equal(ok.status, 200);
      const ids = (await ok.json()).map((b: { id: string }) => b.id).sort();
      assert.deepEqual(ids, ["docs", "lake", "pics"]);
      const bad = await fetch(`${base}/bucket`, { headers: { authorization: "Bearer nope" } });
      assert.equal(bad.status, 400);
      assert.equal((await bad.json()).statusCode, "403");
    });

    await stack.step(t, "a download returns the bytes and the stored headers", async () => {
      const res = await fetch(url, { headers: service });
      assert.equal(res.status, 200);
      assert.deepEqual(new Uint8Array(await res.arrayBuffer()), body);
      assert.equal(res.headers.get("content-type"), "text/plain; charset=utf-8");
      assert.equal(res.headers.get("cache-control"), "max-age=3600");
      assert.equal(res.headers.get("etag"), `"${seeded.md5}"`);
      assert.equal(res.headers.get("content-length"), "20");
      assert.equal(res.headers.get("accept-ranges"), "bytes");
      const head = await fetch(url, { method: "HEAD", headers: service });
      assert.equal(head.status, 200);
      assert.equal(head.headers.get("content-length"), "20");
      assert.equal((await head.arrayBuffer()).byteLength, 0);
    });

    await stack.step(t, "single ranges answer 206 with Content-Range; bad ones 416", async () => {
      const get = (range: string) => fetch(url, { headers: { ...service, range } });
      const cases: [string, number, string, string][] = [
        ["bytes=2-5", 206, "2345", "bytes 2-5/20"],
        ["bytes=15-", 206, "fghij", "bytes 15-19/20"],
        ["bytes=-3", 206, "hij", "bytes 17-19/20"],
        ["bytes=18-99", 206, "ij", "bytes 18-19/20"],
      ];
      for (const [range, status, text, contentRange] of cases) {
        const res = await get(range);
        assert.equal(res.status, status, range);
        assert.equal(await res.text(), text, range);
        assert.equal(res.headers.get("content-range"), contentRange, range);
      }
      const out = await get("bytes=20-");
      assert.equal(out.status, 416);
      assert.equal(out.headers.get("content-range"), "bytes */20");
      await out.body?.cancel();
      const multi = await get("bytes=0-1,3-4");
      assert.equal(multi.status, 200, "multiple ranges are not supported: the whole object");
      assert.equal((await multi.arrayBuffer()).byteLength, 20);
    });

    await stack.step(t, "object info, public objects and storage-api's error shape", async () => {
      const info = await fetch(
        `${base}/object/info/authenticated/${objectPath("docs", seeded.name)}`,
        { headers: service },
      );
      assert.equal(info.status, 200);
      const j = await info.json();
      assert.equal(j.size, 20);
      assert.equal(j.etag, `"${seeded.md5}"`);
      assert.equal(j.content_type, "text/plain; charset=utf-8");
      assert.deepEqual(j.metadata, { owner: "ops", nested: { n: 1 } });
      const missing = await fetch(`${base}/object/authenticated/docs/nope.txt`, {
        headers: service,
      });
      assert.equal(missing.status, 400);
      assert.deepEqual(await missing.json(), {
        statusCode: "404",
        error: "not_found",
        message: "Object not found",
      });
      const noKey = await fetch(url);
      assert.equal(noKey.status, 400);
      assert.equal((await noKey.json()).statusCode, "404");
      await st.seed([{ bucket: "pics", name: "cat.png", body: "meow", mimetype: "image/png" }]);
      const pub = await fetch(`${base}/object/public/pics/cat.png`);
      assert.equal(pub.status, 200);
      assert.equal(await pub.text(), "meow");
    });

    await stack.step(
      t,
      "re-seeding a name is an upsert: same id, new version, old file gone",
      async () => {
        const [again] = await st.seed([{ bucket: "docs", name: seeded.name, body: "new" }]);
        assert.equal(again.id, seeded.id);
        assert.notEqual(again.version, seeded.version);
        await assert.rejects(() => Deno.stat(seeded.path));
        assert.equal(new TextDecoder().decode(await st.read("docs", seeded.name)), "new");
        await st.remove("docs", seeded.name);
        const [{ n }] =
          await sql`select count(*)::int as n from storage.objects where name = ${seeded.name}`;
        assert.equal(n, 0);
      },
    );

    await stack.step(
      t,
      "faults: error status, cut connection, corrupted byte, ignored range",
      async () => {
        const [obj] = await st.seed([{ bucket: "docs", name: "f/x.bin", size: 300_000 }]);
        const u = `${base}/object/authenticated/docs/f/x.bin`;
        st.addFault({ bucket: "docs", name: "f/x.bin", kind: "status", status: 503, times: 1 });
        const failed = await fetch(u, { headers: service });
        assert.equal(failed.status, 503);
        await failed.body?.cancel();
        const healed = await fetch(u, { headers: service });
        assert.equal(healed.status, 200);
        assert.equal(
          createHash("md5").update(new Uint8Array(await healed.arrayBuffer())).digest("hex"),
          obj.md5,
        );

        st.addFault({ name: "f/x.bin", kind: "cut", afterBytes: 100_000, times: 1 });
        const cut = await fetch(u, { headers: service });
        let got = 0;
        await assert.rejects(async () => {
          for await (const chunk of cut.body!) got += chunk.length;
        });
        assert.equal(got, 100_000);

        st.addFault({ name: "f/x.bin", kind: "corrupt", at: 5, times: 1 });
        const bad = new Uint8Array(await (await fetch(u, { headers: service })).arrayBuffer());
        const good = await st.read("docs", "f/x.bin");
        assert.equal(bad[5], good[5] ^ 0xff);
        assert.deepEqual(bad.subarray(6), good.subarray(6));

        st.addFault({ name: "f/x.bin", kind: "ignore_range", times: 1 });
        const ignored = await fetch(u, { headers: { ...service, range: "bytes=10-" } });
        assert.equal(ignored.status, 200);
        assert.equal((await ignored.arrayBuffer()).byteLength, 300_000);
        const log = st.requests.filter((r) => r.name === "f/x.bin").map((r) => r.status);
        assert.deepEqual(log, [503, 200, 200, 200, 200]);
      },
    );
  });
});
