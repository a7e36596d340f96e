/**
 * Regenerates tests/catalog/pgNN.tsv from live servers of the local stack:
 *   ./toolkit deno run -A tests/catalog/generate.ts
 * Review the diff: a changed manifest means PostgreSQL changed a view the collectors read.
 */
import { withStack } from "../harness/mod.ts";
import { MANIFEST_SQL, MANIFEST_VIEWS } from "./reads.ts";

await withStack({ name: "catalog", primary: true, versions: [16, 17, 18] }, async (stack) => {
  for (const cluster of stack.allClusters) {
    const rows = await cluster.sql("postgres").unsafe(MANIFEST_SQL, [MANIFEST_VIEWS]);
    const tsv = rows.map((r) => `${r.view}\t${r.column}\t${r.type}`).join("\n") + "\n";
    const path = new URL(`./pg${cluster.version}.tsv`, import.meta.url);
    await Deno.writeTextFile(path, tsv);
    console.log(`wrote ${path.pathname} (${rows.length} columns)`);
  }
});
