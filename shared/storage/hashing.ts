/**
 * Hashes whose state can be saved and restored. Native hashes (node:crypto) are the fastest but
 * their state cannot leave the process, so they are used for objects copied within one
 * invocation; an object that spans invocations is hashed with these, and their state is stored in
 * the manifest with every part, so the next invocation continues the same SHA-256 and MD5.
 *
 * Both run in WebAssembly (hash-wasm, whose hasher state can be saved). A state saved by another
 * hash-wasm version (its layout is that version's) is refused by `canRestore`, and the object is
 * then hashed again from its first byte. Checked against node:crypto in the unit tests.
 */
import { createHash } from "node:crypto";
import { createMD5, createSHA256, type IHasher } from "hash-wasm";

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

/** The engine tag stored with a hash state: its layout belongs to this version. */
export const WASM_ENGINE = "hash-wasm@4.13.0";

/** Saved state of a resumable hash: hash-wasm's state bytes (base64) and the length hashed. */
export interface SavedHash {
  algorithm: "sha256" | "md5";
  engine: string;
  state: string;
  length: number;
}

export class ResumableHash implements StreamHash {
  readonly algorithm: "sha256" | "md5";
  readonly #hasher: IHasher;
  #length: number;

  private constructor(algorithm: "sha256" | "md5", hasher: IHasher, length: number) {
    this.algorithm = algorithm;
    this.#hasher = hasher;
    this.#length = length;
  }

  static async create(algorithm: "sha256" | "md5"): Promise<ResumableHash> {
    const h = algorithm === "sha256" ? await createSHA256() : await createMD5();
    h.init();
    return new ResumableHash(algorithm, h, 0);
  }

  /** Continues a saved state; refuses another algorithm's, another engine's or a corrupt one. */
  static async restore(saved: SavedHash, algorithm: "sha256" | "md5"): Promise<ResumableHash> {
    if (saved?.algorithm !== algorithm) {
      throw new Error(`the saved state is not ${algorithm}`);
    }
    if (!canRestore(saved)) {
      throw new Error(
        `a ${algorithm} state saved by ${saved.engine} cannot be restored by ${WASM_ENGINE}`,
      );
    }
    if (!Number.isSafeInteger(saved.length) || saved.length < 0) {
      throw new Error("the saved state is corrupt (length)");
    }
    const h = await ResumableHash.create(algorithm);
    try {
      h.#hasher.load(fromBase64(saved.state));
    } catch (e) {
      throw new Error(`the saved state is corrupt (${e instanceof Error ? e.message : e})`);
    }
    h.#length = saved.length;
    return h;
  }

  update(data: Uint8Array): void {
    this.#hasher.update(data);
    this.#length += data.length;
  }

  hex(): string {
    return this.#hasher.digest("hex");
  }

  save(): SavedHash {
    return {
      algorithm: this.algorithm,
      engine: WASM_ENGINE,
      state: toBase64(this.#hasher.save()),
      length: this.#length,
    };
  }
}

/** Whether this build can continue a saved state (states of older builds are not). */
export function canRestore(saved: SavedHash | undefined): boolean {
  return saved?.engine === WASM_ENGINE && typeof saved.state === "string";
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
