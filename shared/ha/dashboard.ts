/**
 * GET /health/dashboard: one self-contained HTML page for the person on call — which site is
 * primary at which epoch and where PgBouncer routes, whether the standby applies, replication lag
 * over the last hour (server-rendered SVG from ha.lag_history), and the last failover operations
 * with their steps. No scripts, fonts or anything fetched.
 */
import { escapeHtml, fmtBytes, fmtTime, niceMax } from "../http/html.ts";
import { withDeadline } from "./deadline.ts";
import type { ProbeResult } from "./health.ts";
import { OperationStore, recentOperations } from "./operations.ts";
import type { HaRuntime, Observation } from "./runtime.ts";
import type { SiteName } from "./sites.ts";

export interface LagPoint {
  at: string;
  lagBytes: number | null;
  replayLagSeconds: number | null;
}

export async function lagHistory(rt: HaRuntime, site: SiteName, minutes = 60): Promise<LagPoint[]> {
  const rows = await withDeadline(
    rt.sites.get(site).probe`
      select at, lag_bytes, replay_lag_seconds from ha.lag_history
      where at > now() - make_interval(mins => ${minutes}) order by at`,
    2000,
    `site ${site}`,
  );
  return rows.map((r) => ({
    at: new Date(r.at).toISOString(),
    lagBytes: r.lag_bytes === null ? null : Number(r.lag_bytes),
    replayLagSeconds: r.replay_lag_seconds === null ? null : Number(r.replay_lag_seconds),
  }));
}

const W = 900;
const H = 220;
const M = { left: 60, right: 16, top: 14, bottom: 28 };

export function lagChart(points: LagPoint[], minutes = 60): string {
  const pts = points.filter((p) => p.lagBytes !== null);
  if (pts.length === 0) {
    return `<p class="empty">No lag samples in the last ${minutes} minutes (the acting primary records one at every heartbeat; is pg_cron running <code>ha_heartbeat</code>?).</p>`;
  }
  const t1 = Date.now();
  // The x axis starts at the oldest sample (at most `minutes` ago, at least
  // one minute wide), so a young pair's few samples are not squeezed into a
  // single pixel column.
  const oldest = Math.min(...pts.map((p) => Date.parse(p.at)));
  const t0 = Math.min(t1 - 60_000, Math.max(t1 - minutes * 60_000, oldest));
  const max = niceMax(Math.max(...pts.map((p) => p.lagBytes!)) * 1.1);
  const iw = W - M.left - M.right;
  const ih = H - M.top - M.bottom;
  const x = (iso: string) => M.left + Math.max(0, (Date.parse(iso) - t0) / (t1 - t0)) * iw;
  const y = (v: number) => M.top + ih - (v / max) * ih;
  const line = pts.map((p, i) =>
    `${i ? "L" : "M"}${x(p.at).toFixed(1)},${y(p.lagBytes!).toFixed(1)}`
  ).join(" ");
  const dots = pts.length <= 120
    ? pts.map((p) =>
      `<circle cx="${x(p.at).toFixed(1)}" cy="${
        y(p.lagBytes!).toFixed(1)
      }" r="2.5" class="dot"><title>${escapeHtml(fmtTime(p.at))}: ${fmtBytes(p.lagBytes!)}${
        p.replayLagSeconds === null ? "" : `, replay lag ${p.replayLagSeconds.toFixed(3)} s`
      }</title></circle>`
    ).join("")
    : "";
  const axis = [0, 0.5, 1].map((f) =>
    `<line x1="${M.left}" x2="${W - M.right}" y1="${y(f * max)}" y2="${
      y(f * max)
    }" class="grid"/>` +
    `<text x="${M.left - 6}" y="${y(f * max) + 4}" text-anchor="end" class="axis">${
      fmtBytes(f * max)
    }</text>`
  ).join("");
  return `<svg class="chart" id="lag-chart" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" aria-label="Replication lag, last ${minutes} minutes">
${axis}<path class="series lag-line" d="${line}" fill="none" stroke="#3b7dd8" stroke-width="2"/>${dots}
<text x="${M.left}" y="${H - 8}" class="axis">${
    escapeHtml(fmtTime(new Date(t0).toISOString()))
  }</text>
<text x="${W - M.right}" y="${H - 8}" text-anchor="end" class="axis">${
    escapeHtml(fmtTime(new Date(t1).toISOString()))
  }</text>
</svg>`;
}

export interface DashboardData {
  generatedAt: string;
  observation: Observation;
  standby: ProbeResult;
  lag: LagPoint[];
  lagSite: SiteName | null;
  operations: {
    body: Record<string, unknown>;
    steps: { step: string; outcome: string; at: string; details: Record<string, unknown> }[];
  }[];
}

export async function dashboardData(
  rt: HaRuntime,
  standby: ProbeResult,
  obs: Observation,
): Promise<DashboardData> {
  const lagSite = obs.topology.primary;
  const lag = lagSite ? await lagHistory(rt, lagSite).catch(() => []) : [];
  const ops = await recentOperations(rt.sites, 5);
  const operations = await Promise.all(ops.map(async (op) => ({
    body: {
      id: op.id,
      kind: op.kind,
      state: op.state,
      step: op.step,
      source: op.source,
      target: op.target,
      epoch: op.epochTo,
      error: op.error,
      created_at: op.createdAt,
      finished_at: op.finishedAt,
      rpo: (op.data.rpo as Record<string, unknown> | undefined)?.estimate ?? null,
    },
    steps: await withDeadline(
      new OperationStore(rt.sites.get(op.storedOn).probe, op.storedOn).steps(op.id),
      2000,
      "steps",
    )
      .catch(() => []),
  })));
  return {
    generatedAt: new Date().toISOString(),
    observation: obs,
    standby,
    lag,
    lagSite,
    operations,
  };
}

