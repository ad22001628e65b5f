/**
 * Chunked files of format version 3 (docs/format.md §10): a big file is a
 * list of chunks, each a pack member with its own sha256. A read is served
 * once the chunks it covers are fetched and each matches its chunk digest, so
 * no unverified byte is ever served (unlike a v2 big file); a chunk that does
 * not match fails the reads that need it (EIO) and never enters the pool.
 *
 *   const files = new ChunkedFiles({ client, timeoutMs, bounds, log, onReceived });
 *   const f = files.open(req, () => pool.open(req.digest));   // a MissFile
 *   await files.assemble(req, signal, writer, onProgress);    // the whole file into the pool (a fetcher job)
 *
 * - One ChunkSource per digest, shared by its readers and by the assembly
 *   job: a chunk is fetched once while it is cached (verified chunks in
 *   memory, bounded by bytes).
 * - Wanted chunks are fetched with coalesced Range requests (coalesce.ts):
 *   a sequential reader gets the following chunks fetched along in the same
 *   request (read-ahead), a read far ahead fetches just its chunks.
 * - The assembly job (started by the first open, background priority) walks
 *   the chunks in order into a pool writer; the pool verifies the whole
 *   content digest at commit. Reads after that are served from the pool file.
 */
import type { FileHandle } from 'node:fs/promises';
import { deadlineExceeded, describeError, GearError, invalidArgument, unavailable } from '../errors.js';
import type { Logger } from '../log.js';
import type { MissFile } from '../missfs/types.js';
import type { PoolWriter } from '../pool/pool.js';
import type { RegistryClient } from '../registry/client.js';
import { groupRanges, type CoalesceBounds } from './coalesce.js';
import { readPackRange } from './range-body.js';
import { raceAbort } from '../abort.js';
import type { FetchRequest } from './pack-types.js';
import { decodeMember } from './member.js';
import type { ChunkRef } from './pack-types.js';

/** Verified chunks kept in memory per file (bytes; at least two chunks). */
const CACHE_BYTES = 32 * 1024 * 1024;
/** A sequential reader has this many stored bytes of following chunks fetched along. */
const READ_AHEAD_BYTES = 4 * 1024 * 1024;

export interface ChunkedDeps {
  client: Pick<RegistryClient, 'openBlob'>;
  timeoutMs: number;
  bounds: CoalesceBounds;
  log: Logger;
  /** The fetcher's counters, updated in place: bytes received, Range requests sent. */
  counters: { blobBytes: number; packRequests: number };
  /** A reader needs chunks of a file not in the pool yet (a container waits: Fetcher.demandIdleMs). */
  onReaderWaits?: () => void;
}

interface Slot {
  p: Promise<Buffer>;
  bytes: number;
  /** Its bytes came (or its fetch failed); until then trim() keeps it. */
  settled: boolean;
}

/** The verified chunks of one file, fetched on demand. */
class ChunkSource {
  private readonly cache = new Map<number, Slot>();
  private cached = 0;
  users = 0;
  /** The next chunk the assembly writes while one runs (the ones below are written). */
  assembling: number | undefined;

  constructor(
    private readonly deps: ChunkedDeps,
    readonly req: FetchRequest,
  ) {}

  get count(): number {
    return this.req.chunks!.chunks.length;
  }

  /** Chunk i, verified; fetches it (and up to `aheadBytes` of stored bytes of the next ones not cached) when needed. */
  get(i: number, aheadBytes: number): Promise<Buffer> {
    return this.getRange(i, i, aheadBytes)[0]!;
  }

  /**
   * Chunks first…last, verified: the ones not cached (and up to `aheadBytes` of stored bytes of
   * the chunks after last that are not cached either) are fetched together (coalesced requests).
   */
  getRange(first: number, last: number, aheadBytes: number): Promise<Buffer>[] {
    const list = this.req.chunks!.chunks;
    const want: number[] = [];
    for (let i = first; i <= last; i++) {
      const hit = this.cache.get(i);
      if (hit) {
        this.cache.delete(i); // LRU: most recent last
        this.cache.set(i, hit);
      } else want.push(i);
    }
    let ahead = 0;
    for (let k = last + 1; k < list.length && ahead + list[k]!.length <= aheadBytes; k++) {
      if (this.cache.has(k)) break;
      ahead += list[k]!.length;
      want.push(k);
    }
    if (want.length) this.fetch(want);
    const out: Promise<Buffer>[] = [];
    for (let i = first; i <= last; i++) out.push(this.cache.get(i)!.p);
    this.trim(); // after taking what this read needs
    return out;
  }

