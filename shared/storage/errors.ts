/** Errors of one object's copy, classified for retry and for stopping a chunk. */

/**
 * `object`: this object only (retried with backoff, or failed for good when not transient).
 * `storage` / `s3`: the dependency as a whole is unusable (down, or rejects our credentials):
 * the chunk stops and answers 503 without counting an attempt against any object.
 * `interrupted`: the chunk was stopped while this object was in flight (not the object's fault).
 */
export type ErrorScope = "object" | "storage" | "s3" | "interrupted";

export class CopyError extends Error {
  readonly code: string;
  readonly transient: boolean;
  readonly scope: ErrorScope;

  constructor(code: string, message: string, transient: boolean, scope: ErrorScope = "object") {
    super(message);
    this.name = "CopyError";
    this.code = code;
    this.transient = transient;
    this.scope = scope;
  }
}

/** True for fetch / socket failures that mean "nothing is listening" or "no route". */
export function isConnectFailure(e: unknown): boolean {
  const text = `${e instanceof Error ? e.message : String(e)} ${
    (e as { code?: unknown })?.code ?? ""
  } ${(e as { cause?: { code?: unknown; message?: unknown } })?.cause?.code ?? ""} ${
    (e as { cause?: { message?: unknown } })?.cause?.message ?? ""
  }`;
  return /ECONNREFUSED|Connection refused|ENOTFOUND|EAI_AGAIN|failed to lookup|dns error|EHOSTUNREACH|No route to host|ConnectionRefused|certificate|tls handshake/i
    .test(text);
}

export function isAbortError(e: unknown): boolean {
  return e instanceof DOMException && (e.name === "AbortError" || e.name === "TimeoutError") ||
    (e instanceof Error && (e.name === "AbortError" || e.name === "TimeoutError"));
}

export function errorText(e: unknown): string {
  const text = e instanceof Error ? e.message : String(e);
  return text.length > 500 ? `${text.slice(0, 500)}…` : text;
}

export const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
