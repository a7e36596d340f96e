/**
 * The telemetry report: one self-contained HTML page (inline CSS and server-rendered SVG, no
 * scripts, fonts or anything fetched) with the diagnosis, average active sessions stacked by
 * wait class, the WAL/checkpoint timeline and the lock waits.
 */

import { escapeHtml, fmtBytes, fmtTime, niceMax } from "../http/html.ts";

export { escapeHtml };

type Json = Record<string, unknown>;

export interface ReportData {
  title: string;
  generatedAt: string;
  diagnosis: Json;
  timeline: Json[];
  wal: Json[];
  locks: Json[];
}

const CLASS_COLORS: Record<string, string> = {
  CPU: "#2e9e5b",
  Lock: "#d64545",
  LWLock: "#e8923a",
  IO: "#3b7dd8",
  IPC: "#8e5ad6",
  IdleInTransaction: "#9aa0a6",
  Client: "#8d6e63",
  Timeout: "#c9b037",
  BufferPin: "#ef6fa8",
  Extension: "#5bb3b0",
  Autovacuum: "#6d4c41",
  Activity: "#b0bec5",
};

function color(cls: string): string {
  return CLASS_COLORS[cls] ?? "#607d8b";
}

const num = (v: unknown): number => (typeof v === "number" ? v : Number(v ?? 0));

const W = 900;
const H = 240;
const M = { left: 52, right: 16, top: 14, bottom: 30 };

/** Stacked areas of average active sessions per wait class over time. */
export function aasChart(timeline: Json[], cpuCount: number | null): string {
  const buckets = [...new Set(timeline.map((r) => String(r.bucket_start)))].sort();
  if (buckets.length === 0) {
    return `<p class="empty">No samples in this window.</p>`;
  }
  const totals = new Map<string, number>();
  for (const r of timeline) {
    totals.set(String(r.wait_class), (totals.get(String(r.wait_class)) ?? 0) + num(r.aas));
  }
  const classes = [...totals.keys()].sort((a, b) =>
    (totals.get(b)! - totals.get(a)!) || a.localeCompare(b)
  );
  const value = new Map<string, number>();
  for (const r of timeline) value.set(`${r.bucket_start}|${r.wait_class}`, num(r.aas));
  const stackTop = buckets.map((b) =>
    classes.reduce((s, c) => s + (value.get(`${b}|${c}`) ?? 0), 0)
  );
  const ymax = niceMax(Math.max(...stackTop, cpuCount ?? 0) * 1.1);
  const iw = W - M.left - M.right;
  const ih = H - M.top - M.bottom;
  const step = buckets.length > 1 ? iw / (buckets.length - 1) : iw;
  const x = (i: number) => M.left + (buckets.length > 1 ? i * step : iw / 2);
  const y = (v: number) => M.top + ih - (v / ymax) * ih;

  const lower = buckets.map(() => 0);
  const paths: string[] = [];
  for (const c of classes) {
    const upper = buckets.map((b, i) => lower[i] + (value.get(`${b}|${c}`) ?? 0));
    let d: string;
    if (buckets.length === 1) {
      d = `M${x(0) - 20},${y(lower[0])} L${x(0) - 20},${y(upper[0])} L${x(0) + 20},${
        y(upper[0])
      } L${x(0) + 20},${y(lower[0])} Z`;
    } else {
      const top = upper.map((v, i) => `${i === 0 ? "M" : "L"}${x(i).toFixed(1)},${y(v).toFixed(1)}`)
        .join(" ");
      const bottom = lower.map((v, i) => `L${x(i).toFixed(1)},${y(v).toFixed(1)}`).reverse().join(
        " ",
      );
      d = `${top} ${bottom} Z`;
    }
    paths.push(
      `<path class="series" data-class="${escapeHtml(c)}" d="${d}" fill="${
        color(c)
      }" fill-opacity="0.85" stroke="${color(c)}" stroke-width="0.5"><title>${escapeHtml(c)}: ${
        (totals.get(c)! / buckets.length).toFixed(2)
      } AAS on average</title></path>`,
    );
    upper.forEach((v, i) => (lower[i] = v));
  }
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => f * ymax);
  const yAxis = ticks
    .map((t) =>
      `<line x1="${M.left}" x2="${W - M.right}" y1="${y(t)}" y2="${y(t)}" class="grid"/>` +
      `<text x="${M.left - 6}" y="${y(t) + 4}" text-anchor="end" class="axis">${
        Number(t.toFixed(2))
      }</text>`
    )
    .join("");
  const labelIdx = [0, Math.floor((buckets.length - 1) / 2), buckets.length - 1];
  const xAxis = [...new Set(labelIdx)]
    .map((i) =>
      `<text x="${x(i)}" y="${H - 8}" text-anchor="middle" class="axis">${
        escapeHtml(fmtTime(buckets[i]).slice(11))
      }</text>`
    )
    .join("");
  const cpuLine = cpuCount
    ? `<line x1="${M.left}" x2="${W - M.right}" y1="${y(cpuCount)}" y2="${
      y(cpuCount)
    }" class="cpu-line"/>` +
      `<text x="${W - M.right - 4}" y="${
        y(cpuCount) - 4
      }" text-anchor="end" class="axis">${cpuCount} vCPU</text>`
    : "";
  const legend = classes
    .map((c) =>
      `<span class="legend-item"><span class="swatch" style="background:${color(c)}"></span>${
        escapeHtml(c)
      } ${(totals.get(c)! / buckets.length).toFixed(2)}</span>`
    )
    .join("");
  return `<svg class="chart" id="aas-chart" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" aria-label="Average active sessions by wait class">
${yAxis}${paths.join("\n")}${cpuLine}${xAxis}
<text x="12" y="${M.top + ih / 2}" class="axis" transform="rotate(-90 12 ${
    M.top + ih / 2
  })" text-anchor="middle">sessions</text>
</svg><div class="legend">${legend}</div>`;
}

