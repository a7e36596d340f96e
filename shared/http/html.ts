/** Small helpers for the server-rendered HTML pages (telemetry report, HA dashboard). */

export function escapeHtml(value: unknown): string {
  return String(value ?? "")
    .replaceAll("&", "&amp;")
    .replaceAll("<", "&lt;")
    .replaceAll(">", "&gt;")
    .replaceAll('"', "&quot;")
    .replaceAll("'", "&#39;");
}

/** "2026-11-27 18:45:33Z" from an ISO time (the input unchanged when it is not a time). */
export function fmtTime(iso: unknown): string {
  const d = new Date(String(iso));
  return Number.isNaN(d.getTime())
    ? String(iso ?? "")
    : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

export function fmtBytes(n: number): string {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(n >= 10 || i === 0 ? 0 : 1)} ${units[i]}`;
}

/** A round axis maximum at or above v (1, 2, 2.5, 5 × a power of ten). */
export function niceMax(v: number): number {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

/** The Content-Security-Policy of a self-contained page: no scripts, inline styles only. */
export const SELF_CONTAINED_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:";
