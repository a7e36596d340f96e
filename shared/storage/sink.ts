/**
 * The destination: an S3 bucket through @aws-sdk/client-s3, driven part by part ourselves (not
 * lib-storage, which cannot resume an upload in another process).
 *
 * Bodies are always Uint8Array of known length (Deno streaming caveats). Each PUT carries the
 * part's MD5 as Content-MD5 and its SHA-256 as the signed payload hash (x-amz-content-sha256),
 * so S3 verifies every byte it stores against the hashes we computed while reading the source,
 * and the SDK does not hash the body again. Abort and ListMultipartUploads are best effort:
 * S3-compatible servers such as s3rver do not implement them; what could not be aborted is
 * recorded and reported instead.
 */
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  PutObjectCommand,
  type S3Client,
  UploadPartCommand,
} from "@aws-sdk/client-s3";
import { CopyError, errorText, isConnectFailure } from "./errors.ts";

export interface HeadResult {
  size: number;
  etag: string;
  contentType?: string;
  cacheControl?: string;
  metadata: Record<string, string>;
}

export interface PutInput {
  key: string;
  body: Uint8Array;
  md5Base64: string;
  sha256Hex: string;
  contentType?: string;
  cacheControl?: string;
  metadata: Record<string, string>;
}

const DEPENDENCY_CODES = new Set([
  "AccessDenied",
  "InvalidAccessKeyId",
  "SignatureDoesNotMatch",
  "NoSuchBucket",
  "AllAccessDisabled",
  "InvalidBucketName",
  "AuthorizationHeaderMalformed",
  "ExpiredToken",
  "InvalidToken",
  "PermanentRedirect",
]);

const TRANSIENT_CODES = new Set([
  "SlowDown",
  "InternalError",
  "ServiceUnavailable",
  "RequestTimeout",
  "RequestTimeTooSkewed",
  "BadDigest",
  "XAmzContentSHA256Mismatch",
  "IncompleteBody",
  "TimeoutError",
]);

interface SdkError {
  name?: string;
  Code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
}

/** Maps an SDK error to a CopyError (object, or the whole S3 dependency). */
export function classifyS3Error(e: unknown, what: string): CopyError {
  if (e instanceof CopyError) return e;
  const err = (e ?? {}) as SdkError;
  const code = err.Code ?? err.name ?? "Error";
  const status = err.$metadata?.httpStatusCode;
  if (isConnectFailure(e)) {
    return new CopyError(
      "s3_unreachable",
      `S3 cannot be reached (${what}): ${errorText(e)}`,
      true,
      "s3",
    );
  }
  if (DEPENDENCY_CODES.has(code) || status === 401 || status === 403) {
    return new CopyError(
      "s3_rejected",
      `S3 refused ${what}: ${code}${err.message ? ` (${err.message})` : ""}`,
      false,
      "s3",
    );
  }
  const transient = TRANSIENT_CODES.has(code) || status === undefined || status >= 500 ||
    status === 429 || status === 408;
  return new CopyError(
    `s3_${code.replace(/[^A-Za-z0-9]+/g, "_").toLowerCase()}`,
    `S3 ${what} failed: ${code}${err.message ? ` (${err.message})` : ""}`,
    transient,
  );
}

function isUnsupported(e: unknown): boolean {
  const err = (e ?? {}) as SdkError;
  const code = err.Code ?? err.name ?? "";
  const status = err.$metadata?.httpStatusCode;
  return code === "NotImplemented" || code === "MethodNotAllowed" || status === 501 ||
    status === 405;
}

function isMissing(e: unknown): boolean {
  const err = (e ?? {}) as SdkError;
  const code = err.Code ?? err.name ?? "";
  return code === "NoSuchUpload" || code === "NoSuchKey" || code === "NotFound" ||
    err.$metadata?.httpStatusCode === 404;
}

/** Adds the payload hash we computed, so the signer neither hashes the body nor guesses. */
function withPayloadSha256<T extends { middlewareStack: { add: (...a: never[]) => unknown } }>(
  command: T,
  sha256Hex: string,
): T {
  (command.middlewareStack as unknown as {
    add: (mw: unknown, options: { step: string; name: string }) => void;
  }).add(
    (next: (args: unknown) => Promise<unknown>) => (args: unknown) => {
      const request = (args as { request: { headers: Record<string, string> } }).request;
      request.headers["x-amz-content-sha256"] = sha256Hex;
      return next(args);
    },
    { step: "build", name: "saToolkitPayloadSha256" },
  );
  return command;
}

export class S3Sink {
  readonly client: S3Client;
  readonly bucket: string;

  constructor(client: S3Client, bucket: string) {
    this.client = client;
    this.bucket = bucket;
  }

