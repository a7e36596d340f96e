/**
 * A TCP proxy in front of a server: the path the failover function, the standby's subscription
 * and PgBouncer take to a site, so a test can partition the site from them (`cut()`: every
 * connection through it is dropped and the port stops listening, so new ones are refused) while
 * clients that connect to the site directly — its own Data API — still reach it.
 */
import { freePort } from "./ports.ts";

export class TcpProxy {
  readonly host = "127.0.0.1";
  readonly port = freePort();
  #listener?: Deno.Listener;
  #conns = new Set<Deno.Conn>();
  #cut = false;

  constructor(readonly targetHost: string, readonly targetPort: number) {}

  start(): this {
    this.#listener = Deno.listen({ hostname: this.host, port: this.port });
    void this.#accept(this.#listener);
    return this;
  }

  get isCut(): boolean {
    return this.#cut;
  }

  /** Partition: drop every connection through the proxy and refuse new ones. */
  cut(): void {
    this.#cut = true;
    try {
      this.#listener?.close();
    } catch {
      // already closed
    }
    this.#listener = undefined;
    for (const c of this.#conns) this.#close(c);
  }

  heal(): void {
    this.#cut = false;
    if (!this.#listener) this.start();
  }

  async stop(): Promise<void> {
    try {
      this.#listener?.close();
    } catch {
      // already closed
    }
    for (const c of this.#conns) this.#close(c);
    await Promise.resolve();
  }

  #close(c: Deno.Conn): void {
    this.#conns.delete(c);
    try {
      c.close();
    } catch {
      // already closed
    }
  }

  async #accept(listener: Deno.Listener): Promise<void> {
    try {
      for await (const client of listener) {
        if (this.#cut) {
          this.#close(client);
          continue;
        }
        void this.#pipe(client);
      }
    } catch {
      // the listener was closed (cut or stop)
    }
  }

  async #pipe(client: Deno.Conn): Promise<void> {
    let server: Deno.Conn;
    try {
      server = await Deno.connect({ hostname: this.targetHost, port: this.targetPort });
    } catch {
      this.#close(client);
      return;
    }
    this.#conns.add(client);
    this.#conns.add(server);
    const done = () => {
      this.#close(client);
      this.#close(server);
    };
    await Promise.race([
      client.readable.pipeTo(server.writable).catch(() => {}),
      server.readable.pipeTo(client.writable).catch(() => {}),
    ]);
    done();
  }
}
