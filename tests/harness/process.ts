/**
 * Server processes of the local stack. Each runs as the server user, writes stdout and stderr to
 * its own log file (through `sh -c 'exec ...'`, so the pid we hold is the server's), and is
 * registered for emergency cleanup: if the harness process ends without stopping it, the kernel's
 * parent-death signal stops it, and the `unload` handler signals it as well.
 */
import { asServerUser, type ServerUser } from "./os_user.ts";
import { TEMP_PREFIX } from "./paths.ts";

export interface SpawnOptions {
  name: string;
  cmd: string;
  args: string[];
  logPath: string;
  user: ServerUser;
  /** What the kernel sends the server if the harness dies (SIGQUIT for postgres: immediate). */
  deathSignal: Deno.Signal;
  env?: Record<string, string>;
  cwd?: string;
}

const live = new Set<ServerProcess>();
const liveDirs = new Set<string>();

export class ServerProcess {
  readonly name: string;
  readonly pid: number;
  readonly logPath: string;
  readonly deathSignal: Deno.Signal;
  readonly status: Promise<Deno.CommandStatus>;
  #exited = false;

  private constructor(options: SpawnOptions, child: Deno.ChildProcess) {
    this.name = options.name;
    this.pid = child.pid;
    this.logPath = options.logPath;
    this.deathSignal = options.deathSignal;
    this.status = child.status.then((s) => {
      this.#exited = true;
      live.delete(this);
      return s;
    });
  }

  static spawn(options: SpawnOptions): ServerProcess {
    const script = 'exec "$@" >>"$SA_TOOLKIT_LOG" 2>&1';
    const argv = asServerUser(options.user, options.deathSignal, "/bin/sh", [
      "-c",
      script,
      "sh",
      options.cmd,
      ...options.args,
    ]);
    const child = new Deno.Command(argv[0], {
      args: argv.slice(1),
      cwd: options.cwd ?? "/",
      clearEnv: true,
      env: {
        PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        LANG: "C.UTF-8",
        LC_ALL: "C.UTF-8",
        TZ: "UTC",
        ...options.env,
        SA_TOOLKIT_LOG: options.logPath,
        // Lets the after-suite check find every process (and child) of a stack by its environment.
        SA_TOOLKIT_STACK: options.logPath.split("/").find((s) => s.startsWith(TEMP_PREFIX)) ?? "",
      },
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
    const proc = new ServerProcess(options, child);
    live.add(proc);
    return proc;
  }

  get exited(): boolean {
    return this.#exited;
  }

  signal(signal: Deno.Signal): void {
    if (this.#exited) return;
    try {
      Deno.kill(this.pid, signal);
    } catch {
      // Already gone.
    }
  }

  /** Sends `signal`, waits up to `timeoutMs`, then SIGKILLs. Resolves once the process is gone. */
  async stop(signal: Deno.Signal = "SIGTERM", timeoutMs = 15_000): Promise<void> {
    if (this.#exited) return;
    this.signal(signal);
    let timer: number | undefined;
    const timedOut = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), timeoutMs);
    });
    const result = await Promise.race([this.status.then(() => "exited" as const), timedOut]);
    clearTimeout(timer);
    if (result === "timeout") {
      this.signal("SIGKILL");
      await this.status;
    }
  }

  async tailLog(lines = 40): Promise<string> {
    try {
      const text = await Deno.readTextFile(this.logPath);
      return text.split("\n").slice(-lines).join("\n");
    } catch {
      return "(no log)";
    }
  }
}

/** Registers a temp dir for removal if the harness exits without removing it. */
export function trackDir(path: string): void {
  liveDirs.add(path);
}

export function untrackDir(path: string): void {
  liveDirs.delete(path);
}

/** Runs a command to completion; returns exit code and output. */
export async function runCommand(
  cmd: string,
  args: string[],
  options: { env?: Record<string, string>; cwd?: string; clearEnv?: boolean; stdin?: string } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const command = new Deno.Command(cmd, {
    args,
    env: options.env,
    cwd: options.cwd,
    clearEnv: options.clearEnv,
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  });
  const child = command.spawn();
  if (options.stdin !== undefined) {
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode(options.stdin));
    await writer.close();
  }
  const out = await child.output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** Polls `check` every `intervalMs` until it returns true or `timeoutMs` passes. */
export async function waitFor(
  what: string,
  check: () => Promise<boolean> | boolean,
  timeoutMs = 30_000,
  intervalMs = 50,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  while (Date.now() < deadline) {
    try {
      if (await check()) return;
    } catch (e) {
      lastError = e;
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
  const detail = lastError instanceof Error ? `: ${lastError.message}` : "";
  throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}${detail}`);
}

// Last line of defence when the process exits without a clean stop (uncaught error, Deno.exit).
globalThis.addEventListener("unload", () => {
  for (const proc of live) proc.signal(proc.deathSignal);
  for (const dir of liveDirs) {
    try {
      Deno.removeSync(dir, { recursive: true });
    } catch {
      // Best effort: the next harness start sweeps stale dirs.
    }
  }
});
