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
  restoreHash,
  restoreSha256,
  ResumableMd5,
  ResumableSha256,
  WASM_ENGINE,
  WasmSha256,
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

Deno.test("resumable SHA-256 and MD5 equal node:crypto around every block and padding boundary", () => {
  const data = bytes(300);
  for (let n = 0; n <= 260; n++) {
    const s = new ResumableSha256();
    s.update(data.subarray(0, n));
    assert.equal(s.hex(), ref("sha256", data.subarray(0, n)), `sha256 of ${n} bytes`);
    const m = new ResumableMd5();
    m.update(data.subarray(0, n));
    assert.equal(m.hex(), ref("md5", data.subarray(0, n)), `md5 of ${n} bytes`);
  }
});

Deno.test("a hash saved as JSON and restored mid-stream continues to the same digest", () => {
  const data = bytes(3 * 1024 * 1024 + 77, 42);
  let seed = 7;
  const rand = (max: number) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % max;
  };
  for (let trial = 0; trial < 10; trial++) {
    let sha = new ResumableSha256();
    let md5 = new ResumableMd5();
    let off = 0;
    while (off < data.length) {
      const n = Math.min(data.length - off, 1 + rand(700_000));
      sha.update(data.subarray(off, off + n));
      md5.update(data.subarray(off, off + n));
      off += n;
      // What the manifest stores between invocations.
      sha = restoreHash(JSON.parse(JSON.stringify(sha.save()))) as ResumableSha256;
      md5 = restoreHash(JSON.parse(JSON.stringify(md5.save()))) as ResumableMd5;
    }
    assert.equal(sha.hex(), ref("sha256", data));
    assert.equal(md5.hex(), ref("md5", data));
  }
});

Deno.test("the WebAssembly SHA-256, saved as JSON and restored at random points, equals node:crypto", async () => {
  const data = bytes(3 * 1024 * 1024 + 77, 43);
  for (let n = 0; n <= 130; n++) {
    const h = await WasmSha256.create();
    h.update(data.subarray(0, n));
    assert.equal(h.hex(), ref("sha256", data.subarray(0, n)), `sha256 of ${n} bytes`);
  }
  let seed = 11;
  const rand = (max: number) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % max;
  };
  for (let trial = 0; trial < 10; trial++) {
    let sha = await WasmSha256.create();
    let off = 0;
    while (off < data.length) {
      const n = Math.min(data.length - off, 1 + rand(700_000));
      sha.update(data.subarray(off, off + n));
      off += n;
      const saved = JSON.parse(JSON.stringify(sha.save()));
      assert.equal(saved.engine, WASM_ENGINE);
      assert.equal(saved.length, off);
      sha = await WasmSha256.restore(saved);
    }
    assert.equal(sha.hex(), ref("sha256", data));
  }
});

Deno.test("states of either SHA-256 implementation continue; another wasm version's is refused", async () => {
  const data = bytes(200_000, 5);
  const js = new ResumableSha256();
  js.update(data.subarray(0, 70_001));
  const fromJs = await restoreSha256(JSON.parse(JSON.stringify(js.save())));
  fromJs.update(data.subarray(70_001));
  assert.equal(fromJs.hex(), ref("sha256", data));

  const wasm = await WasmSha256.create();
  wasm.update(data.subarray(0, 99));
  const saved = wasm.save();
  assert.ok(canRestore(saved));
  const other = { ...saved, engine: "hash-wasm@0.0.1" };
  assert.equal(canRestore(other), false);
  await assert.rejects(() => restoreSha256(other), /cannot be restored/);
});

Deno.test("a corrupt or foreign saved state is refused", () => {
  const s = new ResumableSha256();
  s.update(bytes(100));
  const state = s.save();
  assert.throws(() => ResumableMd5.restore(state), /not md5/);
  assert.throws(
    () => ResumableSha256.restore({ ...state, pending: hexToBase64("00".repeat(64)) }),
    /corrupt/,
  );
  assert.throws(() => ResumableSha256.restore({ ...state, length: -1 }), /corrupt/);
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
