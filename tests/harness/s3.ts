/** The S3-protocol server of the local stack (s3rver, run under Node as the server user). */
import { mkdirOwned, type ServerUser } from "./os_user.ts";
import { freePort, isListening } from "./ports.ts";
import { ServerProcess, waitFor } from "./process.ts";
import { s3rverScript } from "./tools.ts";

/** s3rver's built-in credentials. */
export const S3RVER_ACCESS_KEY_ID = "S3RVER";
export const S3RVER_SECRET_ACCESS_KEY = "S3RVER";

export class S3Server {
  readonly host = "127.0.0.1";
  readonly port = freePort();
  readonly dir: string;
  readonly dataDir: string;
  readonly logPath: string;
  readonly region = "us-east-1";
  readonly accessKeyId = S3RVER_ACCESS_KEY_ID;
  readonly secretAccessKey = S3RVER_SECRET_ACCESS_KEY;
  #user: ServerUser;
  #buckets: string[];
  #process?: ServerProcess;

  constructor(options: { baseDir: string; user: ServerUser; buckets?: string[] }) {
    this.dir = `${options.baseDir}/s3`;
    this.dataDir = `${this.dir}/data`;
    this.logPath = `${this.dir}/s3rver.log`;
    this.#user = options.user;
    this.#buckets = options.buckets ?? ["sa-toolkit-test"];
  }

  get endpoint(): string {
    return `http://${this.host}:${this.port}`;
  }

  get buckets(): string[] {
    return [...this.#buckets];
  }

  get running(): boolean {
    return this.#process !== undefined && !this.#process.exited;
  }

  async start(): Promise<void> {
    await mkdirOwned(this.#user, this.dir);
    await mkdirOwned(this.#user, this.dataDir);
    const args = [
      await s3rverScript(this.#user),
      "-d",
      this.dataDir,
      "-a",
      this.host,
      "-p",
      String(this.port),
      "--silent",
    ];
    for (const b of this.#buckets) args.push("--configure-bucket", b);
    this.#process = ServerProcess.spawn({
      name: "s3rver",
      cmd: "node",
      args,
      logPath: this.logPath,
      user: this.#user,
      deathSignal: "SIGTERM",
      env: { NODE_ENV: "production" },
    });
    const proc = this.#process;
    await waitFor(
      "the S3 server to listen",
      async () => {
        if (proc.exited) throw new Error(`s3rver exited during start-up:\n${await proc.tailLog()}`);
        return await isListening(this.port);
      },
      20_000,
      40,
    );
  }

  async stop(): Promise<void> {
    await this.#process?.stop("SIGTERM", 10_000);
    this.#process = undefined;
  }
}
