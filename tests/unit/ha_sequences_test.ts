/** The pure rules of moving sequences across a switchover (the SQL side runs in tests/e2e). */
import assert from "node:assert/strict";
import { explicitIdSequences, floorOf, unraisable } from "../../shared/ha/sequences.ts";

const row = (
  name: string,
  last: bigint | null,
  max: bigint | null,
  increment = 1n,
  seqmax = 9223372036854775807n,
) => ({ schema: "public", name, last, max, increment, seqmax });

Deno.test("the floor is the larger of the last value and the column's maximum, exactly", () => {
  assert.equal(floorOf(row("a", 9007199254740993n, 5n)), 9007199254740993n);
  assert.equal(floorOf(row("a", 5n, 9007199254740995n)), 9007199254740995n);
  assert.equal(floorOf(row("a", null, null)), null);
  assert.equal(floorOf(row("a", 7n, null), row("a", null, 9n)), 9n);
});

Deno.test("descending sequences in use and sequences at their maximum are named", () => {
  assert.deepEqual(
    unraisable([
      row("down", -5n, null, -1n),
      row("down_unused", null, null, -1n),
      row("int_full", 10n, 2147483647n, 1n, 2147483647n),
      row("int_room", 10n, 2147483646n, 1n, 2147483647n),
      row("fine", 10n, 20n),
    ]),
    ["public.down", "public.int_full"],
  );
});

Deno.test("explicit ids: a column above its sequence, or a column fed while the sequence is unused", () => {
  assert.deepEqual(
    explicitIdSequences([row("a", 10n, 11n), row("b", null, 3n), row("c", 10n, 10n)]).map((s) =>
      s.name
    ),
    ["a", "b"],
  );
});
