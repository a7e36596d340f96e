/**
 * The resumable hashes: equal to node:crypto for every length around the block and padding
 * boundaries, and after being saved, serialised as JSON and restored at arbitrary split points
 * (which is what happens between two invocations). Plus the multipart ETag formula.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  canRestore,
  hexToBase64,
  multipartEtag,
  ResumableHash,
  WASM_ENGINE,
} from "../../../shared/storage/hashing.ts";

function bytes(n: number, seed = 1): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

const ref = (alg: "sha256" | "md5", data: Uint8Array) => createHash(alg).update(data).digest("hex");

for (const alg of ["sha256", "md5"] as const) {
  Deno.test(`resumable ${alg} equals node:crypto around every block and padding boundary`, async () => {
    const data = bytes(300);
    for (let n = 0; n <= 260; n++) {
      const h = await ResumableHash.create(alg);
      h.update(data.subarray(0, n));
      assert.equal(h.hex(), ref(alg, data.subarray(0, n)), `${alg} of ${n} bytes`);
    }
  });

  Deno.test(`resumable ${alg}, saved as JSON and restored at random points, continues to the same digest`, async () => {
    const data = bytes(3 * 1024 * 1024 + 77, 42);
    let seed = 7;
    const rand = (max: number) => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % max;
    };
    for (let trial = 0; trial < 10; trial++) {
      let h = await ResumableHash.create(alg);
      let off = 0;
      while (off < data.length) {
        const n = Math.min(data.length - off, 1 + rand(700_000));
        h.update(data.subarray(off, off + n));
        off += n;
        // What the manifest stores between invocations.
        const saved = JSON.parse(JSON.stringify(h.save()));
        assert.equal(saved.engine, WASM_ENGINE);
        assert.equal(saved.algorithm, alg);
        assert.equal(saved.length, off);
        h = await ResumableHash.restore(saved, alg);
      }
      assert.equal(h.hex(), ref(alg, data));
    }
  });
}

Deno.test("a state of another engine, another algorithm or a corrupt one is refused", async () => {
  const h = await ResumableHash.create("sha256");
  h.update(bytes(100));
  const saved = h.save();
  assert.ok(canRestore(saved));
  const other = { ...saved, engine: "hash-wasm@0.0.1" };
  assert.equal(canRestore(other), false);
  await assert.rejects(() => ResumableHash.restore(other, "sha256"), /cannot be restored/);
  // A state written by the TypeScript hashes of earlier development builds.
  const legacy = { algorithm: "sha256", words: [1, 2], pending: "", length: 3 };
  assert.equal(canRestore(legacy as never), false);
  assert.equal(canRestore(undefined), false);
  await assert.rejects(() => ResumableHash.restore(saved, "md5"), /not md5/);
  await assert.rejects(
    () => ResumableHash.restore({ ...saved, state: hexToBase64("00".repeat(7)) }, "sha256"),
    /corrupt/,
  );
  await assert.rejects(() => ResumableHash.restore({ ...saved, length: -1 }, "sha256"), /corrupt/);
});

Deno.test("the multipart ETag is the MD5 of the binary part MD5s with the part count", () => {
  const a = bytes(5 * 1024 * 1024, 3);
  const b = bytes(1000, 4);
  const parts = [ref("md5", a), ref("md5", b)];
  const joined = new Uint8Array(32);
  joined.set(Uint8Array.from(parts[0].match(/../g)!.map((h) => parseInt(h, 16))), 0);
  joined.set(Uint8Array.from(parts[1].match(/../g)!.map((h) => parseInt(h, 16))), 16);
  assert.equal(multipartEtag(parts), `${ref("md5", joined)}-2`);
  assert.equal(hexToBase64(ref("md5", b)), createHash("md5").update(b).digest("base64"));
});

Deno.test("the engine tag stored with hash states names the hash-wasm version the build imports", async () => {
  // Bumping hash-wasm without the tag would let a state of one layout be loaded by another.
  const url = new URL("../../../supabase/functions/deno.json", import.meta.url);
  const spec = String(JSON.parse(await Deno.readTextFile(url)).imports["hash-wasm"]);
  const version = /^npm:hash-wasm@([^/]+)$/.exec(spec)?.[1];
  assert.ok(version, spec);
  assert.equal(WASM_ENGINE, `hash-wasm@${version}`);
});
