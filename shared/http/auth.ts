/**
 * Bearer-token auth. Tokens are compared in constant time (HMAC both sides under a per-process
 * key, then compare the fixed-length digests without early exit), never logged, and a function
 * whose token is not configured answers 503 `not_configured` instead of opening up.
 */
import type { MiddlewareHandler } from "hono";
import { HttpError } from "./errors.ts";

/** Shortest token the toolkit accepts; shorter values count as "not configured". */
export const MIN_TOKEN_LENGTH = 16;

const encoder = new TextEncoder();
const keyPromise = crypto.subtle.generateKey({ name: "HMAC", hash: "SHA-256" }, false, ["sign"]);

async function digest(value: string): Promise<Uint8Array> {
  const key = await keyPromise;
  return new Uint8Array(await crypto.subtle.sign("HMAC", key, encoder.encode(value)));
}

/** True when both strings are equal; the time taken does not depend on where they differ. */
export async function constantTimeEqual(a: string, b: string): Promise<boolean> {
  const [da, db] = await Promise.all([digest(a), digest(b)]);
  let diff = 0;
  for (let i = 0; i < da.length; i++) diff |= da[i] ^ db[i];
  return diff === 0;
}

/** Reads `Authorization: Bearer <token>`; undefined when absent or malformed. */
export function bearerToken(header: string | undefined | null): string | undefined {
  if (!header) return undefined;
  const match = /^Bearer[ ]+([^\s]+)\s*$/i.exec(header);
  return match?.[1];
}

export interface TokenPolicy {
  /** The env variable that holds the token, for the 503 message. */
  variable: string;
  /** The configured token; undefined (or too short) means "not configured". */
  token: string | undefined;
  /** Health monitors that cannot send headers may pass `?token=`. */
  allowQueryToken?: boolean;
}

export function isUsableToken(token: string | undefined): token is string {
  return typeof token === "string" && token.length >= MIN_TOKEN_LENGTH;
}

const unauthorized = () =>
  new HttpError(401, "unauthorized", "A valid bearer token is required.", undefined, {
    "WWW-Authenticate": 'Bearer realm="sa-toolkit"',
  });

/** Middleware enforcing a `TokenPolicy`. */
export function requireToken(policy: TokenPolicy): MiddlewareHandler {
  return async (c, next) => {
    const configured = policy.token;
    if (configured === undefined || configured === "") {
      throw new HttpError(
        503,
        "not_configured",
        `This function is not configured: set ${policy.variable}.`,
      );
    }
    if (!isUsableToken(configured)) {
      throw new HttpError(
        503,
        "not_configured",
        `This function is not configured: ${policy.variable} must be at least ${MIN_TOKEN_LENGTH} characters.`,
      );
    }
    let presented = bearerToken(c.req.header("authorization"));
    if (presented === undefined && policy.allowQueryToken) presented = c.req.query("token");
    if (presented === undefined || !(await constantTimeEqual(presented, configured))) {
      throw unauthorized();
    }
    await next();
  };
}