  async #send<T>(what: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      throw classifyS3Error(e, what);
    }
  }

  /** Pre-flight: the bucket exists and the credentials may use it. */
  async headBucket(signal?: AbortSignal): Promise<void> {
    await this.#send(
      "HeadBucket",
      () =>
        this.client.send(new HeadBucketCommand({ Bucket: this.bucket }), { abortSignal: signal }),
    ).catch((e: CopyError) => {
      if (/notfound|nosuchbucket|http_404/i.test(e.code)) {
        throw new CopyError(
          "s3_no_such_bucket",
          `The S3 bucket ${this.bucket} does not exist.`,
          false,
          "s3",
        );
      }
      throw new CopyError(e.code, e.message, e.transient, "s3");
    });
  }

  async putObject(input: PutInput, signal?: AbortSignal): Promise<string> {
    const out = await this.#send("PutObject", () =>
      this.client.send(
        withPayloadSha256(
          new PutObjectCommand({
            Bucket: this.bucket,
            Key: input.key,
            Body: input.body,
            ContentLength: input.body.length,
            ContentMD5: input.md5Base64,
            ContentType: input.contentType,
            CacheControl: input.cacheControl,
            Metadata: input.metadata,
          }),
          input.sha256Hex,
        ),
        { abortSignal: signal },
      ));
    return (out.ETag ?? "").replaceAll('"', "");
  }

  async createUpload(
    input: Omit<PutInput, "body" | "md5Base64" | "sha256Hex">,
    signal?: AbortSignal,
  ): Promise<string> {
    const out = await this.#send("CreateMultipartUpload", () =>
      this.client.send(
        new CreateMultipartUploadCommand({
          Bucket: this.bucket,
          Key: input.key,
          ContentType: input.contentType,
          CacheControl: input.cacheControl,
          Metadata: input.metadata,
        }),
        { abortSignal: signal },
      ));
    if (!out.UploadId) {
      throw new CopyError("s3_no_upload_id", "S3 returned no UploadId.", true);
    }
    return out.UploadId;
  }

  async uploadPart(
    input: {
      key: string;
      uploadId: string;
      partNumber: number;
      body: Uint8Array;
      md5Base64: string;
      sha256Hex: string;
    },
    signal?: AbortSignal,
  ): Promise<string> {
    try {
      const out = await this.client.send(
        withPayloadSha256(
          new UploadPartCommand({
            Bucket: this.bucket,
            Key: input.key,
            UploadId: input.uploadId,
            PartNumber: input.partNumber,
            Body: input.body,
            ContentLength: input.body.length,
            ContentMD5: input.md5Base64,
          }),
          input.sha256Hex,
        ),
        { abortSignal: signal },
      );
      return (out.ETag ?? "").replaceAll('"', "");
    } catch (e) {
      if (isMissing(e)) {
        throw new CopyError(
          "upload_lost",
          "S3 no longer knows the multipart upload (aborted or expired); it will be restarted.",
          true,
        );
      }
      throw classifyS3Error(e, "UploadPart");
    }
  }

  /** Completes; "missing" when S3 no longer knows the upload (e.g. it was completed before). */
  async completeUpload(
    key: string,
    uploadId: string,
    parts: { partNumber: number; etag: string }[],
    signal?: AbortSignal,
  ): Promise<string | "missing"> {
    try {
      const out = await this.client.send(
        new CompleteMultipartUploadCommand({
          Bucket: this.bucket,
          Key: key,
          UploadId: uploadId,
          MultipartUpload: {
            Parts: parts.map((p) => ({ PartNumber: p.partNumber, ETag: `"${p.etag}"` })),
          },
        }),
        { abortSignal: signal },
      );
      return (out.ETag ?? "").replaceAll('"', "");
    } catch (e) {
      const err = (e ?? {}) as SdkError;
      // s3rver answers an unknown upload id with a 500 (ENOENT) instead of NoSuchUpload.
      if (isMissing(e) || /ENOENT|no such file/i.test(err.message ?? "")) return "missing";
      throw classifyS3Error(e, "CompleteMultipartUpload");
    }
  }

  /** Best effort: "aborted", "gone" (already unknown) or "unsupported" (server cannot abort). */
  async abortUpload(
    key: string,
    uploadId: string,
  ): Promise<"aborted" | "gone" | "unsupported" | "failed"> {
    try {
      await this.client.send(
        new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: key, UploadId: uploadId }),
      );
      return "aborted";
    } catch (e) {
      if (isMissing(e)) return "gone";
      if (isUnsupported(e)) return "unsupported";
      return "failed";
    }
  }

  /** Upload ids open under exactly this key, or undefined when the server cannot list them. */
  async listUploads(key: string): Promise<string[] | undefined> {
    try {
      const out = await this.client.send(
        new ListMultipartUploadsCommand({ Bucket: this.bucket, Prefix: key }),
      );
      return (out.Uploads ?? []).filter((u) => u.Key === key).map((u) => u.UploadId!).filter(
        Boolean,
      );
    } catch {
      return undefined;
    }
  }

  /** HEAD; undefined when the object does not exist. */
  async head(key: string, signal?: AbortSignal): Promise<HeadResult | undefined> {
    try {
      const out = await this.client.send(
        new HeadObjectCommand({ Bucket: this.bucket, Key: key }),
        { abortSignal: signal },
      );
      return {
        size: Number(out.ContentLength ?? -1),
        etag: (out.ETag ?? "").replaceAll('"', ""),
        contentType: out.ContentType,
        cacheControl: out.CacheControl,
        metadata: out.Metadata ?? {},
      };
    } catch (e) {
      if (isMissing(e)) return undefined;
      throw classifyS3Error(e, "HeadObject");
    }
  }

  /** The object's body as a web stream (for download verification). */
  async body(key: string, signal?: AbortSignal): Promise<ReadableStream<Uint8Array>> {
    const out = await this.#send(
      "GetObject",
      () =>
        this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: key }), {
          abortSignal: signal,
        }),
    );
    if (!out.Body) throw new CopyError("s3_empty_body", "GetObject returned no body.", true);
    return out.Body.transformToWebStream();
  }
}
