import assert from "node:assert/strict";
import { createLogger, memorySink } from "../../shared/http/logger.ts";
import { describeConnection, redact, redactText } from "../../shared/http/redact.ts";

Deno.test("redactText masks connection-string passwords, bearer tokens, JWTs and password=", () => {
  const jwt = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.c2lnbmF0dXJlLXZhbHVl";
  const text = `postgresql://postgres:s3cret@db:5432/postgres Bearer abcdef123 ${jwt} password=pw1`;
  const out = redactText(text);
  for (const secret of ["s3cret", "abcdef123", jwt, "pw1"]) {
    assert.doesNotMatch(out, new RegExp(secret));
  }
  assert.match(out, /postgresql:\/\/postgres:\[redacted\]@db:5432/);
});

Deno.test("redact masks values under secret-sounding keys and reduces URLs to host and database", () => {
  const out = redact({
    token: "abc",
    nested: { FAILOVER_TOKEN: "x", apiKey: "y", password: 3 },
    dbUrl: "postgresql://u:p@h:5/db?sslmode=require",
    count: 5,
  }) as Record<string, unknown>;
  assert.equal(out.token, "[redacted]");
  assert.deepEqual(out.nested, {
    FAILOVER_TOKEN: "[redacted]",
    apiKey: "[redacted]",
    password: "[redacted]",
  });
  assert.equal(out.dbUrl, "postgresql://h:5/db");
  assert.equal(out.count, 5);
});

Deno.test("describeConnection never returns credentials", () => {
  assert.equal(describeConnection("postgres://a:b@host/db"), "postgres://host/db");
  assert.equal(describeConnection("not a url"), "[unparseable connection string]");
});

Deno.test("the logger writes one JSON object per line with fn and event, secrets masked", () => {
  const logs = memorySink();
  const log = createLogger("telemetry", { sink: logs.sink }).child({ request_id: "r1" });
  log.info("connected", {
    url: "postgresql://postgres:pw@x:1/postgres",
    authorization: "Bearer zzz",
  });
  assert.equal(logs.lines.length, 1);
  const rec = JSON.parse(logs.lines[0]);
  assert.equal(rec.fn, "telemetry");
  assert.equal(rec.event, "connected");
  assert.equal(rec.request_id, "r1");
  assert.doesNotMatch(logs.lines[0], /pw@|zzz/);
});
