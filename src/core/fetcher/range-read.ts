/**
 * Reads of a streamed (v1/v2 big) file far ahead of its download, served by
 * HTTP Range requests of the `chunkBytes`-aligned chunk around them (moved out
 * of fetcher.ts; see its file comment, "Streaming"). The bytes are NOT
 * verified (the v1/v2 format has one digest per file). A few chunks per file
 * are kept in memory (job.ranges); at most maxParallel range requests run at
 * a time.
 */
import { deadlineExceeded, GearError, internal, isClass, unavailable } from '../errors.js';
import type { RegistryClient } from '../registry/client.js';
import type { FetchRequest } from './pack-types.js';

/** Range chunks kept in memory per streamed file. */
const RANGE_CACHE_CHUNKS = 8;

/** What a range read needs of the fetcher's job of the file. */
export interface RangeJob {
  req: FetchRequest;
  /** Range-fetched chunks of the raw blob, by chunk index. */
  ranges: Map<number, Promise<Buffer>>;
  stage?: { written: number } | undefined;
  controller: AbortController;
}

export interface RangeReadDeps {
  client: Pick<RegistryClient, 'openBlob'>;
  timeoutMs: number;
  maxParallel: number;
  chunkBytes: number;
  /** The fetcher's counters (updated in place). */
  counters: { rangeRequests: number; rangeBytes: number; blobBytes: number; timeouts: number };
}

export class RangeReads {
  private running = 0;
  private readonly queue: (() => void)[] = [];

  constructor(private readonly deps: RangeReadDeps) {}

  /** Serves a read far ahead of the download from a Range-fetched chunk (unverified). */
  async read(job: RangeJob, buf: Buffer, pos: number, want: number, deadline: number, signal?: AbortSignal): Promise<number> {
    const idx = Math.floor(pos / this.deps.chunkBytes);
    let p = job.ranges.get(idx);
    if (!p) {
      p = this.fetchChunk(job, idx);
      p.catch(() => {
        if (job.ranges.get(idx) === p) job.ranges.delete(idx);
      });
      job.ranges.set(idx, p);
      // Keep a few chunks; drop the oldest and those the download has passed.
      const passed = Math.floor((job.stage?.written ?? 0) / this.deps.chunkBytes);
      for (const k of [...job.ranges.keys()]) if (k < passed) job.ranges.delete(k);
      while (job.ranges.size > RANGE_CACHE_CHUNKS) job.ranges.delete(job.ranges.keys().next().value as number);
    }
    const left = deadline - Date.now();
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const bounded = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.deps.counters.timeouts++;
        reject(deadlineExceeded(`read of ${job.req.digest} at byte ${pos}: range request not answered within ${this.deps.timeoutMs} ms; check the registry's reachability or raise GEAR_FETCH_TIMEOUT`));
      }, Math.max(0, left));
      timer.unref();
      onAbort = () => reject(signal!.reason ?? unavailable(`read of ${job.req.digest}: aborted`));
      if (signal?.aborted) onAbort();
      else signal?.addEventListener('abort', onAbort, { once: true });
    });
    try {
      const data = await Promise.race([p, bounded]);
      const off = pos - idx * this.deps.chunkBytes;
      const n = Math.min(want, data.length - off);
      if (n <= 0) throw internal(`range chunk ${idx} of ${job.req.digest} is short`);
      data.copy(buf, 0, off, off + n);
      return n;
    } finally {
      clearTimeout(timer);
      if (onAbort) signal?.removeEventListener('abort', onAbort);
    }
  }

  private async fetchChunk(job: RangeJob, idx: number): Promise<Buffer> {
    const { req } = job;
    const start = idx * this.deps.chunkBytes;
    const end = Math.min(req.size, start + this.deps.chunkBytes) - 1;
    const repo = `${req.location.registry}/${req.location.repository}`;
    // Bounded by the job (fetcher close, failure) and by the deadline; shared by every reader of the chunk.
    const signal = AbortSignal.any([job.controller.signal, AbortSignal.timeout(this.deps.timeoutMs)]);
    await this.slot();
    try {
      for (let attempt = 1; ; attempt++) {
        try {
          const { stream } = await this.deps.client.openBlob(repo, req.digest, { signal, expectedSize: req.size, range: { start, end } });
          const parts: Buffer[] = [];
          for await (const c of stream) parts.push(c as Buffer);
          const data = Buffer.concat(parts);
          if (data.length !== end - start + 1) throw unavailable(`range ${start}-${end} of ${req.digest}: got ${data.length} bytes`);
          this.deps.counters.rangeRequests++;
          this.deps.counters.rangeBytes += data.length;
          this.deps.counters.blobBytes += data.length;
          return data;
        } catch (err) {
          if (signal.aborted || attempt >= 2 || (err instanceof GearError && !isClass(err, 'Unavailable'))) throw err;
        }
      }
    } finally {
      const next = this.queue.shift();
      if (next) next(); // the slot passes on
      else this.running--;
    }
  }

  /** At most maxParallel range requests at a time. */
  private async slot(): Promise<void> {
    if (this.running < this.deps.maxParallel) {
      this.running++;
      return;
    }
    await new Promise<void>((r) => this.queue.push(r));
  }
}
