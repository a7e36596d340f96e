/**
 * Headless Chromium (Debian's package) driven over the DevTools protocol: open a page, collect
 * console messages and uncaught exceptions, evaluate an expression in the page and take a
 * screenshot. No npm browser download (it cannot reach its CDN here) and no extra dependency.
 */
import { mkdirOwned, type ServerUser, serverUser } from "./os_user.ts";
import { REPO_ROOT, TEMP_PREFIX, tempRoot } from "./paths.ts";
import { ServerProcess, trackDir, untrackDir, waitFor } from "./process.ts";

export const CHROMIUM_BIN = "/usr/bin/chromium";

export interface PageResult {
  /** Console messages of level error/warning, and uncaught exceptions. */
  problems: string[];
  /** Every console message, for diagnostics. */
  console: string[];
  /** The value of the evaluated expression (JSON-compatible). */
  value: unknown;
  /** Where the screenshot was written, when one was asked for. */
  screenshot?: string;
}

interface CdpMessage {
  id?: number;
  method?: string;
  params?: Record<string, unknown>;
  result?: Record<string, unknown>;
  error?: { message: string };
  sessionId?: string;
}

class Cdp {
  #ws: WebSocket;
  #next = 1;
  #pending = new Map<
    number,
    { resolve: (v: Record<string, unknown>) => void; reject: (e: Error) => void }
  >();
  readonly events: CdpMessage[] = [];
  #listeners: ((m: CdpMessage) => void)[] = [];

  private constructor(ws: WebSocket) {
    this.#ws = ws;
    ws.onmessage = (ev) => {
      const msg = JSON.parse(String(ev.data)) as CdpMessage;
      if (msg.id !== undefined && this.#pending.has(msg.id)) {
        const p = this.#pending.get(msg.id)!;
        this.#pending.delete(msg.id);
        if (msg.error) p.reject(new Error(msg.error.message));
        else p.resolve(msg.result ?? {});
      } else if (msg.method) {
        this.events.push(msg);
        for (const l of this.#listeners) l(msg);
      }
    };
  }

  static connect(url: string): Promise<Cdp> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      ws.onopen = () => resolve(new Cdp(ws));
      ws.onerror = () => reject(new Error(`Could not connect to Chromium at ${url}`));
    });
  }

  send(
    method: string,
    params: Record<string, unknown> = {},
    sessionId?: string,
  ): Promise<Record<string, unknown>> {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      this.#ws.send(JSON.stringify({ id, method, params, sessionId }));
    });
  }

  waitForEvent(method: string, timeoutMs = 15_000): Promise<CdpMessage> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`Timed out waiting for ${method}`)),
        timeoutMs,
      );
      const listener = (m: CdpMessage) => {
        if (m.method === method) {
          clearTimeout(timer);
          this.#listeners = this.#listeners.filter((l) => l !== listener);
          resolve(m);
        }
      };
      this.#listeners.push(listener);
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      if (this.#ws.readyState === WebSocket.CLOSED) return resolve();
      this.#ws.onclose = () => resolve();
      this.#ws.close();
    });
  }
}

/**
 * Opens `url` (file:// or http://) in a fresh headless Chromium with the network closed to
 * everything but that URL's origin, evaluates `expression` after load, and shuts Chromium down.
 */
export async function inspectPage(
  url: string,
  options: { expression: string; screenshotName?: string; width?: number; height?: number },
): Promise<PageResult> {
  const user: ServerUser = await serverUser();
  const dir = await Deno.makeTempDir({ dir: tempRoot(), prefix: `${TEMP_PREFIX}chromium-` });
  trackDir(dir);
  await mkdirOwned(user, dir, 0o700);
  const logPath = `${dir}/chromium.log`;
  const proc = ServerProcess.spawn({
    name: "chromium",
    cmd: CHROMIUM_BIN,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-extensions",
      "--disable-dev-shm-usage",
      `--user-data-dir=${dir}/profile`,
      "--remote-debugging-port=0",
      "--remote-debugging-address=127.0.0.1",
      `--window-size=${options.width ?? 1200},${options.height ?? 1600}`,
      "about:blank",
    ],
    logPath,
    user,
    deathSignal: "SIGKILL",
    env: { HOME: dir },
  });
  let cdp: Cdp | undefined;
  try {
    let wsUrl = "";
    await waitFor(
      "Chromium's DevTools endpoint",
      async () => {
        if (proc.exited) throw new Error(`Chromium exited:\n${await proc.tailLog()}`);
        const text = await Deno.readTextFile(logPath).catch(() => "");
        const m = /DevTools listening on (ws:\/\/\S+)/.exec(text);
        if (m) wsUrl = m[1];
        return wsUrl !== "";
      },
      30_000,
      100,
    );
    cdp = await Cdp.connect(wsUrl);
    const { targetId } = await cdp.send("Target.createTarget", { url: "about:blank" });
    const { sessionId } = await cdp.send("Target.attachToTarget", { targetId, flatten: true }) as {
      sessionId: string;
    };
    await cdp.send("Runtime.enable", {}, sessionId);
    await cdp.send("Log.enable", {}, sessionId);
    await cdp.send("Page.enable", {}, sessionId);
    const loaded = cdp.waitForEvent("Page.loadEventFired", 30_000);
    await cdp.send("Page.navigate", { url }, sessionId);
    await loaded;
    const evaluated = await cdp.send("Runtime.evaluate", {
      expression: options.expression,
      returnByValue: true,
    }, sessionId);
    const value = (evaluated.result as { value?: unknown } | undefined)?.value;
    let screenshot: string | undefined;
    if (options.screenshotName) {
      const shot = await cdp.send("Page.captureScreenshot", {
        format: "png",
        captureBeyondViewport: true,
      }, sessionId);
      await Deno.mkdir(`${REPO_ROOT}/.artifacts`, { recursive: true });
      screenshot = `${REPO_ROOT}/.artifacts/${options.screenshotName}.png`;
      const bytes = Uint8Array.from(atob(String(shot.data)), (ch) => ch.charCodeAt(0));
      await Deno.writeFile(screenshot, bytes);
    }
    const consoleLines: string[] = [];
    const problems: string[] = [];
    for (const e of cdp.events) {
      if (e.method === "Runtime.consoleAPICalled") {
        const p = e.params as { type: string; args: { value?: unknown; description?: string }[] };
        const line = `${p.type}: ${p.args.map((a) => a.value ?? a.description).join(" ")}`;
        consoleLines.push(line);
        if (p.type === "error" || p.type === "warning" || p.type === "assert") problems.push(line);
      } else if (e.method === "Runtime.exceptionThrown") {
        const p = e.params as {
          exceptionDetails: { text: string; exception?: { description?: string } };
        };
        problems.push(
          `exception: ${p.exceptionDetails.exception?.description ?? p.exceptionDetails.text}`,
        );
      } else if (e.method === "Log.entryAdded") {
        const p = e.params as { entry: { level: string; text: string; url?: string } };
        const line = `${p.entry.level}: ${p.entry.text}${p.entry.url ? ` (${p.entry.url})` : ""}`;
        consoleLines.push(line);
        if (p.entry.level === "error" || p.entry.level === "warning") problems.push(line);
      }
    }
    return { problems, console: consoleLines, value, screenshot };
  } finally {
    await cdp?.close().catch(() => {});
    await proc.stop("SIGTERM", 5_000);
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    untrackDir(dir);
  }
}
