/**
 * The runbooks cannot rot: every ```sh block of the HA runbooks is run, in order, with bash
 * against the local stack (the FUNCTIONS_URL, FAILOVER_TOKEN and HEALTH_TOKEN they document), and
 * must exit 0 — the blocks carry their own checks (`jq -e`, `[ "$STATE" = succeeded ]`).
 * `<!-- test: stop primary -->` / `<!-- test: start primary -->` comments in a runbook are where
 * this test does what the reader's situation implies (the primary dies, comes back).
 */
import assert from "node:assert/strict";
import { REPO_ROOT, runCommand, setupHa, type Stack, withStack } from "../harness/mod.ts";

interface Segment {
  before?: string;
  script: string;
  blocks: number;
}

/** Splits a runbook into runs of ```sh blocks separated by test hooks. */
export function segments(markdown: string): Segment[] {
  const out: Segment[] = [{ script: "", blocks: 0 }];
  const lines = markdown.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const hook = /^<!-- test: (.+) -->$/.exec(lines[i].trim());
    if (hook) {
      out.push({ before: hook[1], script: "", blocks: 0 });
      continue;
    }
    if (lines[i].trim() === "```sh") {
      const body: string[] = [];
      for (i++; i < lines.length && lines[i].trim() !== "```"; i++) body.push(lines[i]);
      const seg = out.at(-1)!;
      seg.script += body.join("\n") + "\n";
      seg.blocks++;
    }
  }
  return out.filter((s) => s.blocks > 0 || s.before);
}

async function hook(stack: Stack, action: string): Promise<void> {
  if (action === "stop primary") {
    // The heartbeat pg_cron would have stamped (Debian's pg_cron 1.4 only runs it every minute).
    await stack.primary!.psql("select ha.beat();", { role: "postgres" });
    await new Promise((r) => setTimeout(r, 500));
    await stack.primary!.stop("immediate");
  } else if (action === "start primary") {
    await stack.primary!.start();
  } else {
    throw new Error(`unknown runbook test hook: ${action}`);
  }
}

const RUNBOOKS = ["monitoring", "failover", "failback", "game-day", "emergency"];

Deno.test("the HA runbooks' commands work against the local stack", async (t) => {
  await withStack({ name: "runbooks", ha: true, functions: true }, async (stack) => {
    await setupHa(stack);
    const env = {
      PATH: "/usr/local/bin:/usr/bin:/bin",
      HOME: Deno.env.get("HOME") ?? "/root",
      FUNCTIONS_URL: `${stack.functions!.origin}/functions/v1`,
      FAILOVER_TOKEN: stack.tokens.failover,
      HEALTH_TOKEN: stack.tokens.health,
    };
    for (const name of RUNBOOKS) {
      const text = await Deno.readTextFile(`${REPO_ROOT}/runbooks/${name}.md`);
      const parts = segments(text);
      assert.ok(parts.reduce((a, s) => a + s.blocks, 0) >= 2, `${name}.md has runnable blocks`);
      await stack.step(t, `runbooks/${name}.md`, async () => {
        for (const part of parts) {
          if (part.before) await hook(stack, part.before);
          if (!part.blocks) continue;
          const r = await runCommand("bash", ["-euo", "pipefail", "-c", part.script], {
            env,
            clearEnv: true,
          });
          if (r.code !== 0) {
            throw new Error(
              `runbooks/${name}.md failed (exit ${r.code}):\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`,
            );
          }
          console.log(r.stdout.trim().split("\n").map((l) => `    ${l}`).join("\n"));
        }
      });
    }
  });
});
