/**
 * Hashes whose state can be saved and restored. Native hashes (node:crypto) are several times
 * faster but their state cannot leave the process, so they are used for objects copied within one
 * invocation; an object that spans invocations is hashed with these, and their state is stored in
 * the manifest with every part, so the next invocation continues the same SHA-256 and MD5.
 *
 * SHA-256 runs in WebAssembly (hash-wasm, whose hasher state can be saved): about 4x less CPU
 * than the TypeScript implementation below, which remains for MD5 (already cheap in TypeScript)
 * and to restore states saved by it. A state saved by another hash-wasm version is refused
 * (`canRestore`), and the object is then hashed again from its first byte.
 *
 * All follow FIPS 180-4 and RFC 1321 and are checked against node:crypto in the unit tests.
 */
import { createHash } from "node:crypto";
import { createSHA256, type IHasher } from "hash-wasm";

/** A streaming hash: the native one or a resumable one, same interface. */
export interface StreamHash {
  update(data: Uint8Array): void;
  /** Final digest as lowercase hex. The hash cannot be updated afterwards. */
  hex(): string;
}

export function nativeHash(algorithm: "sha256" | "md5"): StreamHash {
  const h = createHash(algorithm);
  return {
    update: (data) => void h.update(data),
    hex: () => h.digest("hex"),
  };
}

// Int32Array, not Uint32Array: values stay small integers in V8 instead of heap numbers.
const K256 = new Int32Array([
  0x428a2f98,
  0x71374491,
  0xb5c0fbcf,
  0xe9b5dba5,
  0x3956c25b,
  0x59f111f1,
  0x923f82a4,
  0xab1c5ed5,
  0xd807aa98,
  0x12835b01,
  0x243185be,
  0x550c7dc3,
  0x72be5d74,
  0x80deb1fe,
  0x9bdc06a7,
  0xc19bf174,
  0xe49b69c1,
  0xefbe4786,
  0x0fc19dc6,
  0x240ca1cc,
  0x2de92c6f,
  0x4a7484aa,
  0x5cb0a9dc,
  0x76f988da,
  0x983e5152,
  0xa831c66d,
  0xb00327c8,
  0xbf597fc7,
  0xc6e00bf3,
  0xd5a79147,
  0x06ca6351,
  0x14292967,
  0x27b70a85,
  0x2e1b2138,
  0x4d2c6dfc,
  0x53380d13,
  0x650a7354,
  0x766a0abb,
  0x81c2c92e,
  0x92722c85,
  0xa2bfe8a1,
  0xa81a664b,
  0xc24b8b70,
  0xc76c51a3,
  0xd192e819,
  0xd6990624,
  0xf40e3585,
  0x106aa070,
  0x19a4c116,
  0x1e376c08,
  0x2748774c,
  0x34b0bcb5,
  0x391c0cb3,
  0x4ed8aa4a,
  0x5b9cca4f,
  0x682e6ff3,
  0x748f82ee,
  0x78a5636f,
  0x84c87814,
  0x8cc70208,
  0x90befffa,
  0xa4506ceb,
  0xbef9a3f7,
  0xc67178f2,
]);

/** Saved state of a resumable hash: words, pending bytes (base64) and total length. */
export interface HashState {
  algorithm: "sha256" | "md5";
  words: number[];
  pending: string;
  length: number;
}

abstract class BlockHash implements StreamHash {
  protected readonly block = new Uint8Array(64);
  protected blockLength = 0;
  protected length = 0;
  protected abstract readonly words: Int32Array;
  abstract readonly algorithm: "sha256" | "md5";
  protected abstract compress(data: Uint8Array, offset: number): void;

  /** `count` consecutive blocks; subclasses may override with a tighter loop. */
  protected compressBlocks(data: Uint8Array, offset: number, count: number): void {
    for (let i = 0; i < count; i++) this.compress(data, offset + i * 64);
  }
  protected abstract final(): Uint8Array;

