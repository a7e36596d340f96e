/**
 * The Fly.io PgBouncer image cannot be built here (no Docker), so its pieces are checked for
 * consistency with each other and with the code that drives them; the entrypoint and template
 * themselves run in every HA test through the local stack.
 */
import assert from "node:assert/strict";
import { FlyRouter } from "../../shared/ha/routers.ts";
import { PGBOUNCER_DEPLOY_DIR } from "../harness/paths.ts";

const read = (name: string) => Deno.readTextFile(`${PGBOUNCER_DEPLOY_DIR}/${name}`);

Deno.test("the Fly PgBouncer image: Dockerfile, fly.toml, entrypoint and template agree", async () => {
  const [dockerfile, flyToml, entrypoint, template] = await Promise.all([
    read("Dockerfile"),
    read("fly.toml"),
    read("entrypoint.sh"),
    read("pgbouncer.ini.template"),
  ]);
  for (const m of dockerfile.matchAll(/^COPY (.+) \/app\/$/gm)) {
    for (const file of m[1].split(/\s+/)) await Deno.stat(`${PGBOUNCER_DEPLOY_DIR}/${file}`);
  }
  const router = new FlyRouter("http://x", "app", "token", "postgres");
  assert.match(dockerfile, new RegExp(`ENTRYPOINT \\["${router.entrypoint}"\\]`));
  const stateDir = /PGBOUNCER_STATE_DIR=(\S+)/.exec(dockerfile)?.[1];
  assert.equal(stateDir, "/data");
  assert.match(flyToml, new RegExp(`destination = "${stateDir}"`));
  const listen = /LISTEN_PORT=(\d+)/.exec(dockerfile)?.[1];
  assert.match(flyToml, new RegExp(`internal_port = ${listen}`));
  const placeholders = [...template.matchAll(/@(PGB_[A-Z_]+)@/g)].map((m) => m[1]);
  assert.ok(placeholders.length >= 10);
  for (const p of new Set(placeholders)) {
    assert.match(entrypoint, new RegExp(`\\b${p}=`), `${p} is never rendered`);
  }
  for (const cmd of ["route", "pause", "resume", "show"]) {
    assert.match(entrypoint, new RegExp(`^  ${cmd}\\)`, "m"));
  }
});
