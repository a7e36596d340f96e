/**
 * The shipped PgBouncer entrypoint's defaults that keep the endpoint closed: the admin console
 * answers only on the machine's local socket (TCP logins to it are rejected unless
 * ADMIN_OVER_TCP=1), and client TLS is on unless switched off explicitly: without a certificate
 * the entrypoint refuses to start, with one clients connect over TLS and plain ones are refused.
 */
import assert from "node:assert/strict";
import { createSql } from "../../../shared/db/mod.ts";
import * as pgb from "../../../shared/ha/pgbouncer.ts";
import { FileRouter } from "../../../shared/ha/routers.ts";
import { mkdirOwned, type PgBouncer, runCommand, waitFor, withStack } from "../../harness/mod.ts";

/** SHOW VERSION on the admin console at `url` (simple protocol, as the routers speak it). */
async function adminVersion(url: string): Promise<string> {
  const admin = pgb.adminClient(url);
  try {
    const [row] = await admin.unsafe("SHOW VERSION").simple();
    return String(row.version);
  } finally {
    await admin.end({ timeout: 1 });
  }
}

/** psql through PgBouncer as the application user; `conninfo` adds libpq keywords (sslmode...). */
function psql(m: PgBouncer, conninfo: string, sql: string) {
  const u = new URL(m.url());
  return runCommand("psql", [
    "-X",
    "-At",
    "-c",
    sql,
    `host=${u.hostname} port=${u.port} user=${u.username} dbname=postgres connect_timeout=5 ${conninfo}`,
  ], { env: { PGPASSWORD: decodeURIComponent(u.password) } });
}

/** Starts the entrypoint expecting it to refuse: its exit code and log, and whether it listened. */
async function refusedStart(m: PgBouncer): Promise<{ code: number; served: boolean }> {
  await m.stop();
  const proc = await m.launch();
  let served = false;
  await waitFor("the entrypoint to exit", async () => {
    served ||= await m.listening();
    return proc.exited;
  }, 20_000);
  return { code: (await proc.status).code, served };
}

Deno.test("the PgBouncer entrypoint: admin console on the local socket only, client TLS by default", async (t) => {
  await withStack({ name: "pgbouncer-entrypoint", pgbouncer: true }, async (stack) => {
    const m = stack.pgbouncer!;
    const restart = async (env: Record<string, string>) => {
      await m.stop();
      m.env = env;
      await m.start();
    };

    await stack.step(
      t,
      "the admin console answers on the local socket and refuses TCP; applications log in over TCP",
      async () => {
        assert.match(stack.env().PGBOUNCER_ADMIN_URL!, /\?host=\//);
        assert.match(await adminVersion(stack.env().PGBOUNCER_ADMIN_URL!), /^PgBouncer 1\./);
        const router = new FileRouter(
          stack.env().PGBOUNCER_ADMIN_URL!,
          "postgres",
          m.databasesFile,
        );
        try {
          assert.equal((await router.current()).target?.port, stack.primary!.port);
        } finally {
          await router.close();
        }
        await assert.rejects(() => adminVersion(m.adminTcpUrl()), /login rejected/);
        const app = createSql(m.url(), { max: 1 });
        try {
          const [{ one }] = await app`select 1 as one`;
          assert.equal(one, 1);
        } finally {
          await app.end({ timeout: 1 });
        }
      },
    );

    await stack.step(t, "ADMIN_OVER_TCP=1 opens the admin console over TCP", async () => {
      await restart({ ADMIN_OVER_TCP: "1" });
      try {
        assert.match(await adminVersion(m.adminTcpUrl()), /^PgBouncer 1\./);
      } finally {
        await restart({});
      }
      await assert.rejects(() => adminVersion(m.adminTcpUrl()), /login rejected/);
    });

    await stack.step(
      t,
      "without a certificate the entrypoint refuses to start unless CLIENT_TLS_SSLMODE=disable is said",
      async () => {
        m.env = { CLIENT_TLS_SSLMODE: "" };
        const r = await refusedStart(m);
        assert.notEqual(r.code, 0);
        assert.equal(r.served, false);
        assert.match(await Deno.readTextFile(m.logPath), /client TLS is required/);
        m.env = { CLIENT_TLS_SSLMODE: "require" };
        assert.notEqual((await refusedStart(m)).code, 0, "require without a certificate");
        await restart({});
      },
    );

    await stack.step(
      t,
      "with a certificate clients connect over TLS, and plain connections are refused",
      async () => {
        const dir = `${stack.dir}/tls`;
        await mkdirOwned(stack.user, dir);
        const gen = await runCommand("openssl", [
          "req",
          "-x509",
          "-newkey",
          "ec",
          "-pkeyopt",
          "ec_paramgen_curve:prime256v1",
          "-nodes",
          "-days",
          "1",
          "-subj",
          "/CN=localhost",
          "-addext",
          "subjectAltName=DNS:localhost,IP:127.0.0.1",
          "-keyout",
          `${dir}/key.pem`,
          "-out",
          `${dir}/cert.pem`,
        ]);
        assert.equal(gen.code, 0, gen.stderr);
        await restart({
          CLIENT_TLS_CERT: await Deno.readTextFile(`${dir}/cert.pem`),
          CLIENT_TLS_KEY: await Deno.readTextFile(`${dir}/key.pem`),
          CLIENT_TLS_SSLMODE: "", // the default with a certificate: require
        });
        try {
          const verified = await psql(
            m,
            `sslmode=verify-full sslrootcert=${dir}/cert.pem`,
            "select 'over tls'",
          );
          assert.equal(verified.code, 0, verified.stderr);
          assert.equal(verified.stdout.trim(), "over tls");
          const required = await psql(m, "sslmode=require", "select 1");
          assert.equal(required.code, 0, required.stderr);
          const plain = await psql(m, "sslmode=disable", "select 1");
          assert.notEqual(plain.code, 0);
          assert.match(plain.stderr, /SSL required/);
          // The admin console over the socket still works (the entrypoint's own commands use it);
          // (psql, not postgres.js: its TLS upgrade timed out under Deno 2.1 here.)
          assert.match(await adminVersion(m.adminUrl()), /^PgBouncer 1\./);
        } finally {
          await restart({});
        }
      },
    );
  });
});
