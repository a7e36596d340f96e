/**
 * `./toolkit demo` (the README's guided tour) runs to the end: every tool proves its point over
 * HTTP on a stack of its own, and the process exits 0 having stopped everything.
 */
import assert from "node:assert/strict";
import { REPO_ROOT, runCommand } from "../harness/mod.ts";

Deno.test("the guided demo runs all three tours and proves each point", async () => {
  const r = await runCommand(Deno.execPath(), [
    "run",
    "--allow-all",
    "--config",
    `${REPO_ROOT}/deno.json`,
    `${REPO_ROOT}/tests/harness/demo.ts`,
  ], { cwd: REPO_ROOT });
  const out = r.stdout;
  assert.equal(r.code, 0, `${out}\n${r.stderr}`);
  for (const heading of ["1/3  Batch telemetry", "2/3  HA/DR", "3/3  Storage → S3"]) {
    assert.ok(out.includes(heading), heading);
  }
  assert.match(out, /✔ the diagnosis ranks row_lock_wait first; the HTML report is .*\.html/);
  const ha = [
    ...out.matchAll(
      /✔ writes paused \d+ ms; (\d+) commits acknowledged, (\d+) missing on the new primary, (\d+) duplicate keys/g,
    ),
  ];
  assert.equal(ha.length, 2, "switchover and failback");
  for (const m of ha) {
    assert.ok(Number(m[1]) > 0);
    assert.equal(m[2], "0");
    assert.equal(m[3], "0");
  }
  assert.match(out, /✔ every object is in S3 with the same SHA-256/);
  assert.match(
    out,
    /✔ a second job over the same bucket: 4 objects skipped as unchanged, 0 bytes copied/,
  );
  assert.match(out, /Done in [\d.]+ s\. Stopping the stack/);
});
