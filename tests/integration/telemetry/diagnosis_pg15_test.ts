/**
 * The diagnosis corpus on PostgreSQL 15: every scenario's injected cause is ranked first, and
 * against the clean baseline run the attribution names the scenario's wait class.
 */
import { runCorpus } from "./diagnosis_corpus.ts";

Deno.test("diagnose ranks each injected cause first on PostgreSQL 15", async (t) => {
  await runCorpus(t, 15);
});
