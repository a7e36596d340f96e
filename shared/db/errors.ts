/**
 * Postgres and connection errors mapped to the HTTP error shape: a database that cannot be
 * reached is a 503, the SQL API's own refusals (bad parameter, missing row, wrong state) are
 * 4xx, and anything else stays a 500 (logged, never echoed).
 */
import { HttpError } from "../http/errors.ts";

const CONNECTION_CODES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENOTFOUND",
  "EAI_AGAIN",
  "CONNECT_TIMEOUT",
  "CONNECTION_CLOSED",
  "CONNECTION_ENDED",
  "CONNECTION_DESTROYED",
  "57P01", // admin shutdown
  "57P02", // crash shutdown
  "57P03", // cannot connect now (starting up, recovery)
  "53300", // too many connections
]);

export function dbErrorCode(e: unknown): string | undefined {
  if (e && typeof e === "object" && "code" in e) return String((e as { code: unknown }).code);
  return undefined;
}

export function isConnectionError(e: unknown): boolean {
  const code = dbErrorCode(e);
  if (!code) return e instanceof Deno.errors.ConnectionRefused || e instanceof Deno.errors.TimedOut;
  return CONNECTION_CODES.has(code) || code.startsWith("08");
}

/** Rethrows `e` as an HttpError when it has a meaning for the client, else as is. */
export function mapDbError(e: unknown, what = "The database"): never {
  if (e instanceof HttpError) throw e;
  const code = dbErrorCode(e);
  const message = e instanceof Error ? e.message : String(e);
  if (isConnectionError(e)) {
    throw new HttpError(503, "database_unavailable", `${what} cannot be reached right now.`);
  }
  switch (code) {
    case "57014":
      throw new HttpError(503, "query_timeout", `${what} did not answer in time.`);
    case "22023":
    case "22007":
    case "22008":
      throw new HttpError(400, "invalid_input", message);
    case "P0002":
      throw new HttpError(404, "not_found", message);
    case "55000":
      throw new HttpError(409, "conflict", message);
    case "42P01":
    case "3F000":
    case "42883":
      throw new HttpError(
        503,
        "not_installed",
        `${what} lacks the toolkit's schema or functions: run supabase db push.`,
      );
  }
  throw e;
}
