/**
 * The README cannot rot: every ```sh block preceded by `<!-- test -->` is run, in order, with bash
 * against a local stack prepared exactly like `./toolkit dev` (tests/harness/dev_data.ts), the
 * dev URL http://127.0.0.1:54321 replaced by this stack's. The blocks check their own answers
 * (`curl -f`, `jq -e`); each must exit 0. Every `./toolkit <command>` the README mentions must
 * be a command `./toolkit` knows.
 */
import assert from "node:assert/strict";
import { REPO_ROOT, runCommand, withStack } from "../harness/mod.ts";
import { seedDevData } from "../harness/dev_data.ts";

export function testedBlocks(markdown: string): { line: number; script: string }[] {
  const lines = markdown.split("\n");
  const out: { line: number; script: string }[] = [];
  for (let i = 0; i < lines.length; i++) {
    if (lines[i].trim() !== "<!-- test -->") continue;
    let j = i + 1;
    while (j < lines.length && lines[j].trim() === "") j++;
    if (lines[j]?.trim() !== "```sh") {
      throw new Error(`README.md:${i + 1}: <!-- test --> not followed by a sh block`);
    }
    const body: string[] = [];
    for (j++; j < lines.length && lines[j].trim() !== "```"; j++) body.push(lines[j]);
    out.push({ line: i + 2, script: body.join("\n") });
  }
  return out;
}

Deno.test("every ./toolkit command the README names exists", async () => {
  const readme = await Deno.readTextFile(`${REPO_ROOT}/README.md`);
  const toolkit = await Deno.readTextFile(`${REPO_ROOT}/toolkit`);
  const named = new Set([...readme.matchAll(/\.\/toolkit ([a-z][a-z-]*)/g)].map((m) => m[1]));
  assert.ok(named.has("dev") && named.has("test"), "the two commands are documented");
  for (const cmd of named) {
    assert.match(toolkit, new RegExp(`^\\s+${cmd}\\)`, "m"), `./toolkit ${cmd} is not a command`);
  }
  const ci = await Deno.readTextFile(`${REPO_ROOT}/.ci/run`);
  assert.match(ci, /\.\/toolkit test/, ".ci/run runs the README's test command");
});

Deno.test("the README's examples work against the local stack", async (t) => {
  const readme = await Deno.readTextFile(`${REPO_ROOT}/README.md`);
  const blocks = testedBlocks(readme);
  assert.ok(blocks.length >= 3, `README.md has ${blocks.length} tested blocks`);
  await withStack(
    { name: "readme", ha: true, s3: true, storage: true, functions: true },
    async (stack) => {
      await seedDevData(stack);
      const origin = stack.functions!.origin;
      const env = {
        PATH: "/usr/local/bin:/usr/bin:/bin",
        HOME: Deno.env.get("HOME") ?? "/root",
        TOOLKIT_API_TOKEN: stack.tokens.api,
        FAILOVER_TOKEN: stack.tokens.failover,
        HEALTH_TOKEN: stack.tokens.health,
      };
      const work = await Deno.makeTempDir({ prefix: "sa-toolkit-readme-" });
      try {
        for (const block of blocks) {
          await stack.step(t, `README.md:${block.line}`, async () => {
            const script = block.script.replaceAll("http://127.0.0.1:54321", origin);
            const r = await runCommand("bash", ["-euo", "pipefail", "-c", script], {
              env,
              clearEnv: true,
              cwd: work,
            });
            if (r.code !== 0) {
              throw new Error(
                `README.md:${block.line} failed (exit ${r.code}):\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`,
              );
            }
            console.log(r.stdout.trim().split("\n").slice(0, 12).map((l) => `    ${l}`).join("\n"));
          });
        }
      } finally {
        await Deno.remove(work, { recursive: true });
      }
    },
  );
});