/** WAL bytes per bucket as bars, with completed checkpoints marked. */
export function walChart(wal: Json[]): string {
  if (wal.length === 0) return `<p class="empty">No WAL positions sampled in this window.</p>`;
  const rows = [...wal].sort((a, b) =>
    String(a.bucket_start).localeCompare(String(b.bucket_start))
  );
  const max = niceMax(Math.max(...rows.map((r) => num(r.wal_bytes))) * 1.1);
  const iw = W - M.left - M.right;
  const ih = H - M.top - M.bottom;
  const t0 = Date.parse(String(rows[0].bucket_start));
  const t1 = Date.parse(String(rows[rows.length - 1].bucket_end));
  const span = Math.max(1, t1 - t0);
  const x = (iso: unknown) => M.left + ((Date.parse(String(iso)) - t0) / span) * iw;
  const bars = rows
    .map((r) => {
      const x0 = x(r.bucket_start);
      const w = Math.max(1, x(r.bucket_end) - x0 - 1);
      const h = (num(r.wal_bytes) / max) * ih;
      return `<rect class="series wal-bar" x="${x0.toFixed(1)}" y="${
        (M.top + ih - h).toFixed(1)
      }" width="${w.toFixed(1)}" height="${h.toFixed(1)}" fill="#3b7dd8"><title>${
        escapeHtml(fmtTime(r.bucket_start))
      }: ${fmtBytes(num(r.wal_bytes))}</title></rect>`;
    })
    .join("");
  const marks = rows
    .filter((r) => num(r.checkpoints) > 0)
    .map((r) => {
      const cx = x(r.bucket_start) + 1;
      return `<line class="checkpoint" x1="${cx}" x2="${cx}" y1="${M.top}" y2="${M.top + ih}"/>` +
        `<text x="${cx + 3}" y="${M.top + 10}" class="axis">checkpoint${
          num(r.checkpoints) > 1 ? ` x${r.checkpoints}` : ""
        }</text>`;
    })
    .join("");
  const axis = [0, 0.5, 1]
    .map((f) =>
      `<text x="${M.left - 6}" y="${M.top + ih - f * ih + 4}" text-anchor="end" class="axis">${
        fmtBytes(f * max)
      }</text>`
    )
    .join("");
  return `<svg class="chart" id="wal-chart" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" aria-label="WAL written and checkpoints">
<line x1="${M.left}" x2="${W - M.right}" y1="${M.top + ih}" y2="${
    M.top + ih
  }" class="grid"/>${axis}${bars}${marks}
<text x="${M.left}" y="${H - 8}" class="axis">${escapeHtml(fmtTime(rows[0].bucket_start))}</text>
<text x="${W - M.right}" y="${H - 8}" text-anchor="end" class="axis">${
    escapeHtml(fmtTime(rows[rows.length - 1].bucket_end))
  }</text>
</svg>`;
}

