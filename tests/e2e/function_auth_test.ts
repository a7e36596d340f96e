/** Auth and error shape of all four functions, over HTTP, as Supabase's gateway would route them. */
import assert from "node:assert/strict";
import { FUNCTION_NAMES, type FunctionName, serveFunctions, withStack } from "../harness/mod.ts";
import { memorySink } from "../../shared/http/logger.ts";

const ROOT: Record<FunctionName, string> = {
  telemetry: "/",
  health: "/liveness",
  failover: "/",
  "storage-to-s3": "/",
};

Deno.test("every function is token-gated, fails closed when unconfigured, and answers errors as JSON", async (t) => {
  const logs = memorySink();
  await withStack(
    { name: "function-auth", primary: true, functions: { logSink: logs.sink } },
    async (stack) => {
      const f = stack.functions!;
      const tokenFor: Record<FunctionName, string> = {
        telemetry: stack.tokens.api,
        "storage-to-s3": stack.tokens.api,
        failover: stack.tokens.failover,
        health: stack.tokens.health,
      };

      for (const name of FUNCTION_NAMES) {
        await stack.step(
          t,
          `${name}: no token, a wrong token and the anon key each get 401`,
          async () => {
            const url = f.url(name) + ROOT[name];
            for (
              const headers of [{}, { authorization: `Bearer ${tokenFor[name]}0` }, {
                authorization: `Bearer ${stack.tokens.anon}`,
              }]
            ) {
              const res = await fetch(url, { headers });
              assert.equal(res.status, 401);
              const body = await res.json();
              assert.equal(body.error, "unauthorized");
              assert.equal(typeof body.message, "string");
            }
          },
        );

        await stack.step(t, `${name}: the right token gets 200 and a request id`, async () => {
          const res = await fetch(f.url(name) + ROOT[name], {
            headers: { authorization: `Bearer ${tokenFor[name]}` },
          });
          assert.equal(res.status, 200);
          assert.ok(res.headers.get("x-request-id"));
          await res.body?.cancel();
        });

        await stack.step(t, `${name}: an unknown route is a JSON 404`, async () => {
          const res = await fetch(`${f.url(name)}/no/such/route`, {
            headers: { authorization: `Bearer ${tokenFor[name]}` },
          });
          assert.equal(res.status, 404);
          assert.equal((await res.json()).error, "not_found");
        });
      }

      await stack.step(
        t,
        "the failover token does not open telemetry (separate blast radius)",
        async () => {
          const res = await fetch(f.url("telemetry") + "/", {
            headers: { authorization: `Bearer ${stack.tokens.failover}` },
          });
          assert.equal(res.status, 401);
          await res.body?.cancel();
        },
      );

      await stack.step(t, "a path outside any function is a JSON 404", async () => {
        const res = await fetch(`${f.origin}/functions/v1/nope/`);
        assert.equal(res.status, 404);
        assert.equal((await res.json()).error, "function_not_found");
      });

      await stack.step(
        t,
        "without tokens configured, functions answer 503; health answers only /liveness",
        async () => {
          const env = stack.env();
          delete env.TOOLKIT_API_TOKEN;
          delete env.FAILOVER_TOKEN;
          delete env.HEALTH_TOKEN;
          const bare = await serveFunctions(env, { logSink: memorySink().sink });
          try {
            for (const name of ["telemetry", "failover", "storage-to-s3"] as const) {
              const res = await fetch(bare.url(name) + "/", {
                headers: { authorization: `Bearer ${stack.tokens.api}` },
              });
              assert.equal(res.status, 503);
              const body = await res.json();
              assert.equal(body.error, "not_configured");
            }
            const health = await fetch(bare.url("health") + "/liveness");
            assert.equal(health.status, 200);
            await health.body?.cancel();
            for (
              const path of [
                "/readiness",
                "/primary",
                "/standby",
                "/replication",
                "/pgbouncer",
                "/dashboard",
              ]
            ) {
              const res = await fetch(bare.url("health") + path);
              assert.equal(res.status, 503, path);
              assert.equal((await res.json()).error, "not_configured", path);
            }
          } finally {
            await bare.stop();
          }
        },
      );

      await stack.step(
        t,
        "no token or connection password ever appears in the function logs",
        () => {
          const all = logs.lines.join("\n");
          assert.ok(logs.lines.length > 10);
          for (
            const secret of [
              stack.tokens.api,
              stack.tokens.failover,
              stack.tokens.health,
              stack.primary!.passwords.postgres,
            ]
          ) {
            assert.equal(all.includes(secret), false);
          }
        },
      );
    },
  );
});
