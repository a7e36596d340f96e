/**
 * A stand-in for the Fly Machines API (api.machines.dev), which cannot be reached from here. It
 * implements the documented endpoints the fly router calls, with their documented shapes, and
 * nothing else:
 *
 *   GET    /v1/apps/{app}/machines                      → [{id, name, state, region, ...}]
 *   POST   /v1/apps/{app}/machines/{id}/lease          {ttl, description} → 200 {status, data: {nonce, expires_at, owner, description, version}}; 409 when held
 *   DELETE /v1/apps/{app}/machines/{id}/lease          header fly-machine-lease-nonce → 200; 409 on a wrong nonce
 *   POST   /v1/apps/{app}/machines/{id}/exec           {cmd | command, timeout} → {exit_code, exit_signal, stdout, stderr}
 *
 * Each "machine" is a real PgBouncer of the stack started from deploy/fly-pgbouncer; exec runs
 * the image's /app/entrypoint.sh (our deploy/fly-pgbouncer/entrypoint.sh) with that machine's
 * environment. A machine is listed `started` while its entrypoint runs (as on Fly, where the
 * boot check runs inside a started machine) and `stopped` otherwise; a test can list it in any
 * other state Fly documents (replacing, starting, suspended, ...) through `states`. Requests
 * without `Authorization: Bearer <token>` or `FlyV1 <token>` get 401.
 */
import type { PgBouncer } from "./pgbouncer.ts";

interface Lease {
  nonce: string;
  expiresAt: number;
  description: string;
}

export interface FlyRequestLog {
  method: string;
  path: string;
  body?: unknown;
  status: number;
}

export class FlyStandIn {
  readonly token = `fm2_${crypto.randomUUID().replaceAll("-", "")}`;
  readonly requests: FlyRequestLog[] = [];
  readonly #leases = new Map<string, Lease>();
  readonly #machines: Map<string, PgBouncer>;
  #server?: Deno.HttpServer;
  origin = "";
  /** Test hook: make an exec fail (exit 1) when this returns true. */
  failExec?: (machineId: string, argv: string[]) => boolean;
  /** Test hook: runs before an exec is carried out (e.g. start another machine meanwhile). */
  beforeExec?: (machineId: string, argv: string[]) => Promise<void>;
  /** Test hook: the state GET /machines lists a machine in, instead of started/stopped. */
  readonly states = new Map<string, string>();

  constructor(readonly app: string, machines: PgBouncer[]) {
    this.#machines = new Map(
      machines.map((m, i) => [`e28${String(i).padStart(3, "0")}a1b2c3d4`, m]),
    );
  }

  get machineIds(): string[] {
    return [...this.#machines.keys()];
  }

  machine(id: string): PgBouncer {
    return this.#machines.get(id)!;
  }

  start(): Promise<void> {
    return new Promise((resolve) => {
      this.#server = Deno.serve({
        hostname: "127.0.0.1",
        port: 0,
        onListen: ({ port }) => {
          this.origin = `http://127.0.0.1:${port}`;
          resolve();
        },
      }, (req) => this.#handle(req));
    });
  }

  async stop(): Promise<void> {
    await this.#server?.shutdown();
  }

  async #handle(req: Request): Promise<Response> {
    const url = new URL(req.url);
    let body: unknown;
    if (req.method === "POST") body = await req.json().catch(() => undefined);
    const res = await this.#route(req, url, body);
    this.requests.push({ method: req.method, path: url.pathname, body, status: res.status });
    return res;
  }

  async #route(req: Request, url: URL, body: unknown): Promise<Response> {
    const auth = req.headers.get("authorization") ?? "";
    if (auth !== `Bearer ${this.token}` && auth !== `FlyV1 ${this.token}`) {
      return Response.json({ error: "unauthorized" }, { status: 401 });
    }
    const m = /^\/v1\/apps\/([^/]+)\/machines(?:\/([^/]+)(?:\/(lease|exec))?)?$/.exec(url.pathname);
    if (!m || m[1] !== this.app) return Response.json({ error: "not found" }, { status: 404 });
    const [, , id, action] = m;
    if (!id) {
      if (req.method !== "GET") {
        return Response.json({ error: "method not allowed" }, { status: 405 });
      }
      return Response.json(this.machineIds.map((mid) => ({
        id: mid,
        name: `pgbouncer-${mid.slice(0, 6)}`,
        state: this.states.get(mid) ?? (this.#machines.get(mid)!.running ? "started" : "stopped"),
        region: "iad",
        instance_id: `01H${mid.toUpperCase()}`,
      })));
    }
    const machine = this.#machines.get(id);
    if (!machine) return Response.json({ error: "machine not found" }, { status: 404 });
    if (action === "lease") return this.#lease(req, id, body);
    if (action === "exec" && req.method === "POST") return await this.#exec(id, machine, body);
    return Response.json({ error: "not found" }, { status: 404 });
  }

  #lease(req: Request, id: string, body: unknown): Response {
    const now = Date.now();
    const held = this.#leases.get(id);
    if (held && held.expiresAt <= now) this.#leases.delete(id);
    if (req.method === "POST") {
      const b = (body ?? {}) as { ttl?: number; description?: string };
      if (this.#leases.has(id)) {
        return Response.json({ error: "lease currently held" }, { status: 409 });
      }
      const lease = {
        nonce: crypto.randomUUID().replaceAll("-", "").slice(0, 16),
        expiresAt: now + (b.ttl ?? 30) * 1000,
        description: b.description ?? "",
      };
      this.#leases.set(id, lease);
      return Response.json({
        status: "success",
        data: {
          nonce: lease.nonce,
          expires_at: Math.floor(lease.expiresAt / 1000),
          owner: "sa-toolkit@example.com",
          description: lease.description,
          version: crypto.randomUUID(),
        },
      });
    }
    if (req.method === "DELETE") {
      const nonce = req.headers.get("fly-machine-lease-nonce");
      const lease = this.#leases.get(id);
      if (!lease) return Response.json({ status: "success" });
      if (lease.nonce !== nonce) {
        return Response.json({ error: "lease nonce mismatch" }, { status: 409 });
      }
      this.#leases.delete(id);
      return Response.json({ status: "success" });
    }
    return Response.json({ error: "method not allowed" }, { status: 405 });
  }

  async #exec(id: string, machine: PgBouncer, body: unknown): Promise<Response> {
    const b = (body ?? {}) as { cmd?: string; command?: string[]; timeout?: number };
    const argv = b.command ?? (b.cmd ?? "").trim().split(/\s+/).filter(Boolean);
    if (argv[0] !== "/app/entrypoint.sh") {
      return Response.json({ exit_code: 127, stdout: "", stderr: `${argv[0] ?? ""}: not found` });
    }
    await this.beforeExec?.(id, argv);
    if (this.failExec?.(id, argv)) {
      return Response.json({ exit_code: 1, stdout: "", stderr: "injected failure" });
    }
    const r = await machine.entrypoint(argv.slice(1), b.timeout ?? 30);
    return Response.json({ exit_code: r.code, exit_signal: 0, stdout: r.stdout, stderr: r.stderr });
  }
}