function evidenceList(evidence: unknown): string {
  if (!evidence || typeof evidence !== "object") return "";
  const items = Object.entries(evidence as Json)
    .filter(([, v]) => v !== null && v !== undefined && !(Array.isArray(v) && v.length === 0))
    .map(([k, v]) =>
      `<li><b>${escapeHtml(k.replaceAll("_", " "))}</b>: <code>${
        escapeHtml(typeof v === "object" ? JSON.stringify(v) : v)
      }</code></li>`
    );
  return items.length ? `<ul class="evidence">${items.join("")}</ul>` : "";
}

function findingsSection(findings: Json[]): string {
  if (findings.length === 0) return `<p class="empty">No cause stood out in this window.</p>`;
  return findings
    .map((f) =>
      `<article class="finding" data-cause="${escapeHtml(f.cause)}">
<h3><span class="rank">#${escapeHtml(f.rank)}</span> ${escapeHtml(f.title)}</h3>
<p class="impact">${escapeHtml(f.impact_session_seconds)} session-seconds${
        f.share_of_load_pct !== null && f.share_of_load_pct !== undefined
          ? ` · ${escapeHtml(f.share_of_load_pct)}% of the load`
          : ""
      }${
        f.excess_session_seconds !== null && f.excess_session_seconds !== undefined
          ? ` · ${escapeHtml(f.excess_session_seconds)} more than the baseline`
          : ""
      } · wait class <b>${escapeHtml(f.wait_class)}</b> · confidence ${
        escapeHtml(f.confidence)
      } <span class="basis">(${escapeHtml(f.basis)})</span></p>
<p class="recommendation">${escapeHtml(f.recommendation)}</p>
${evidenceList(f.evidence)}
</article>`
    )
    .join("\n");
}

function locksTable(locks: Json[]): string {
  if (locks.length === 0) return `<p class="empty">No lock waits were sampled in this window.</p>`;
  const head = [
    "when",
    "waiting pid",
    "waited",
    "lock",
    "mode",
    "relation",
    "blocked by",
    "blocker state",
    "blocker query",
  ];
  const rows = locks.map((l) =>
    `<tr><td>${escapeHtml(fmtTime(l.captured_at).slice(11))}</td><td>${
      escapeHtml(l.blocked_pid)
    }</td><td>${escapeHtml(l.blocked_duration)}</td><td>${escapeHtml(l.lock_type)}</td><td>${
      escapeHtml(l.lock_mode)
    }</td><td>${escapeHtml(l.locked_relation ?? "")}</td><td>${
      escapeHtml(l.blocking_pid)
    }</td><td>${escapeHtml(l.blocking_state)}</td><td><code>${
      escapeHtml(l.blocking_query_preview ?? "")
    }</code></td></tr>`
  );
  return `<table class="locks"><thead><tr>${
    head.map((h) => `<th>${h}</th>`).join("")
  }</tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

function attributionTable(attr: Json | null | undefined): string {
  if (!attr) return "";
  const rows = (attr.by_wait_class as Json[] ?? []).map((r) =>
    `<tr><td>${escapeHtml(r.wait_class)}</td><td>${
      escapeHtml(r.baseline_session_seconds)
    }</td><td>${escapeHtml(r.run_session_seconds)}</td><td class="${
      num(r.delta_session_seconds) > 0 ? "up" : "down"
    }">${escapeHtml(r.delta_session_seconds)}</td></tr>`
  );
  return `<section><h2>Where the extra time went (versus the baseline)</h2>
<p>Run ${escapeHtml(attr.run_seconds)} s against baseline ${
    escapeHtml(attr.baseline_seconds)
  } s; database load ${escapeHtml(attr.run_session_seconds)} against ${
    escapeHtml(attr.baseline_session_seconds)
  } session-seconds (${escapeHtml(attr.extra_session_seconds)} extra):
${escapeHtml(attr.explained_session_seconds)} explained by the findings, ${
    escapeHtml(attr.unexplained_session_seconds)
  } unexplained.</p>
<table class="attribution"><thead><tr><th>wait class</th><th>baseline s</th><th>run s</th><th>change s</th></tr></thead><tbody>${
    rows.join("")
  }</tbody></table></section>`;
}

