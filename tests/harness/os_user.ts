/**
 * PostgreSQL refuses to run as root and CI runs as root, so every server of the local stack runs
 * as an unprivileged OS user. As root the harness creates `sa_toolkit` (once) and drops to it with
 * setpriv; as any other user the servers simply run as that user. Either way setpriv arms a
 * parent-death signal, so a crashed or killed test run cannot leave servers behind.
 */

export const SERVER_USER_NAME = "sa_toolkit";

export interface ServerUser {
  name: string;
  uid: number;
  gid: number;
  /** True when the harness itself runs as root and must drop privileges for servers. */
  dropPrivileges: boolean;
}

let cached: Promise<ServerUser> | undefined;

async function run(
  cmd: string,
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

async function lookup(name: string): Promise<{ uid: number; gid: number } | undefined> {
  const r = await run("getent", ["passwd", name]);
  if (r.code !== 0) return undefined;
  const [, , uid, gid] = r.stdout.trim().split(":");
  return { uid: Number(uid), gid: Number(gid) };
}

export function serverUser(): Promise<ServerUser> {
  cached ??= (async () => {
    const uid = Deno.uid();
    if (uid === null) throw new Error("The local stack needs a POSIX system (Linux).");
    if (uid !== 0) {
      const r = await run("id", ["-un"]);
      return { name: r.stdout.trim(), uid, gid: Deno.gid() ?? uid, dropPrivileges: false };
    }
    let found = await lookup(SERVER_USER_NAME);
    if (!found) {
      const r = await run("useradd", [
        "--system",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        SERVER_USER_NAME,
      ]);
      found = await lookup(SERVER_USER_NAME);
      if (!found) {
        throw new Error(
          `Could not create the OS user ${SERVER_USER_NAME} for the local servers: ${r.stderr.trim()}`,
        );
      }
    }
    return { name: SERVER_USER_NAME, ...found, dropPrivileges: true };
  })();
  return cached;
}

/** The argv that runs `cmd args` as the server user with a parent-death signal armed. */
export function asServerUser(
  user: ServerUser,
  deathSignal: string,
  cmd: string,
  args: string[],
): string[] {
  const drop = user.dropPrivileges
    ? [`--reuid=${user.uid}`, `--regid=${user.gid}`, "--clear-groups"]
    : [];
  return ["setpriv", ...drop, "--pdeathsig", deathSignal, "--", cmd, ...args];
}

/** Creates a directory owned by the server user (mode 0700 unless told otherwise). */
export async function mkdirOwned(user: ServerUser, path: string, mode = 0o700): Promise<void> {
  await Deno.mkdir(path, { recursive: true, mode });
  await Deno.chmod(path, mode);
  if (user.dropPrivileges) await Deno.chown(path, user.uid, user.gid);
}

/** Writes a file the server user owns. */
export async function writeOwned(
  user: ServerUser,
  path: string,
  content: string,
  mode = 0o600,
): Promise<void> {
  await Deno.writeTextFile(path, content, { mode });
  await Deno.chmod(path, mode);
  if (user.dropPrivileges) await Deno.chown(path, user.uid, user.gid);
}

/** True when the server user can execute `path` (every parent directory must be traversable). */
export async function serverUserCanExecute(user: ServerUser, path: string): Promise<boolean> {
  const [cmd, ...args] = asServerUser(user, "SIGKILL", "test", ["-x", path]);
  const out = await new Deno.Command(cmd, { args, stdout: "null", stderr: "null" }).output();
  return out.code === 0;
}
