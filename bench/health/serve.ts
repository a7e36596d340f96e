/**
 * The health function alone in its own process, as an Edge isolate serves it: the benchmark's
 * stack runs its pg_cron and pg_net stand-ins (new connections every few seconds, each with a
 * TLS handshake and SCRAM) in its own process, and they would stall this server's event loop.
 * Prints its origin on stdout, then serves until killed.
 *
 *   deno run -A bench/health/serve.ts '<env as JSON>'
 */
import { serveFunctions } from "../../tests/harness/functions.ts";

const env = JSON.parse(Deno.args[0]) as Record<string, string>;
const server = await serveFunctions(env, { logSink: () => {} });
console.log(server.origin);
