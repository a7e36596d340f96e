/**
 * The S3 client factory. Checksums are a deliberate choice: the SDK's default (CRC32 on every
 * upload, validated on every download, since 3.729) breaks S3-compatible servers and costs CPU
 * in pure JS; the migrator computes and stores its own SHA-256/MD5 instead and asks for
 * checksums only where an operation requires one.
 *
 * Requests go through Deno's native fetch rather than the SDK's default node:http handler: under
 * Deno the node:http path copies every body several times (measured by bench/storage: about 3x the
 * CPU per MiB and peak memory far above the 256 MB Edge limit with 8 MiB parts in flight), and
 * fetch sends a Uint8Array body with its exact Content-Length.
 */
import { S3Client } from "@aws-sdk/client-s3";
import { Readable } from "node:stream";
import type { S3Config } from "../config/mod.ts";

interface SdkHttpRequest {
  method: string;
  protocol: string;
  hostname: string;
  port?: number;
  path: string;
  query?: Record<string, string | string[] | null>;
  headers: Record<string, string>;
  body?: unknown;
}

/** RFC 3986 encoding, as SigV4 canonicalises the query string. */
function escapeUri(v: string): string {
  return encodeURIComponent(v).replace(
    /[!'()*]/g,
    (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`,
  );
}

export function buildQueryString(query: Record<string, string | string[] | null>): string {
  const parts: string[] = [];
  for (const key of Object.keys(query).sort()) {
    const value = query[key];
    const k = escapeUri(key);
    if (Array.isArray(value)) { for (const v of value) parts.push(`${k}=${escapeUri(v)}`); }
    else parts.push(value === null || value === undefined ? k : `${k}=${escapeUri(value)}`);
  }
  return parts.join("&");
}

/** Gives fetch failures the error codes the SDK's retry strategy recognises. */
function networkError(e: unknown): Error {
  const err = e instanceof Error ? e : new Error(String(e));
  if (err.name === "AbortError" || err.name === "TimeoutError") return err;
  const text = `${err.message} ${(err as { cause?: { message?: string } }).cause?.message ?? ""}`;
  const code = /refused/i.test(text)
    ? "ECONNREFUSED"
    : /timed? ?out/i.test(text)
    ? "ETIMEDOUT"
    : /reset|closed|broken pipe|connection error|incomplete/i.test(text)
    ? "ECONNRESET"
    : undefined;
  if (code) Object.assign(err, { code });
  return err;
}

/** A smithy request handler on top of fetch (bodies: Uint8Array in, node Readable out). */
export class FetchRequestHandler {
  readonly metadata = { handlerProtocol: "http/1.1" };

  async handle(
    request: SdkHttpRequest,
    options: { abortSignal?: AbortSignal } = {},
  ): Promise<{ response: unknown }> {
    const query = request.query ? buildQueryString(request.query) : "";
    const url = `${request.protocol}//${request.hostname}${
      request.port ? `:${request.port}` : ""
    }${request.path}${query ? `?${query}` : ""}`;
    const headers = new Headers();
    for (const [k, v] of Object.entries(request.headers)) {
      // fetch sets Host and Content-Length itself; it cannot do 100-continue.
      const name = k.toLowerCase();
      if (name === "host" || name === "content-length" || name === "expect") continue;
      headers.set(k, v);
    }
    const body = request.method === "GET" || request.method === "HEAD"
      ? undefined
      : request.body as BodyInit | undefined;
    let res: Response;
    try {
      res = await fetch(url, {
        method: request.method,
        headers,
        body,
        signal: options.abortSignal as AbortSignal | undefined,
      });
    } catch (e) {
      throw networkError(e);
    }
    const responseHeaders: Record<string, string> = {};
    res.headers.forEach((v, k) => (responseHeaders[k] = v));
    return {
      response: {
        statusCode: res.status,
        reason: res.statusText,
        headers: responseHeaders,
        body: res.body
          ? Readable.fromWeb(res.body as import("node:stream/web").ReadableStream)
          : Readable.from([]),
      },
    };
  }

  updateHttpClientConfig(): void {}

  httpHandlerConfigs(): Record<string, never> {
    return {};
  }

  destroy(): void {}
}

export function createS3Client(config: S3Config): S3Client {
  return new S3Client({
    region: config.region,
    endpoint: config.endpoint,
    forcePathStyle: config.forcePathStyle,
    credentials: config.accessKeyId && config.secretAccessKey
      ? { accessKeyId: config.accessKeyId, secretAccessKey: config.secretAccessKey }
      : undefined,
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
    maxAttempts: 3,
    requestHandler: new FetchRequestHandler() as never,
  });
}
