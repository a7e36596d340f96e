/**
 * The budget of one invocation: wall time, bytes and CPU, chosen to stay well inside the hosted
 * Edge limits (2 s CPU per request, 150 s idle / 150-400 s wall, 256 MB memory).
 *
 * CPU is measured from /proc/thread-self/stat (the isolate's thread) where it can be read; Deno
 * 2.1 has no process.cpuUsage(). Where it cannot (the hosted runtime may deny it), CPU is
 * estimated from the work done with per-object and per-MiB costs measured by bench/storage.
 */

export interface CpuMeter {
  /** CPU milliseconds used so far by the calling thread, or undefined if it cannot be measured. */
  read(): number | undefined;
}

/** Linux: utime + stime of this thread, in clock ticks (USER_HZ, 100 on every Linux we run). */
export function threadCpuMeter(): CpuMeter {
  let usable = true;
  return {
    read() {
      if (!usable) return undefined;
      try {
        const stat = Deno.readTextFileSync("/proc/thread-self/stat");
        const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
        // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        const ticks = Number(fields[11]) + Number(fields[12]);
        if (!Number.isFinite(ticks)) throw new Error("unparsable");
        return ticks * 10;
      } catch {
        usable = false;
        return undefined;
      }
    },
  };
}

/**
 * Costs from bench/storage (the isolate thread's CPU on the benchmark machine: about 1.4 ms per
 * small object, 7.9 ms per MiB hashed natively, 10.5 ms per MiB with resumable hashes; see the
 * README), rounded up for slower hosts: used when CPU cannot be read, and to decide whether an
 * object can be finished within this chunk.
 */
export const ESTIMATED_CPU_MS_PER_OBJECT = 2;
export const ESTIMATED_CPU_MS_PER_MIB_NATIVE = 10;
export const ESTIMATED_CPU_MS_PER_MIB_RESUMABLE = 13;

export interface BudgetLimits {
  maxSeconds: number;
  maxBytes: number;
  maxCpuMs: number;
}

export type StopReason =
  | "done"
  | "no_leasable_work"
  | "wall_budget"
  | "byte_budget"
  | "cpu_budget"
  | "dependency_unavailable"
  | "database_unavailable";

export class ChunkBudget {
  readonly limits: BudgetLimits;
  readonly #clock: () => number;
  readonly #cpu: CpuMeter;
  readonly #started: number;
  readonly #cpuStart: number | undefined;
  #bytes = 0;
  #estimatedCpu = 0;
  /** CPU that work already started will still cost (parts read but not yet hashed). */
  #pendingCpu = 0;
  #lastRead = -Infinity;
  #lastCpu: number | undefined;

  constructor(limits: BudgetLimits, clock: () => number, cpu: CpuMeter) {
    this.limits = limits;
    this.#clock = clock;
    this.#cpu = cpu;
    this.#started = clock();
    this.#cpuStart = cpu.read();
  }

  addBytes(n: number, resumable = false): void {
    this.#bytes += n;
    this.#estimatedCpu += (n / 1048576) *
      (resumable ? ESTIMATED_CPU_MS_PER_MIB_RESUMABLE : ESTIMATED_CPU_MS_PER_MIB_NATIVE);
  }

  addObject(): void {
    this.#estimatedCpu += ESTIMATED_CPU_MS_PER_OBJECT;
  }

  get bytes(): number {
    return this.#bytes;
  }

  elapsedMs(): number {
    return this.#clock() - this.#started;
  }

  /** Measured CPU ms since the chunk began (read at most every 50 ms), else the estimate. */
  cpuMs(): number {
    if (this.#cpuStart !== undefined) {
      const t = this.#clock();
      if (t - this.#lastRead >= 50) {
        this.#lastRead = t;
        this.#lastCpu = this.#cpu.read();
      }
      if (this.#lastCpu !== undefined) return this.#lastCpu - this.#cpuStart;
    }
    return Math.round(this.#estimatedCpu);
  }

  /** Reads the meter now (for the final figure of a chunk). */
  finalCpuMs(): number {
    this.#lastRead = -Infinity;
    return this.cpuMs();
  }

  get cpuMeasured(): boolean {
    return this.#cpuStart !== undefined && this.#lastCpu !== undefined;
  }

  remainingBytes(): number {
    return Math.max(0, this.limits.maxBytes - this.#bytes);
  }

  /** Reserves the estimated CPU of work just started; `settleCpu` when it has been done. */
  reserveCpu(ms: number): void {
    this.#pendingCpu += ms;
  }

  settleCpu(ms: number): void {
    this.#pendingCpu = Math.max(0, this.#pendingCpu - ms);
  }

  remainingCpuMs(): number {
    return Math.max(0, this.limits.maxCpuMs - this.cpuMs() - this.#pendingCpu);
  }

  remainingMs(): number {
    return Math.max(0, this.limits.maxSeconds * 1000 - this.elapsedMs());
  }

  /** Why the chunk must stop now, or undefined while there is budget left. */
  exhausted(): StopReason | undefined {
    if (this.elapsedMs() >= this.limits.maxSeconds * 1000) return "wall_budget";
    if (this.#bytes >= this.limits.maxBytes) return "byte_budget";
    if (this.cpuMs() + this.#pendingCpu >= this.limits.maxCpuMs) return "cpu_budget";
    return undefined;
  }
}
