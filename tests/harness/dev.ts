/**
 * `deno task dev`: the whole local stack on an embedded default, the four functions served at
 * http://127.0.0.1:54321/functions/v1/<name>/ (the URL shape of Supabase's local stack), tokens
 * generated (or read from `.env.dev`), ready-to-paste curl lines, clean shutdown on Ctrl-C.
 */
import { isFree } from "./ports.ts";
import { REPO_ROOT } from "./paths.ts";
import { seedDevData } from "./dev_data.ts";
import { type StackTokens, startStack } from "./stack.ts";

const port = Number(Deno.env.get("DEV_PORT") ?? 54321);

async function readEnvFile(path: string): Promise<Record<string, string>> {
  try {
    const text = await Deno.readTextFile(path);
    const out: Record<string, string> = {};
    for (const line of text.split("\n")) {
      const m = /^\s*(?:export\s+)?([A-Z0-9_]+)\s*=\s*"?([^"\n]*)"?\s*$/.exec(line);
      if (m) out[m[1]] = m[2];
    }
    return out;
  } catch {
    return {};
  }
}

if (!isFree(port)) {
  console.error(
    `Port ${port} is already in use (another \`deno task dev\`?). Stop it, or run with DEV_PORT=<port>.`,
  );
  Deno.exit(1);
}

const envFile = `${REPO_ROOT}/.env.dev`;
const fromFile = await readEnvFile(envFile);
const tokens: Partial<StackTokens> = {
  api: fromFile.TOOLKIT_API_TOKEN,
  failover: fromFile.FAILOVER_TOKEN,
  health: fromFile.HEALTH_TOKEN,
};

console.log(
  "Starting the SA Toolkit local stack (PostgreSQL 15 primary + standby under replication, PgBouncer, S3, Storage stand-in) ...",
);
const started = performance.now();
const stack = await startStack({
  name: "dev",
  ha: true,
  s3: true,
  storage: true,
  functions: { port },
}, tokens);
stack.stopOnSignals(() => {
  console.log("Stopped. Nothing is left running.");
  Deno.exit(0);
});
// public.ledger/public.accounts replicated to the standby, a finished `nightly-etl` run, and a
// Storage bucket `avatars`: what the README's examples use.
await seedDevData(stack);

const base = `http://127.0.0.1:${port}/functions/v1`;
const seconds = ((performance.now() - started) / 1000).toFixed(1);
const source = Object.keys(fromFile).length ? `read from ${envFile}` : "generated for this run";
console.log(`
The local stack is up (${seconds} s).

Databases (user postgres, not a superuser, like on Supabase):
  primary    ${stack.primary!.url()}
  standby    ${stack.standby!.url()}
  pgbouncer  ${stack.pgbouncer!.url()}
  admin      ${stack.pgbouncer!.adminUrl()}
S3 (s3rver)  ${stack.s3!.endpoint}  bucket ${stack.s3!.buckets[0]}
Storage      ${stack.storage!.origin}  (stand-in of the Storage REST API; bucket avatars)
Functions    ${base}/{telemetry,health,failover,storage-to-s3}/

Tokens (${source}; put them in .env.dev to keep them):
export TOOLKIT_API_TOKEN=${stack.tokens.api}
export FAILOVER_TOKEN=${stack.tokens.failover}
export HEALTH_TOKEN=${stack.tokens.health}

Try:
curl -s -H "Authorization: Bearer $TOOLKIT_API_TOKEN" ${base}/telemetry/
curl -s -H "Authorization: Bearer $HEALTH_TOKEN" ${base}/health/primary
curl -s -H "Authorization: Bearer $FAILOVER_TOKEN" ${base}/failover/checks
curl -s -X POST -H "Authorization: Bearer $FAILOVER_TOKEN" -d '{"mode":"planned"}' ${base}/failover
curl -s -H "Authorization: Bearer $TOOLKIT_API_TOKEN" ${base}/storage-to-s3/

HA dashboard (open in a browser): ${base}/health/dashboard?token=${stack.tokens.health}

Press Ctrl-C to stop everything.`);

// Keep the process alive until a signal arrives.
await new Promise(() => {});