  private fetch(indices: number[]): void {
    const list = this.req.chunks!.chunks;
    const waiting = new Map<number, { resolve(b: Buffer): void; reject(e: unknown): void }>();
    for (const i of indices) {
      let resolve!: (b: Buffer) => void;
      let reject!: (e: unknown) => void;
      const p = new Promise<Buffer>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      const slot: Slot = { p, bytes: list[i]!.bytes, settled: false };
      p.then(
        () => {
          slot.settled = true;
        },
        () => {
          slot.settled = true;
          // A failed chunk is not kept: the next read asks again (and fails again if the bytes are bad).
          if (this.cache.get(i) === slot) {
            this.cache.delete(i);
            this.cached -= list[i]!.bytes;
          }
        },
      );
      this.cache.set(i, slot);
      this.cached += list[i]!.bytes;
      waiting.set(i, { resolve, reject });
    }
    // Chunks of one pack in coalesced requests (a big file's chunks are normally contiguous in one pack).
    const byPack = new Map<string, Array<ChunkRef & { index: number }>>();
    for (const i of indices) {
      const c = list[i]!;
      const g = byPack.get(c.pack.digest) ?? [];
      g.push({ ...c, index: i });
      byPack.set(c.pack.digest, g);
    }
    for (const group of byPack.values()) {
      for (const plan of groupRanges(group, this.deps.bounds)) {
        void this.request(plan.members, waiting);
      }
    }
  }

  /**
   * Drops chunks beyond the bound, never one still being fetched (someone
   * asked for it: dropping it meant fetching it again). While the file is
   * assembled, the chunks it wrote go first, then those it needs last (a
   * reader's chunks far ahead are what it needs later; least recently used
   * first dropped them, and the assembly fetched them again); else the
   * least recently used. Found looking into nodejs's gear-opt cold start,
   * 43.7 MB received at 100 Mbit/s against 34.5 unshaped (bench
   * 20261207-182506); with this, 37.2 and 39.0 MB (20261207-195822).
   */
  private trim(): void {
    const limit = Math.max(CACHE_BYTES, 2 * this.req.chunks!.chunkSize);
    if (this.cached <= limit) return;
    const at = this.assembling;
    const order = [...this.cache].filter(([, s]) => s.settled);
    // Stable: within a rank, least recently used first.
    const rank = (i: number) => (i < at! ? -Number.MAX_SAFE_INTEGER : -i);
    if (at !== undefined) order.sort(([a], [b]) => rank(a) - rank(b));
    for (const [k, s] of order) {
      if (this.cached <= limit) break;
      this.cache.delete(k); // awaiting readers still get it
      this.cached -= s.bytes;
    }
  }

  private async request(members: Array<ChunkRef & { index: number }>, waiting: Map<number, { resolve(b: Buffer): void; reject(e: unknown): void }>): Promise<void> {
    const { req } = this;
    const pack = members[0]!.pack;
    const repo = `${req.location.registry}/${req.location.repository}`;
    const signal = AbortSignal.timeout(this.deps.timeoutMs);
    let next = 0;
    try {
      await readPackRange(this.deps, repo, pack, members, signal, (m, stored) => {
        next++;
        const w = waiting.get(m.index)!;
        const what = `read of ${req.digest} chunk ${m.index} (pack ${pack.digest} bytes ${m.offset}+${m.length}) from ${repo}`;
        try {
          w.resolve(decodeMember(stored, m.encoding, m.bytes, m.digest, what));
        } catch (err) {
          this.deps.log.warn({ digest: req.digest, chunk: m.index, err: describeError(err) }, 'chunk rejected');
          // InvalidArgument "does not match": the assembly job counts it as rejected content, not worth a retry.
          w.reject(invalidArgument(`chunk rejected: ${(err as Error).message}`, err));
        }
      });
    } catch (err) {
      const e = signal.aborted
        ? deadlineExceeded(`read of ${req.digest}: chunks not fetched within ${this.deps.timeoutMs} ms; check the registry's reachability or raise GEAR_FETCH_TIMEOUT`)
        : err instanceof GearError
          ? err
          : unavailable(`read of ${req.digest} from ${repo}: ${describeError(err)}`, err);
      for (let k = next; k < members.length; k++) waiting.get(members[k]!.index)!.reject(e);
    }
  }
}

