/** The real Supabase CLI, used exactly as a customer would: `supabase db push --db-url ...`. */
import { redactText } from "../../shared/http/redact.ts";
import { REPO_ROOT, SUPABASE_CLI } from "./paths.ts";
import { runCommand } from "./process.ts";

export interface PushResult {
  output: string;
  appliedAny: boolean;
}

/** Applies `supabase/migrations` to the database at `url` (a non-superuser role's URL). */
export async function dbPush(url: string, extraArgs: string[] = []): Promise<PushResult> {
  const withSsl = url.includes("?") ? `${url}&sslmode=disable` : `${url}?sslmode=disable`;
  const r = await runCommand(SUPABASE_CLI, [
    "db",
    "push",
    "--db-url",
    withSsl,
    "--yes",
    ...extraArgs,
  ], {
    cwd: REPO_ROOT,
    env: { SUPABASE_TELEMETRY_DISABLED: "1", DO_NOT_TRACK: "1" },
  });
  const output = redactText(`${r.stdout}\n${r.stderr}`).trim();
  if (r.code !== 0) throw new Error(`supabase db push failed (exit ${r.code}):\n${output}`);
  return { output, appliedAny: /Applying migration/i.test(output) };
}
