/**
 * JSON-lines logger: one line per event with `fn`, `event` and, inside a request, `request_id`.
 * Every record passes through `redact`, so tokens, passwords and connection strings never
 * reach the log even when a caller hands them over by mistake.
 */
import { redact } from "./redact.ts";

export type LogLevel = "debug" | "info" | "warn" | "error";
export type LogSink = (line: string, level: LogLevel) => void;

export interface Logger {
  debug(event: string, fields?: Record<string, unknown>): void;
  info(event: string, fields?: Record<string, unknown>): void;
  warn(event: string, fields?: Record<string, unknown>): void;
  error(event: string, fields?: Record<string, unknown>): void;
  child(fields: Record<string, unknown>): Logger;
}

const LEVELS: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/** Writes to stdout/stderr the way Supabase's log explorer expects (one JSON object per line). */
export const consoleSink: LogSink = (line, level) => {
  if (level === "error" || level === "warn") console.error(line);
  else console.log(line);
};

/** Keeps lines in memory; tests read them to prove what was (not) logged. */
export function memorySink(): { sink: LogSink; lines: string[] } {
  const lines: string[] = [];
  return { sink: (line) => void lines.push(line), lines };
}

export function createLogger(
  fn: string,
  options: { sink?: LogSink; level?: LogLevel; base?: Record<string, unknown> } = {},
): Logger {
  const sink = options.sink ?? consoleSink;
  const min = LEVELS[options.level ?? "info"];
  const base = { fn, ...(options.base ?? {}) };
  const write = (level: LogLevel, event: string, fields?: Record<string, unknown>) => {
    if (LEVELS[level] < min) return;
    const record = redact({ ts: new Date().toISOString(), level, ...base, event, ...fields });
    let line: string;
    try {
      line = JSON.stringify(record);
    } catch {
      line = JSON.stringify({
        ts: new Date().toISOString(),
        level,
        fn,
        event,
        note: "unserializable fields",
      });
    }
    // Supabase truncates log lines at 10,000 characters; keep each line well under that.
    if (line.length > 8000) {
      line = JSON.stringify({
        ts: new Date().toISOString(),
        level,
        ...base,
        event,
        truncated: true,
        partial: line.slice(0, 4000),
      });
    }
    sink(line, level);
  };
  return {
    debug: (e, f) => write("debug", e, f),
    info: (e, f) => write("info", e, f),
    warn: (e, f) => write("warn", e, f),
    error: (e, f) => write("error", e, f),
    child: (fields) =>
      createLogger(fn, { sink, level: options.level, base: { ...base, ...fields } }),
  };
}
