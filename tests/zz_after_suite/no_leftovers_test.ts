/**
 * Runs last (test files run in path order): after the whole suite, no server process of this
 * run is alive and no temp dir of this run is left behind.
 */
import assert from "node:assert/strict";
import { RUN_ID, TEMP_PREFIX, tempRoot } from "../harness/paths.ts";

interface Proc {
  pid: number;
  ppid: number;
  cmdline: string;
  environ: string;
}

async function allProcesses(): Promise<Proc[]> {
  const procs: Proc[] = [];
  for await (const e of Deno.readDir("/proc")) {
    if (!/^\d+$/.test(e.name) || Number(e.name) === Deno.pid) continue;
    try {
      const status = await Deno.readTextFile(`/proc/${e.name}/status`);
      const ppid = Number(/^PPid:\s+(\d+)/m.exec(status)?.[1] ?? 0);
      const cmdline = (await Deno.readTextFile(`/proc/${e.name}/cmdline`)).replaceAll("\0", " ")
        .trim();
      const environ = await Deno.readTextFile(`/proc/${e.name}/environ`).catch(() => "");
      procs.push({ pid: Number(e.name), ppid, cmdline, environ });
    } catch {
      // The process ended while we looked.
    }
  }
  return procs;
}

/** Servers carry SA_TOOLKIT_STACK in their environment or the stack dir in argv; add their children. */
export async function processesOfThisRun(): Promise<string[]> {
  const marker = `${TEMP_PREFIX}${RUN_ID}`;
  const procs = await allProcesses();
  const ours = new Set(
    procs.filter((p) =>
      p.environ.includes(`SA_TOOLKIT_STACK=${marker}`) || p.cmdline.includes(marker)
    ).map((p) => p.pid),
  );
  let grew = true;
  while (grew) {
    grew = false;
    for (const p of procs) {
      if (!ours.has(p.pid) && ours.has(p.ppid)) {
        ours.add(p.pid);
        grew = true;
      }
    }
  }
  return procs.filter((p) => ours.has(p.pid)).map((p) => `${p.pid}: ${p.cmdline}`);
}

Deno.test("after the suite no server process of ours is running and no temp dir is left", async () => {
  assert.deepEqual(await processesOfThisRun(), []);
  const dirs: string[] = [];
  for await (const e of Deno.readDir(tempRoot())) {
    if (e.name.startsWith(`${TEMP_PREFIX}${RUN_ID}`)) dirs.push(e.name);
  }
  assert.deepEqual(dirs, []);
});
