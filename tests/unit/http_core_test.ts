import assert from "node:assert/strict";
import { z } from "zod";
import { FunctionApp } from "../../shared/http/app.ts";
import { bearerToken, constantTimeEqual } from "../../shared/http/auth.ts";
import { memorySink } from "../../shared/http/logger.ts";

const TOKEN = "t0ken-that-is-long-enough-1234";

function app(token: string | undefined, logSink = memorySink().sink) {
  const a = new FunctionApp({ name: "demo", auth: { variable: "DEMO_TOKEN", token }, logSink });
  a.route(
    {
      method: "post",
      path: "/things/:id",
      summary: "Echo",
      params: z.object({ id: z.string().regex(/^\d+$/) }),
      body: z.object({ name: z.string().min(1) }),
      responses: { 200: { description: "ok" } },
    },
    ({ params, body }, c) => c.json({ id: params.id, name: body.name }),
  );
  a.route(
    {
      method: "get",
      path: "/boom",
      summary: "Fails",
      responses: { 500: { description: "always" } },
    },
    () => {
      throw new Error(
        "database password=hunter2 at postgresql://postgres:hunter2@db:5432/postgres",
      );
    },
  );
  return a;
}

const auth = { authorization: `Bearer ${TOKEN}` };

Deno.test("constantTimeEqual tells equal and unequal strings apart", async () => {
  assert.equal(await constantTimeEqual("abc", "abc"), true);
  assert.equal(await constantTimeEqual("abc", "abd"), false);
  assert.equal(await constantTimeEqual("abc", "abcd"), false);
  assert.equal(await constantTimeEqual("", "a"), false);
});

Deno.test("bearerToken reads only a well-formed Bearer header", () => {
  assert.equal(bearerToken("Bearer abc"), "abc");
  assert.equal(bearerToken("bearer abc"), "abc");
  assert.equal(bearerToken("Basic abc"), undefined);
  assert.equal(bearerToken("Bearer"), undefined);
  assert.equal(bearerToken("Bearer a b"), undefined);
  assert.equal(bearerToken(undefined), undefined);
});

Deno.test("a request without a token gets 401 in the documented error shape", async () => {
  const res = await app(TOKEN).request("/demo/things/1", { method: "POST", body: "{}" });
  assert.equal(res.status, 401);
  assert.match(res.headers.get("www-authenticate") ?? "", /^Bearer/);
  const body = await res.json();
  assert.equal(body.error, "unauthorized");
  assert.equal(typeof body.message, "string");
});

Deno.test("a wrong token gets 401", async () => {
  const res = await app(TOKEN).request("/demo/", {
    headers: { authorization: `Bearer ${TOKEN}x` },
  });
  assert.equal(res.status, 401);
  assert.equal((await res.json()).error, "unauthorized");
});

Deno.test("an unconfigured token fails closed with 503 not_configured", async () => {
  const res = await app(undefined).request("/demo/things/1", {
    method: "POST",
    headers: auth,
    body: "{}",
  });
  assert.equal(res.status, 503);
  const body = await res.json();
  assert.equal(body.error, "not_configured");
  assert.match(body.message, /DEMO_TOKEN/);
});

Deno.test("a token shorter than 16 characters counts as not configured", async () => {
  const res = await app("short").request("/demo/", { headers: { authorization: "Bearer short" } });
  assert.equal(res.status, 503);
  assert.equal((await res.json()).error, "not_configured");
});

Deno.test("valid input reaches the handler with parsed params and body", async () => {
  const res = await app(TOKEN).request("/demo/things/42", {
    method: "POST",
    headers: { ...auth, "content-type": "application/json" },
    body: JSON.stringify({ name: "x" }),
  });
  assert.equal(res.status, 200);
  assert.deepEqual(await res.json(), { id: "42", name: "x" });
  assert.ok(res.headers.get("x-request-id"));
});

Deno.test("invalid input is a 400 with zod issues as details", async () => {
  const res = await app(TOKEN).request("/demo/things/abc", {
    method: "POST",
    headers: auth,
    body: '{"name":""}',
  });
  assert.equal(res.status, 400);
  const body = await res.json();
  assert.equal(body.error, "invalid_input");
  assert.equal(body.details.location, "path");
  assert.ok(Array.isArray(body.details.issues));
});

Deno.test("a malformed JSON body is a 400 invalid_json", async () => {
  const res = await app(TOKEN).request("/demo/things/1", {
    method: "POST",
    headers: auth,
    body: "{nope",
  });
  assert.equal(res.status, 400);
  assert.equal((await res.json()).error, "invalid_json");
});

Deno.test("an unknown route is a JSON 404", async () => {
  const res = await app(TOKEN).request("/demo/nope", { headers: auth });
  assert.equal(res.status, 404);
  const body = await res.json();
  assert.equal(body.error, "not_found");
});

Deno.test("an unexpected error is a 500 that leaks no internals and is logged redacted", async () => {
  const logs = memorySink();
  const res = await app(TOKEN, logs.sink).request("/demo/boom", { headers: auth });
  assert.equal(res.status, 500);
  const text = await res.text();
  assert.doesNotMatch(text, /hunter2|postgresql:|database/);
  const body = JSON.parse(text);
  assert.equal(body.error, "internal_error");
  assert.ok(body.details.request_id);
  const logged = logs.lines.join("\n");
  assert.match(logged, /unhandled_error/);
  assert.doesNotMatch(logged, /hunter2/);
});

Deno.test("the request log never contains the token or the query string", async () => {
  const logs = memorySink();
  const a = new FunctionApp({
    name: "probe",
    auth: { variable: "HEALTH_TOKEN", token: TOKEN, allowQueryToken: true },
    logSink: logs.sink,
  });
  a.route(
    { method: "get", path: "/x", summary: "x", responses: { 200: { description: "ok" } } },
    (_i, c) => c.json({}),
  );
  const res = await a.request(`/probe/x?token=${TOKEN}`);
  assert.equal(res.status, 200);
  await a.request("/probe/x", { headers: auth });
  assert.equal(logs.lines.length, 2);
  assert.doesNotMatch(logs.lines.join("\n"), new RegExp(TOKEN));
});

Deno.test("an incoming well-formed request id is echoed, a malformed one replaced", async () => {
  const a = app(TOKEN);
  const ok = await a.request("/demo/", { headers: { ...auth, "x-request-id": "req-12345678" } });
  assert.equal(ok.headers.get("x-request-id"), "req-12345678");
  await ok.body?.cancel();
  const bad = await a.request("/demo/", { headers: { ...auth, "x-request-id": "<script>" } });
  assert.notEqual(bad.headers.get("x-request-id"), "<script>");
  await bad.body?.cancel();
});