export function renderReport(data: ReportData): string {
  const d = data.diagnosis;
  const win = (d.window ?? {}) as Json;
  const load = (d.load ?? {}) as Json;
  const coverage = (d.coverage ?? {}) as Json;
  const findings = (d.findings ?? []) as Json[];
  const notes = (coverage.notes ?? []) as string[];
  const cpu = load.cpu_count === null || load.cpu_count === undefined ? null : num(load.cpu_count);
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(data.title)}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:980px;color:#1f2328;padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:15px;margin:0 0 4px}.meta{color:#57606a}.summary{font-size:16px;background:#f6f8fa;border-left:4px solid #d64545;padding:10px 14px;margin:14px 0}
.finding{border:1px solid #d0d7de;border-radius:6px;padding:10px 14px;margin:10px 0}.rank{color:#d64545}
.impact{color:#57606a;margin:2px 0}.basis{font-size:12px}.recommendation{margin:6px 0}
.evidence{font-size:12px;color:#424a53;margin:4px 0 0;padding-left:18px}code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all}
.chart{display:block;max-width:100%;height:auto}.grid{stroke:#eaeef2}.axis{font-size:11px;fill:#57606a}
.cpu-line{stroke:#1f2328;stroke-dasharray:6 4}.checkpoint{stroke:#d64545;stroke-dasharray:3 3}
.legend{margin:4px 0 0 52px}.legend-item{display:inline-block;margin-right:14px;font-size:12px}.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
table{border-collapse:collapse;width:100%;font-size:12px}th,td{border-bottom:1px solid #eaeef2;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f6f8fa}.up{color:#d64545;font-weight:600}.down{color:#2e9e5b}.empty{color:#57606a;font-style:italic}
.notes li{color:#9a6700}
</style>
</head>
<body>
<h1>${escapeHtml(data.title)}</h1>
<p class="meta">Window ${escapeHtml(fmtTime(win.start))} → ${escapeHtml(fmtTime(win.end))} (${
    escapeHtml(win.seconds)
  } s, ${escapeHtml(win.samples)} samples) · load ${
    escapeHtml(load.aas)
  } average active sessions · generated ${escapeHtml(fmtTime(data.generatedAt))}</p>
<p class="summary" id="summary">${escapeHtml(d.summary)}</p>
${
    notes.length
      ? `<ul class="notes">${notes.map((n) => `<li>${escapeHtml(n)}</li>`).join("")}</ul>`
      : ""
  }
<section><h2>Findings, ranked by the time they explain</h2>
${findingsSection(findings)}
</section>
<section><h2>Average active sessions by wait class</h2>
${aasChart(data.timeline, cpu)}
</section>
${attributionTable(d.attribution as Json | null)}
<section><h2>WAL written and checkpoints</h2>
${walChart(data.wal)}
</section>
<section><h2>Lock waits (longest first)</h2>
${locksTable(data.locks)}
</section>
</body>
</html>`;
}