export class ChunkedFiles {
  private readonly sources = new Map<string, ChunkSource>();

  constructor(private readonly deps: ChunkedDeps) {}

  private acquire(req: FetchRequest): ChunkSource {
    let s = this.sources.get(req.digest);
    if (!s) {
      s = new ChunkSource(this.deps, req);
      this.sources.set(req.digest, s);
    }
    s.users++;
    return s;
  }

  private release(s: ChunkSource): void {
    if (--s.users === 0 && this.sources.get(s.req.digest) === s) this.sources.delete(s.req.digest);
  }

  /**
   * A reader of req's content served chunk by chunk (each verified).
   * `fromPool` opens the pool file once the file is complete there.
   */
  open(req: FetchRequest, fromPool: () => Promise<FileHandle | null>): MissFile {
    const src = this.acquire(req);
    const { chunkSize, chunks } = req.chunks!;
    let lastEnd = -1;
    let fh: FileHandle | null = null;
    let open = true;
    const timeoutMs = this.deps.timeoutMs;
    return {
      keepCache: true, // every byte served was verified
      read: async (buf, position) => {
        if (!open) throw unavailable(`read of ${req.digest} after close`);
        if (position >= req.size || buf.length === 0) return 0;
        const want = Math.min(buf.length, req.size - position);
        fh ??= await fromPool();
        if (fh) {
          const { bytesRead } = await fh.read(buf, 0, want, position);
          return bytesRead;
        }
        this.deps.onReaderWaits?.();
        const first = Math.floor(position / chunkSize);
        const last = Math.min(chunks.length - 1, Math.floor((position + want - 1) / chunkSize));
        const ahead = position === lastEnd || position === 0 ? READ_AHEAD_BYTES : 0;
        const parts = src.getRange(first, last, ahead);
        let timer: NodeJS.Timeout | undefined;
        const deadline = new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(deadlineExceeded(`read of ${req.digest} at byte ${position}: chunks not there within ${timeoutMs} ms; check the registry's reachability or raise GEAR_FETCH_TIMEOUT`)), timeoutMs);
          timer.unref();
        });
        try {
          const got = await Promise.race([Promise.all(parts), deadline]);
          let n = 0;
          for (let i = first; i <= last; i++) {
            const data = got[i - first]!;
            const from = i === first ? position - i * chunkSize : 0;
            const take = Math.min(data.length - from, want - n);
            data.copy(buf, n, from, from + take);
            n += take;
          }
          lastEnd = position + n;
          return n;
        } finally {
          clearTimeout(timer);
        }
      },
      close: async () => {
        if (!open) return;
        open = false;
        this.release(src);
        await fh?.close().catch(() => undefined);
      },
    };
  }

  /**
   * The fetcher's download of a chunked file: every chunk in order, verified, into a pool writer
   * (job.writer, job.stage show the progress), then the commit, which checks the whole content digest.
   */
  async assembleJob(
    job: { req: FetchRequest; writer?: PoolWriter | undefined; stage?: { path: string; written: number } | undefined; watch?: { progress(n: number): void } | undefined },
    pool: { beginWrite(digest: string, size: number): Promise<PoolWriter> },
    signal: AbortSignal,
  ): Promise<void> {
    const w = (job.writer = await pool.beginWrite(job.req.digest, job.req.size));
    const stage = (job.stage = { path: w.stagingPath, written: 0 });
    try {
      await this.assemble(job.req, w, signal, (n) => {
        stage.written = n;
        job.watch?.progress(n);
      });
      job.writer = undefined;
      await w.commit();
    } catch (err) {
      await w.abort();
      job.writer = undefined;
      throw err;
    }
  }

  /** Writes every chunk of req, in order, verified, into `writer` (the caller commits: the pool checks the whole digest). */
  async assemble(req: FetchRequest, writer: PoolWriter, signal: AbortSignal, onProgress: (written: number) => void): Promise<void> {
    const src = this.acquire(req);
    try {
      for (let i = 0; i < src.count; i++) {
        if (signal.aborted) throw signal.reason;
        src.assembling = i;
        const data = await raceAbort(src.get(i, this.deps.bounds.maxRequest), signal);
        await writer.write(data);
        onProgress(writer.size);
      }
    } finally {
      src.assembling = undefined;
      this.release(src);
    }
  }
}
