/**
 * What `./toolkit dev` puts in the local stack so that the README's examples work as written
 * (tests/e2e/readme_test.ts runs them against a stack prepared by this same function):
 * the HA pair under replication with `public.ledger`/`public.accounts`, a finished telemetry run
 * named `nightly-etl` to compare against, and a Storage bucket `avatars` with a few objects.
 */
import { setupHa } from "./ha.ts";
import type { Stack } from "./stack.ts";

export async function seedDevData(stack: Stack): Promise<void> {
  await setupHa(stack);
  const sql = stack.primary!.sql("postgres", { max: 1 });
  try {
    const [{ id }] = await sql`select telemetry.start_run('nightly-etl') as id`;
    await sql`select pg_sleep(0.2)`;
    await sql`select telemetry.end_run(${id})`;
  } finally {
    await sql.end();
  }
  if (stack.storage) {
    await stack.storage.createBucket("avatars");
    await stack.storage.seed([
      { bucket: "avatars", name: "alice.png", size: 48_000, mimetype: "image/png" },
      {
        bucket: "avatars",
        name: "team photos/Zoë & Jörg (2026).jpg",
        size: 9 * 1024 * 1024 + 3,
        mimetype: "image/jpeg",
        userMetadata: { photographer: "Zoë" },
      },
      { bucket: "avatars", name: "README.html", body: "<p>avatars</p>", mimetype: "text/html" },
    ]);
  }
}
