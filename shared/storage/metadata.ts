/**
 * Object metadata at the destination. Content-Type and Cache-Control are copied verbatim from
 * `metadata.mimetype` / `metadata.cacheControl` (no `max-age=` prefixing). S3 user metadata must
 * be header-safe ASCII and at most 2 KB in all, so:
 *
 *   * Supabase's row facts go to `x-amz-meta-supabase-*` (id, version, created/updated times,
 *     lastModified, source eTag, owner, and for single-PUT objects the SHA-256);
 *   * user_metadata that is a flat object of plain ASCII strings with lowercase token keys is
 *     written as one `x-amz-meta-<key>` per pair ("headers");
 *   * anything else (nested values, numbers, non-ASCII, upper-case keys) is written losslessly as
 *     `x-amz-meta-supabase-user-metadata` = base64url of the jsonb text ("encoded");
 *   * what does not fit the 2 KB stays in the manifest only, and the object says so with
 *     `x-amz-meta-supabase-user-metadata-location: manifest` ("manifest"). Never silently dropped.
 *
 * The mode is decided once, at snapshot time, and reported in the plan.
 */

/** AWS: user-defined metadata in a PUT is at most 2 KB (keys and values, UTF-8 bytes). */
export const S3_METADATA_LIMIT = 2048;
const META_PREFIX = "x-amz-meta-";
const PLAIN_KEY = /^[a-z0-9][a-z0-9._-]{0,99}$/;
const PLAIN_VALUE = /^[\x21-\x7e](?:[\x20-\x7e]{0,1022}[\x21-\x7e])?$/;
/** A SHA-256 hex is always 64 characters: its slot is reserved so the mode never depends on it. */
const SHA256_SLOT = "f".repeat(64);

export type UserMetadataMode = "none" | "headers" | "encoded" | "manifest";

/** The facts of one manifest row that travel as metadata. */
export interface ObjectFacts {
  objectId: string | null;
  version: string | null;
  createdAt: string | null;
  updatedAt: string | null;
  lastModified: string | null;
  sourceEtag: string | null;
  ownerId: string | null;
  /** user_metadata as Postgres' jsonb text (exact, numbers included), or null. */
  userMetadataText: string | null;
}

export function base64url(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

export function fromBase64url(text: string): Uint8Array {
  const b64 = text.replaceAll("-", "+").replaceAll("_", "/");
  const s = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

const utf8 = new TextEncoder();
const bytes = (s: string) => utf8.encode(s).length;

/** A header-safe value: printable ASCII, no surrounding spaces. */
export function isPlainValue(v: unknown): v is string {
  return typeof v === "string" && PLAIN_VALUE.test(v);
}

function headerValue(v: string | null): string | undefined {
  if (v === null || v === undefined) return undefined;
  const trimmed = String(v);
  return isPlainValue(trimmed) ? trimmed : undefined;
}

/** The `x-amz-meta-supabase-*` facts (without the prefix, as the SDK's Metadata map wants). */
export function factHeaders(facts: ObjectFacts, sha256?: string): Record<string, string> {
  const out: Record<string, string> = {};
  const put = (k: string, v: string | null | undefined) => {
    const value = headerValue(v ?? null);
    if (value !== undefined) out[k] = value;
  };
  put("supabase-id", facts.objectId);
  put("supabase-version", facts.version);
  put("supabase-created-at", facts.createdAt);
  put("supabase-updated-at", facts.updatedAt);
  put("supabase-last-modified", facts.lastModified);
  put("supabase-etag", facts.sourceEtag?.replaceAll('"', "") ?? null);
  put("supabase-owner-id", facts.ownerId);
  if (sha256) put("supabase-sha256", sha256);
  return out;
}

function metadataBytes(m: Record<string, string>): number {
  let n = 0;
  for (const [k, v] of Object.entries(m)) n += bytes(META_PREFIX + k) + bytes(v);
  return n;
}

function parseUserMetadata(text: string | null): unknown {
  if (text === null) return null;
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** Plain pairs, when user_metadata is a flat object of header-safe strings under token keys. */
function plainPairs(value: unknown): Record<string, string> | undefined {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return undefined;
  const entries = Object.entries(value as Record<string, unknown>);
  if (entries.length === 0) return undefined;
  const out: Record<string, string> = {};
  for (const [k, v] of entries) {
    if (!PLAIN_KEY.test(k) || k.startsWith("supabase-") || !isPlainValue(v)) return undefined;
    out[k] = v;
  }
  return out;
}

function isEmpty(text: string | null): boolean {
  if (text === null) return true;
  const v = parseUserMetadata(text);
  return v === null ||
    (typeof v === "object" && !Array.isArray(v) && Object.keys(v as object).length === 0);
}

/** Decides how user_metadata travels (see the module comment). */
export function userMetadataMode(facts: ObjectFacts): UserMetadataMode {
  if (isEmpty(facts.userMetadataText)) return "none";
  const base = metadataBytes(factHeaders(facts, SHA256_SLOT));
  const plain = plainPairs(parseUserMetadata(facts.userMetadataText));
  if (plain && base + metadataBytes(plain) <= S3_METADATA_LIMIT) return "headers";
  const encoded = {
    "supabase-user-metadata": base64url(utf8.encode(facts.userMetadataText!)),
  };
  if (base + metadataBytes(encoded) <= S3_METADATA_LIMIT) return "encoded";
  return "manifest";
}

/** The Metadata map for PutObject / CreateMultipartUpload. */
export function buildMetadata(
  facts: ObjectFacts,
  mode: UserMetadataMode,
  sha256?: string,
): Record<string, string> {
  const out = factHeaders(facts, sha256);
  if (mode === "headers") {
    Object.assign(out, plainPairs(parseUserMetadata(facts.userMetadataText)) ?? {});
  } else if (mode === "encoded") {
    out["supabase-user-metadata"] = base64url(utf8.encode(facts.userMetadataText!));
  } else if (mode === "manifest") {
    out["supabase-user-metadata-location"] = "manifest";
  }
  return out;
}

/**
 * Reads user metadata back from a destination object's Metadata map: the parsed value, `null`
 * when there is none, or "manifest" when it is kept in the manifest only.
 */
export function decodeUserMetadata(metadata: Record<string, string>): unknown | "manifest" {
  if (metadata["supabase-user-metadata-location"] === "manifest") return "manifest";
  const blob = metadata["supabase-user-metadata"];
  if (blob !== undefined) return JSON.parse(new TextDecoder().decode(fromBase64url(blob)));
  const pairs: Record<string, string> = {};
  for (const [k, v] of Object.entries(metadata)) if (!k.startsWith("supabase-")) pairs[k] = v;
  return Object.keys(pairs).length ? pairs : null;
}

/** A header-safe Content-Type / Cache-Control, or undefined when it cannot be sent as is. */
export function systemHeader(value: string | null): string | undefined {
  if (value === null || value === undefined || value === "") return undefined;
  return /^[\x20-\x7e]+$/.test(value) && value.trim() === value ? value : undefined;
}