  update(data: Uint8Array): void {
    let offset = 0;
    this.length += data.length;
    if (this.blockLength > 0) {
      const take = Math.min(64 - this.blockLength, data.length);
      this.block.set(data.subarray(0, take), this.blockLength);
      this.blockLength += take;
      offset = take;
      if (this.blockLength < 64) return;
      this.compress(this.block, 0);
      this.blockLength = 0;
    }
    const blocks = (data.length - offset) >>> 6;
    if (blocks > 0) {
      this.compressBlocks(data, offset, blocks);
      offset += blocks * 64;
    }
    if (offset < data.length) {
      this.block.set(data.subarray(offset), 0);
      this.blockLength = data.length - offset;
    }
  }

  hex(): string {
    return Array.from(this.final(), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  /** The state to store; `restore` continues from it. */
  save(): HashState {
    return {
      algorithm: this.algorithm,
      // Unsigned in the saved form, whatever the typed array's sign.
      words: Array.from(this.words, (w) => w >>> 0),
      pending: toBase64(this.block.subarray(0, this.blockLength)),
      length: this.length,
    };
  }

  protected load(state: HashState): void {
    if (state.algorithm !== this.algorithm || state.words.length !== this.words.length) {
      throw new Error(`Saved hash state is not ${this.algorithm}.`);
    }
    this.words.set(state.words.map((w) => w | 0));
    const pending = fromBase64(state.pending);
    if (pending.length >= 64 || !Number.isSafeInteger(state.length) || state.length < 0) {
      throw new Error("Saved hash state is corrupt.");
    }
    this.block.set(pending, 0);
    this.blockLength = pending.length;
    this.length = state.length;
  }

  /** Padding shared by both: 0x80, zeros, then the bit length (big- or little-endian). */
  protected pad(bigEndian: boolean): void {
    const bitsHigh = Math.floor(this.length / 0x20000000);
    const bitsLow = (this.length * 8) >>> 0;
    const b = this.block;
    b[this.blockLength++] = 0x80;
    if (this.blockLength > 56) {
      b.fill(0, this.blockLength);
      this.compress(b, 0);
      this.blockLength = 0;
    }
    b.fill(0, this.blockLength, 56);
    const view = new DataView(b.buffer, b.byteOffset, 64);
    if (bigEndian) {
      view.setUint32(56, bitsHigh, false);
      view.setUint32(60, bitsLow, false);
    } else {
      view.setUint32(56, bitsLow, true);
      view.setUint32(60, bitsHigh, true);
    }
    this.compress(b, 0);
  }
}

export class ResumableSha256 extends BlockHash {
  readonly algorithm = "sha256" as const;
  protected readonly words = new Int32Array([
    0x6a09e667,
    0xbb67ae85,
    0x3c6ef372,
    0xa54ff53a,
    0x510e527f,
    0x9b05688c,
    0x1f83d9ab,
    0x5be0cd19,
  ]);
  readonly #w = new Int32Array(64);

  static restore(state: HashState): ResumableSha256 {
    const h = new ResumableSha256();
    h.load(state);
    return h;
  }

  protected compress(d: Uint8Array, o: number): void {
    sha256Blocks(this.words, this.#w, d, o, 1);
  }

  protected override compressBlocks(d: Uint8Array, o: number, count: number): void {
    sha256Blocks(this.words, this.#w, d, o, count);
  }

  protected final(): Uint8Array {
    this.pad(true);
    const out = new Uint8Array(32);
    const view = new DataView(out.buffer);
    for (let i = 0; i < 8; i++) view.setUint32(i * 4, this.words[i], false);
    return out;
  }
}

/** The SHA-256 compression function over `count` blocks, state kept in locals between blocks. */
function sha256Blocks(h: Int32Array, w: Int32Array, d: Uint8Array, o: number, count: number): void {
  let h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3], h4 = h[4], h5 = h[5], h6 = h[6], h7 = h[7];
  for (let blk = 0; blk < count; blk++, o += 64) {
    for (let i = 0; i < 16; i++) {
      const j = o + i * 4;
      w[i] = (d[j] << 24) | (d[j + 1] << 16) | (d[j + 2] << 8) | d[j + 3];
    }
    for (let i = 16; i < 64; i++) {
      const a = w[i - 15];
      const b = w[i - 2];
      const s0 = ((a >>> 7) | (a << 25)) ^ ((a >>> 18) | (a << 14)) ^ (a >>> 3);
      const s1 = ((b >>> 17) | (b << 15)) ^ ((b >>> 19) | (b << 13)) ^ (b >>> 10);
      // Pairwise "| 0" keeps every intermediate an int32 (no float arithmetic in V8).
      w[i] = (((w[i - 16] + s0) | 0) + ((w[i - 7] + s1) | 0)) | 0;
    }
    let a = h0, b = h1, c = h2, dd = h3, e = h4, f = h5, g = h6, hh = h7;
    for (let i = 0; i < 64; i++) {
      const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
      const ch = (e & f) ^ (~e & g);
      const t1 = (((hh + S1) | 0) + ((((ch + K256[i]) | 0) + w[i]) | 0)) | 0;
      const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
      const maj = (a & b) ^ (a & c) ^ (b & c);
      const t2 = (S0 + maj) | 0;
      hh = g;
      g = f;
      f = e;
      e = (dd + t1) | 0;
      dd = c;
      c = b;
      b = a;
      a = (t1 + t2) | 0;
    }
    h0 = (h0 + a) | 0;
    h1 = (h1 + b) | 0;
    h2 = (h2 + c) | 0;
    h3 = (h3 + dd) | 0;
    h4 = (h4 + e) | 0;
    h5 = (h5 + f) | 0;
    h6 = (h6 + g) | 0;
    h7 = (h7 + hh) | 0;
  }
  h[0] = h0;
  h[1] = h1;
  h[2] = h2;
  h[3] = h3;
  h[4] = h4;
  h[5] = h5;
  h[6] = h6;
  h[7] = h7;
}

const S_MD5 = [
  7,
  12,
  17,
  22,
  7,
  12,
  17,
  22,
  7,
  12,
  17,
  22,
  7,
  12,
  17,
  22,
  5,
  9,
  14,
  20,
  5,
  9,
  14,
  20,
  5,
  9,
  14,
  20,
  5,
  9,
  14,
  20,
  4,
  11,
  16,
  23,
  4,
  11,
  16,
  23,
  4,
  11,
  16,
  23,
  4,
  11,
  16,
  23,
  6,
  10,
  15,
  21,
  6,
  10,
  15,
  21,
  6,
  10,
  15,
  21,
  6,
  10,
  15,
  21,
];
const K_MD5 = new Int32Array(64).map((_, i) => Math.floor(Math.abs(Math.sin(i + 1)) * 2 ** 32) | 0);

export class ResumableMd5 extends BlockHash {
  readonly algorithm = "md5" as const;
  protected readonly words = new Int32Array([0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476]);
  readonly #m = new Int32Array(16);

  static restore(state: HashState): ResumableMd5 {
    const h = new ResumableMd5();
    h.load(state);
    return h;
  }

  protected compress(d: Uint8Array, o: number): void {
    const m = this.#m;
    for (let i = 0; i < 16; i++) {
      const j = o + i * 4;
      m[i] = d[j] | (d[j + 1] << 8) | (d[j + 2] << 16) | (d[j + 3] << 24);
    }
    const h = this.words;
    let a = h[0] | 0, b = h[1] | 0, c = h[2] | 0, dd = h[3] | 0;
    for (let i = 0; i < 64; i++) {
      let f: number;
      let g: number;
      if (i < 16) {
        f = (b & c) | (~b & dd);
        g = i;
      } else if (i < 32) {
        f = (dd & b) | (~dd & c);
        g = (5 * i + 1) & 15;
      } else if (i < 48) {
        f = b ^ c ^ dd;
        g = (3 * i + 5) & 15;
      } else {
        f = c ^ (b | ~dd);
        g = (7 * i) & 15;
      }
      const tmp = dd;
      dd = c;
      c = b;
      const x = (((a + f) | 0) + ((K_MD5[i] + m[g]) | 0)) | 0;
      b = (b + ((x << S_MD5[i]) | (x >>> (32 - S_MD5[i])))) | 0;
      a = tmp;
    }
    h[0] = (h[0] + a) | 0;
    h[1] = (h[1] + b) | 0;
    h[2] = (h[2] + c) | 0;
    h[3] = (h[3] + dd) | 0;
  }

  protected final(): Uint8Array {
    this.pad(false);
    const out = new Uint8Array(16);
    const view = new DataView(out.buffer);
    for (let i = 0; i < 4; i++) view.setUint32(i * 4, this.words[i], true);
    return out;
  }
}

/** The engine tag stored with a WebAssembly hash state: its layout belongs to this version. */
export const WASM_ENGINE = "hash-wasm@4.13.0";

/** Saved state of the WebAssembly SHA-256: hash-wasm's state bytes (base64) and total length. */
export interface WasmHashState {
  algorithm: "sha256";
  engine: string;
  state: string;
  length: number;
}

/** What the manifest stores for a resumable SHA-256: either implementation's state. */
export type SavedSha256 = HashState | WasmHashState;

export class WasmSha256 implements StreamHash {
  readonly #hasher: IHasher;
  #length: number;

  private constructor(hasher: IHasher, length: number) {
    this.#hasher = hasher;
    this.#length = length;
  }

  static async create(): Promise<WasmSha256> {
    const h = await createSHA256();
    h.init();
    return new WasmSha256(h, 0);
  }

  static async restore(saved: WasmHashState): Promise<WasmSha256> {
    if (saved.engine !== WASM_ENGINE) {
      throw new Error(
        `a SHA-256 state saved by ${saved.engine} cannot be restored by ${WASM_ENGINE}`,
      );
    }
    const h = await createSHA256();
    h.init();
    h.load(fromBase64(saved.state));
    return new WasmSha256(h, saved.length);
  }

  update(data: Uint8Array): void {
    this.#hasher.update(data);
    this.#length += data.length;
  }

  hex(): string {
    return this.#hasher.digest("hex");
  }

  save(): WasmHashState {
    return {
      algorithm: "sha256",
      engine: WASM_ENGINE,
      state: toBase64(this.#hasher.save()),
      length: this.#length,
    };
  }
}

/** Whether this build can continue a saved SHA-256 state. */
export function canRestore(saved: SavedSha256): boolean {
  return !("engine" in saved) || saved.engine === WASM_ENGINE;
}

/** Continues a saved SHA-256 with the implementation that saved it. */
export async function restoreSha256(
  saved: SavedSha256,
): Promise<StreamHash & { save(): SavedSha256 }> {
  return "engine" in saved ? await WasmSha256.restore(saved) : ResumableSha256.restore(saved);
}

export function restoreHash(state: HashState): ResumableSha256 | ResumableMd5 {
  return state.algorithm === "sha256"
    ? ResumableSha256.restore(state)
    : ResumableMd5.restore(state);
}

export function toBase64(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

export function fromBase64(text: string): Uint8Array {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

export function hexToBase64(hex: string): string {
  const bytes = new Uint8Array(hex.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(hex.slice(i * 2, i * 2 + 2), 16);
  return toBase64(bytes);
}

/** The ETag S3 gives a multipart object: md5 of the concatenated binary part md5s, then "-N". */
export function multipartEtag(partMd5Hex: string[]): string {
  const h = createHash("md5");
  for (const p of partMd5Hex) {
    const bytes = new Uint8Array(16);
    for (let i = 0; i < 16; i++) bytes[i] = parseInt(p.slice(i * 2, i * 2 + 2), 16);
    h.update(bytes);
  }
  return `${h.digest("hex")}-${partMd5Hex.length}`;
}
