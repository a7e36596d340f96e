/**
 * Catalog manifest: on PostgreSQL 15, 16, 17 and 18, every view and column the collectors read
 * exists exactly where their version probes expect it, and the views match the checked-in
 * manifests (tests/catalog/pgNN.tsv; regenerate with tests/catalog/generate.ts).
 */
import assert from "node:assert/strict";
import { withStack } from "../../harness/mod.ts";
import { FUNCTIONS, MANIFEST_SQL, MANIFEST_VIEWS, READS } from "../../catalog/reads.ts";

Deno.test("every catalog column the collectors read exists where their probes expect it, on 15-18", async (t) => {
  await withStack({ name: "catalog", primary: true, versions: [16, 17, 18] }, async (stack) => {
    for (const cluster of stack.allClusters) {
      const v = cluster.version;
      const rows = await cluster.sql("postgres").unsafe(MANIFEST_SQL, [MANIFEST_VIEWS]);
      const live = new Set(rows.map((r) => `${r.view}.${r.column}`));

      await stack.step(
        t,
        `PG${v}: columns exist inside their version range and are gone outside it`,
        () => {
          for (const read of READS) {
            const expected = (read.from ?? 0) <= v && v <= (read.until ?? 99);
            for (const column of read.columns) {
              assert.equal(
                live.has(`${read.view}.${column}`),
                expected,
                `${read.view}.${column} on PG${v}`,
              );
            }
          }
        },
      );

      await stack.step(
        t,
        `PG${v}: every statistics function the collectors call exists`,
        async () => {
          for (const fn of FUNCTIONS) {
            const [{ ok }] = await cluster.sql(
              "postgres",
            )`select to_regprocedure(${fn}) is not null as ok`;
            assert.equal(ok, true, `${fn} on PG${v}`);
          }
        },
      );

      await stack.step(t, `PG${v}: the views match tests/catalog/pg${v}.tsv`, async () => {
        const pinned = await Deno.readTextFile(
          new URL(`../../catalog/pg${v}.tsv`, import.meta.url),
        );
        const now = rows.map((r) => `${r.view}\t${r.column}\t${r.type}`).join("\n") + "\n";
        assert.equal(now, pinned);
      });
    }
  });
});
