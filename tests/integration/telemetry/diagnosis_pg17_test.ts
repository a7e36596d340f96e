/** A subset of the diagnosis corpus on PostgreSQL 17 (catalog differences: pg_stat_checkpointer, pg_stat_io). */
import { runCorpus } from "./diagnosis_corpus.ts";

Deno.test("diagnose ranks each injected cause first on PostgreSQL 17 (subset)", async (t) => {
  await runCorpus(t, 17, [
    "row_lock_wait",
    "idle_in_transaction_blocker",
    "temp_spill",
    "client_stall_in_transaction",
    "cpu_saturation",
  ]);
});