function badge(ok: boolean | null, text: string): string {
  const cls = ok === null ? "unknown" : ok ? "ok" : "bad";
  return `<span class="badge ${cls}">${escapeHtml(text)}</span>`;
}

export function renderDashboard(d: DashboardData): string {
  const o = d.observation;
  const t = o.topology;
  const primary = t.primary;
  const sites = (["primary", "standby"] as SiteName[]).map((n) => {
    const v = t.sites[n];
    const s = v.state;
    const role = s?.role ?? "unknown";
    return `<tr><th>${n}</th><td>${
      badge(v.reachable, v.reachable ? "reachable" : "unreachable")
    }</td>
<td>${badge(role === "fenced" ? false : role === "unknown" ? null : true, role)}</td><td>${
      s?.epoch ?? "–"
    }</td>
<td>${v.readOnlyDefault === undefined ? "–" : v.readOnlyDefault ? "read-only" : "writable"}</td>
<td>${escapeHtml(v.error ?? s?.fencedReason ?? "")}</td></tr>`;
  }).join("");
  const route = o.route
    ? `routes to <b>${escapeHtml(o.routedSite ?? "nothing")}</b> at epoch ${o.route.epoch ?? "–"}${
      o.route.paused ? " — <b>paused</b>" : ""
    }${o.route.disabled ? " — <b>disabled</b>" : ""}`
    : `unreachable (${escapeHtml(o.routeError ?? "")})`;
  const routeOk = !!o.route && !o.route.paused && !o.route.disabled && o.routedSite === primary;
  const standbyReason = d.standby.body.reason as string | undefined;
  const ops = d.operations.length
    ? d.operations.map((op) => {
      const b = op.body;
      const steps = op.steps.filter((s) => s.outcome !== "started").map((s) =>
        `<tr><td>${escapeHtml(s.step)}</td><td class="${
          s.outcome === "failed" ? "bad-text" : ""
        }">${escapeHtml(s.outcome)}</td><td>${s.details.ms ?? ""}</td><td>${
          escapeHtml(fmtTime(s.at))
        }</td></tr>`
      ).join("");
      return `<details class="op"><summary>${badge(b.state === "succeeded", String(b.state))} <b>${
        escapeHtml(b.kind)
      }</b> ${escapeHtml(b.source)} → ${escapeHtml(b.target)} (epoch ${escapeHtml(b.epoch)}) · ${
        escapeHtml(fmtTime(b.created_at))
      }${b.error ? ` · <span class="bad-text">${escapeHtml(b.error)}</span>` : ""}${
        b.rpo ? ` · RPO: ${escapeHtml(b.rpo)}` : ""
      }</summary>
<table class="steps"><tr><th>step</th><th>outcome</th><th>ms</th><th>at</th></tr>${steps}</table></details>`;
    }).join("")
    : `<p class="empty">No failover operations yet.</p>`;
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="30">
<title>HA pair — primary: ${escapeHtml(primary ?? "none")}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:980px;color:#1f2328;padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a}.banner{font-size:16px;padding:10px 14px;margin:14px 0;border-left:4px solid}.banner.ok{background:#eef8f0;border-color:#2da44e}
.banner.bad{background:#fdf0f0;border-color:#d64545}table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}.badge.ok{background:#dafbe1;color:#116329}
.badge.bad{background:#ffebe9;color:#a40e26}.badge.unknown{background:#eaeef2;color:#57606a}.bad-text{color:#a40e26}
.chart{display:block;max-width:100%;height:auto}.grid{stroke:#eaeef2}.axis{font-size:11px;fill:#57606a}.dot{fill:#3b7dd8}
.op{border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;margin:8px 0}.op summary{cursor:pointer}.steps{margin-top:8px;font-size:13px}.empty{color:#57606a}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
</style>
</head>
<body>
<h1>HA pair</h1>
<p class="meta">Generated ${escapeHtml(fmtTime(d.generatedAt))} · refreshes every 30 s · epoch ${
    o.epoch ?? "–"
  }</p>
<div class="banner ${primary && routeOk && d.standby.healthy ? "ok" : "bad"}" id="status">
Primary: <b>${escapeHtml(primary ?? "none")}</b> · PgBouncer ${route} · standby: ${
    d.standby.healthy ? "applying" : `<b>${escapeHtml(standbyReason ?? "unhealthy")}</b>`
  }</div>
<h2>Topology</h2>
<table id="topology"><tr><th>site</th><th>reachable</th><th>role</th><th>epoch</th><th>default</th><th>note</th></tr>${sites}</table>
<h2>Replication lag, last hour${d.lagSite ? ` (slot on site ${escapeHtml(d.lagSite)})` : ""}</h2>
${lagChart(d.lag)}
<h2>Recent failover operations</h2>
${ops}
</body>
</html>`;
}
