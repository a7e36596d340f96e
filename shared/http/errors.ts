/**
 * The one error shape every function answers with:
 * `{"error": "<snake_case_code>", "message": "<sentence>", "details"?: ...}`.
 */
import type { ContentfulStatusCode } from "hono/utils/http-status";

export interface ErrorBody {
  error: string;
  message: string;
  details?: unknown;
}

/** An error a handler throws on purpose; `app.onError` renders it as the documented JSON body. */
export class HttpError extends Error {
  readonly status: ContentfulStatusCode;
  readonly code: string;
  readonly details?: unknown;
  readonly headers?: Record<string, string>;

  constructor(
    status: ContentfulStatusCode,
    code: string,
    message: string,
    details?: unknown,
    headers?: Record<string, string>,
  ) {
    super(message);
    this.name = "HttpError";
    this.status = status;
    this.code = code;
    this.details = details;
    this.headers = headers;
  }

  body(): ErrorBody {
    return this.details === undefined
      ? { error: this.code, message: this.message }
      : { error: this.code, message: this.message, details: this.details };
  }
}

export const badRequest = (code: string, message: string, details?: unknown) =>
  new HttpError(400, code, message, details);
export const notFound = (code: string, message: string, details?: unknown) =>
  new HttpError(404, code, message, details);
export const conflict = (code: string, message: string, details?: unknown) =>
  new HttpError(409, code, message, details);
export const preconditionFailed = (code: string, message: string, details?: unknown) =>
  new HttpError(412, code, message, details);
export const unavailable = (code: string, message: string, details?: unknown) =>
  new HttpError(503, code, message, details);
