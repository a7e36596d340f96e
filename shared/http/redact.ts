/**
 * Removes secrets from anything that is about to be logged or returned: connection-string
 * passwords, bearer tokens, JWT-looking strings, and values under secret-sounding keys.
 */

const SECRET_KEY =
  /(token|password|passwd|secret|authorization|api[_-]?key|service[_-]?role|credential|cookie)/i;
const URL_KEY = /(url|dsn|uri|conn)/i;
const REDACTED = "[redacted]";

/** `postgresql://user:pass@host` → `postgresql://user:[redacted]@host`. */
const URL_PASSWORD = /\b([a-z][a-z0-9+.-]*:\/\/[^\s:/@]*):([^\s@/]+)@/gi;
const BEARER = /\b(bearer)\s+[A-Za-z0-9._~+/=-]+/gi;
const JWT = /\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\b/g;
const PASSWORD_KV = /\b(password|passwd)\s*=\s*('[^']*'|"[^"]*"|\S+)/gi;

/** Masks secrets inside free text (error messages, URLs). */
export function redactText(text: string): string {
  return text
    .replace(URL_PASSWORD, `$1:${REDACTED}@`)
    .replace(BEARER, `$1 ${REDACTED}`)
    .replace(JWT, REDACTED)
    .replace(PASSWORD_KV, `$1=${REDACTED}`);
}

/** A connection string reduced to what is safe to show: scheme, host, port and database. */
export function describeConnection(url: string | undefined): string | undefined {
  if (!url) return undefined;
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.hostname}${u.port ? `:${u.port}` : ""}${u.pathname}`;
  } catch {
    return "[unparseable connection string]";
  }
}

/** Deep copy of a log record with secrets masked; never throws, never follows cycles. */
export function redact(value: unknown, key = "", seen = new WeakSet<object>()): unknown {
  if (value === null || value === undefined) return value;
  if (typeof value === "string") {
    if (SECRET_KEY.test(key)) return REDACTED;
    if (URL_KEY.test(key) && /:\/\//.test(value)) return describeConnection(value);
    return redactText(value);
  }
  if (typeof value === "number" || typeof value === "boolean" || typeof value === "bigint") {
    return SECRET_KEY.test(key) ? REDACTED : value;
  }
  if (value instanceof Error) {
    return { name: value.name, message: redactText(value.message) };
  }
  if (typeof value === "object") {
    if (seen.has(value)) return "[circular]";
    seen.add(value);
    if (Array.isArray(value)) return value.map((v) => redact(v, key, seen));
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = redact(v, k, seen);
    return out;
  }
  return String(value);
}
