/** HTTP clients for the health and failover functions of a running stack (tests, demo, bench). */
import type { Stack } from "./stack.ts";

export interface Answer {
  status: number;
  body: Record<string, unknown>;
  ms: number;
}

async function call(url: string, init: RequestInit): Promise<Answer> {
  const started = performance.now();
  const res = await fetch(url, init);
  const text = await res.text();
  const ms = performance.now() - started;
  let body: Record<string, unknown> = {};
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      throw new Error(`not JSON (${res.status}): ${text.slice(0, 200)}`);
    }
  }
  return { status: res.status, body, ms };
}

export function healthClient(stack: Stack, token = stack.tokens.health) {
  const base = stack.functions!.url("health");
  return {
    base,
    get: (path: string, headers: Record<string, string> = { authorization: `Bearer ${token}` }) =>
      call(`${base}${path}`, { headers }),
  };
}

export function failoverClient(stack: Stack, token = stack.tokens.failover) {
  const base = stack.functions!.url("failover");
  const headers = { authorization: `Bearer ${token}`, "content-type": "application/json" };
  return {
    base,
    token,
    get: (path: string) => call(`${base}${path}`, { headers }),
    post: (path: string, body: unknown = {}) =>
      call(`${base}${path}`, { method: "POST", headers, body: JSON.stringify(body) }),
  };
}
