/**
 * Each function serves an OpenAPI 3.1 document generated from its route schemas, and every
 * documented route answers as documented: 401 without the token, and with it a status the document
 * lists, whose JSON body parses with the schema documented for that status (the error shape for
 * every 4xx/5xx).
 */
import assert from "node:assert/strict";
import { ErrorBody } from "../../shared/http/openapi.ts";
import { FUNCTION_NAMES, setupHa, withStack } from "../harness/mod.ts";

Deno.test("OpenAPI 3.1 documents every route, and every route answers as documented", async (t) => {
  await withStack(
    { name: "openapi", ha: true, s3: true, storage: true, functions: true },
    async (stack) => {
      await setupHa(stack);
      const token = (name: string) =>
        name === "failover"
          ? stack.tokens.failover
          : name === "health"
          ? stack.tokens.health
          : stack.tokens.api;
      for (const name of FUNCTION_NAMES) {
        await stack.step(t, name, async () => {
          const app = stack.functions!.apps[name];
          const base = stack.functions!.url(name);
          const res = await fetch(`${base}/openapi.json`, {
            headers: { authorization: `Bearer ${token(name)}` },
          });
          assert.equal(res.status, 200);
          const doc = await res.json();
          assert.equal(doc.openapi, "3.1.0");
          const anonDoc = await fetch(`${base}/openapi.json`);
          assert.equal(anonDoc.status, 401);
          await anonDoc.body?.cancel();
          let checked = 0;
          const statuses: string[] = [];
          for (const spec of app.routes) {
            const docPath = `/${name}${spec.path === "/" ? "" : spec.path}`.replace(
              /:([A-Za-z_]+)/g,
              "{$1}",
            );
            const op = doc.paths[docPath]?.[spec.method];
            assert.ok(op, `${spec.method.toUpperCase()} ${docPath} is documented`);
            const documented = Object.keys(op.responses).map(Number);
            const path = spec.path.replace(/:id\b/, crypto.randomUUID()).replace(
              /:([A-Za-z_]+)/g,
              (_m, p) => {
                const param = (op.parameters as { name: string; schema: { enum?: string[] } }[])
                  .find((x) => x.name === p);
                return param?.schema.enum?.[0] ?? "public";
              },
            );
            const url = `${base}${path === "/" ? "" : path}`;
            const init = (auth: boolean): RequestInit => ({
              method: spec.method.toUpperCase(),
              headers: {
                ...(auth ? { authorization: `Bearer ${token(name)}` } : {}),
                ...(spec.body ? { "content-type": "application/json" } : {}),
              },
              body: spec.body ? "{}" : undefined,
            });
            const anon = await fetch(url, init(false));
            assert.equal(anon.status, 401, `${spec.method} ${path} without a token`);
            assert.ok(ErrorBody.safeParse(await anon.json()).success);
            const r = await fetch(url, init(true));
            assert.ok(
              documented.includes(r.status),
              `${spec.method.toUpperCase()} ${path} answered ${r.status}, documented ${documented}`,
            );
            const type = r.headers.get("content-type") ?? "";
            if (type.includes("application/json")) {
              const body = await r.json();
              const schema = r.status >= 400 ? ErrorBody : spec.responses[r.status]?.schema;
              if (schema) {
                const parsed = schema.safeParse(body);
                assert.ok(
                  parsed.success,
                  `${spec.method.toUpperCase()} ${path} ${r.status}: ${
                    JSON.stringify(parsed.error?.issues)
                  }`,
                );
              }
            } else {
              assert.equal(
                spec.responses[r.status]?.contentType,
                type.split(";")[0],
                `${path} content type`,
              );
              await r.body?.cancel();
            }
            statuses.push(`${spec.method.toUpperCase()} ${spec.path} ${r.status}`);
            checked++;
          }
          console.log(`  ${name}: ${checked} routes checked (${statuses.join(", ")})`);
        });
      }
    },
  );
});
