/**
 * Sequences across a switchover. Sequence values are not replicated (PostgreSQL 18 and earlier),
 * so the new primary's sequences must be set above every value the old one used:
 *
 *   before the pause   read every source sequence and the largest value of the column it feeds;
 *                      raise the target's to that plus a wide margin (`raiseSequences`), and note
 *                      the sequences whose column already holds values above them (explicit ids)
 *   in the pause       read the source's last values again (cheap: no table is read) and the
 *                      column maxima of the noted sequences on the target; raise what is behind
 *   after the resume   read every column maximum on the new primary and raise any sequence still
 *                      below its column (explicit ids written between the first read and the
 *                      freeze into a table that had none)
 *
 * Reads and raises go in pages of PAGE sequences, one statement each, so no statement takes more
 * locks than a small instance's lock table holds.
 */
import type { Sql } from "../db/mod.ts";

const PAGE = 1000;

export interface SequenceRow {
  schema: string;
  name: string;
  /** The last value handed out; null when never used (or not readable). */
  last: bigint | null;
  /** The largest value in the column the sequence feeds; null when not read or empty. */
  max: bigint | null;
  /** Its increment (negative: descending) and its maximum; absent on rows not read here. */
  increment?: bigint;
  seqmax?: bigint;
}

export const sequenceKey = (s: { schema: string; name: string }): string =>
  `${s.schema}\u0000${s.name}`;

const big = (
  v: unknown,
): bigint | null => (v === null || v === undefined ? null : BigInt(String(v)));

function toRow(r: Record<string, unknown>): SequenceRow {
  return {
    schema: String(r.schemaname),
    name: String(r.sequencename),
    last: big(r.last_value),
    max: big(r.column_max),
    increment: big(r.increment) ?? undefined,
    seqmax: big(r.max_value) ?? undefined,
  };
}

/** Every sequence in `schemas`, page by page; with `columnMax`, each owning column's maximum. */
export async function readSequences(
  sql: Sql,
  schemas: string[],
  columnMax: boolean,
): Promise<SequenceRow[]> {
  const out: SequenceRow[] = [];
  let after = { schema: "", name: "" };
  while (true) {
    const rows = await sql`
      select * from ha.sequence_state(${schemas}::text[], ${columnMax}, ${after.schema},
                                      ${after.name}, ${PAGE})`;
    out.push(...rows.map(toRow));
    if (rows.length < PAGE) return out;
    after = out[out.length - 1];
  }
}

/**
 * Reads every sequence once on each of `connections` distinct connections of the pool, so each
 * backend has them in its relation cache: the same read inside the write pause then costs about
 * a tenth (10,000 sequences: 0.5 s on a backend that has not opened them, 0.05 s on one that has).
 */
export async function warmSequences(
  sql: Sql,
  schemas: string[],
  connections: number,
): Promise<void> {
  const reserved = await Promise.all(Array.from({ length: connections }, () => sql.reserve()));
  try {
    await Promise.all(reserved.map((r) => readSequences(r as unknown as Sql, schemas, false)));
  } finally {
    for (const r of reserved) r.release();
  }
}

/** The named sequences only (pairs), page by page. */
export async function readNamedSequences(
  sql: Sql,
  named: { schema: string; name: string }[],
  columnMax: boolean,
): Promise<SequenceRow[]> {
  const out: SequenceRow[] = [];
  for (let i = 0; i < named.length; i += PAGE) {
    const page = named.slice(i, i + PAGE);
    const rows = await sql`
      select * from ha.sequence_state('{}'::text[], ${columnMax}, '', '', ${PAGE},
        ${page.map((s) => s.schema)}::text[], ${page.map((s) => s.name)}::text[])`;
    out.push(...rows.map(toRow));
  }
  return out;
}

/**
 * Raises each sequence whose next value would not be above its floor (the largest value already
 * used) to floor + margin, capped at its maximum; never lowers one. Returns how many moved.
 */
export async function raiseSequences(
  sql: Sql,
  floors: { schema: string; name: string; floor: bigint }[],
  margin: number,
): Promise<number> {
  let moved = 0;
  for (let i = 0; i < floors.length; i += PAGE) {
    const page = floors.slice(i, i + PAGE);
    // An explicit READ WRITE transaction: the target may still carry a standby's read-only default.
    const [{ n }] = await sql.begin(
      "read write",
      (tx) =>
        tx`select ha.raise_sequences(${page.map((s) => s.schema)}::text[], ${
          page.map((s) => s.name)
        }::text[], ${page.map((s) => s.floor.toString())}::text[]::bigint[], ${margin}) as n`,
    );
    moved += Number(n);
  }
  return moved;
}

const maxOf = (...v: (bigint | null | undefined)[]): bigint | null =>
  v.reduce<bigint | null>(
    (m, x) => (x === null || x === undefined ? m : m === null || x > m ? x : m),
    null,
  );

/** The floor a sequence must be above: its last value or its column's maximum, whichever is larger. */
export function floorOf(...rows: (SequenceRow | undefined)[]): bigint | null {
  return maxOf(...rows.flatMap((r) => (r ? [r.last, r.max] : [])));
}

/**
 * The sequences a raise cannot place safely, by name: descending ones that have handed out values
 * (their floor is a minimum, which this does not track), and ascending ones whose floor is at
 * their maximum (no value is left above what is used). `raiseSequences` skips them.
 */
export function unraisable(rows: SequenceRow[]): string[] {
  return rows.filter((s) => {
    if (s.increment !== undefined && s.increment < 0n) return s.last !== null || s.max !== null;
    const floor = floorOf(s);
    return floor !== null && s.seqmax !== undefined && floor >= s.seqmax;
  }).map((s) => `${s.schema}.${s.name}`);
}

/** The sequences whose column holds values above what the sequence handed out (explicit ids). */
export function explicitIdSequences(rows: SequenceRow[]): SequenceRow[] {
  return rows.filter((s) => s.max !== null && (s.last === null || s.max > s.last));
}
