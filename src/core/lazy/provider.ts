/**
 * The MissProvider of the miss filesystem, backed by the pool and the
 * fetcher: a LOOKUP of /sha256/ab/<hex> fetches the file (foreground
 * priority) into the pool and answers its size; an OPEN returns the pool
 * file's descriptor, read with positioned reads.
 *
 * Big files (at least `streamMinBytes`, default BIG_FILE_MIN_BYTES = 8 MiB)
 * are not fetched whole before the first read: LOOKUP answers the size from
 * the catalog at once, OPEN returns a streamed reader (Fetcher.stream) that
 * serves reads while the one download runs into the pool, and reads far ahead
 * of it by HTTP Range (raw blobs). Such files are opened without
 * FOPEN_KEEP_CACHE: pages served before the digest verified must not outlive
 * a failed download in the kernel's cache.
 */
import type { FileHandle } from 'node:fs/promises';
import { describeError, isClass, notFound, unavailable } from '../errors.js';
import type { Fetcher, FetchRequest } from '../fetcher/fetcher.js';
import { silentLogger, type Logger } from '../log.js';
import type { MissFile, MissProvider } from '../missfs/types.js';
import type { Pool } from '../pool/pool.js';
import { BIG_FILE_MIN_BYTES } from '../index/manifest.js';
import type { BlobCatalog } from './catalog.js';
import type { UsageTracker } from '../stats/usage.js';
import { ReadAheadWindows } from './read-ahead.js';

export interface LazyProviderOptions {
  pool: Pool;
  fetcher: Fetcher;
  catalog: BlobCatalog;
  logger?: Logger;
  /** Files of at least this size are streamed (see above). Default 8 MiB; Infinity turns streaming off. */
  streamMinBytes?: number;
  /** Told of every need (hit or miss) and of the caller's pid (gear stats). */
  usage?: UsageTracker;
  /**
   * Format v3 read-ahead: a miss of a pack member also fetches the members that follow it in the
   * pack, up to a window of stored bytes (only files not in the pool, within the pool's low
   * watermark). This is the first window of a pack; it doubles, up to 8 times this, while misses
   * walk the pack forward (read-ahead.ts). Default GEAR_READ_AHEAD, else 128 KiB (bench: a fixed
   * 1 MiB tripled a startup's bytes); 0 turns it off. docs/lazy.md.
   */
  readAheadBytes?: number;
}

/** Default read-ahead of a pack member miss (stored bytes of its following members). */
export const DEFAULT_READ_AHEAD_BYTES = 128 * 1024;

export class LazyMissProvider implements MissProvider {
  private readonly pool: Pool;
  private readonly fetcher: Fetcher;
  private readonly catalog: BlobCatalog;
  private readonly log: Logger;
  private readonly streamMinBytes: number;
  private readonly usage: UsageTracker | undefined;
  readonly readAhead: ReadAheadWindows;

  constructor(opts: LazyProviderOptions) {
    this.readAhead = new ReadAheadWindows({ baseBytes: opts.readAheadBytes ?? DEFAULT_READ_AHEAD_BYTES });
    this.streamMinBytes = opts.streamMinBytes ?? BIG_FILE_MIN_BYTES;
    this.pool = opts.pool;
    this.fetcher = opts.fetcher;
    this.catalog = opts.catalog;
    this.usage = opts.usage;
    this.log = (opts.logger ?? silentLogger()).child({ component: 'lazy' });
  }

  private requests(digest: string) {
    const reqs = this.catalog.requests(digest);
    if (reqs.length === 0) {
      if (this.catalog.has(digest)) throw unavailable(`${digest}: no registry location is known for this file`);
      throw notFound(`${digest}: not a file of any index layer on this node`);
    }
    return reqs;
  }

  private isBig(digest: string): boolean {
    const size = this.catalog.sizeOf(digest);
    return (size !== undefined && size >= this.streamMinBytes) || this.catalog.isChunked(digest);
  }

  /** Read-ahead: the pack neighbours of a member worth fetching along (see readAheadBytes). */
  private neighbours(req: FetchRequest) {
    const m = req.member;
    if (!m || this.readAhead.baseBytes <= 0) return [];
    const window = this.readAhead.windowFor(m.pack.digest, m.offset);
    const st = this.pool.stat();
    let room = st.lowWatermarkBytes - st.bytes;
    const along = this.catalog.neighbours(
      req,
      window,
      (d, size) => {
        if (this.pool.has(d) || this.fetcher.inFlight(d) || size > room) return false;
        room -= size;
        return true;
      },
      this.readAhead.dirBytes,
    );
    let end = m.offset + m.length;
    for (const n of along) if (n.member) end = Math.max(end, n.member.offset + n.member.length);
    this.readAhead.used(m.pack.digest, m.offset, end, window);
    return along;
  }

  /** Fetches digest into the pool (trying each known location in turn). */
  private async ensure(digest: string, signal: AbortSignal): Promise<void> {
    const reqs = this.requests(digest);
    let last: unknown;
    for (const req of reqs) {
      try {
        const along = this.neighbours(req);
        await this.fetcher.fetch(req, { priority: 'foreground', signal, ...(along.length ? { along } : {}) });
        return;
      } catch (err) {
        last = err;
        if (signal.aborted || isClass(err, 'DeadlineExceeded')) break;
        this.log.info({ digest, registry: req.location.registry, repository: req.location.repository, err: describeError(err) }, 'fetch from this location failed');
      }
    }
    // Whatever went wrong, the reader gets EIO: ENOENT would be cached as "no such file" by nobody, but is misleading.
    if (isClass(last, 'NotFound')) throw unavailable(`${digest}: the registry does not have it`, last);
    throw last;
  }

  async lookup(digest: string, signal: AbortSignal): Promise<{ size: number }> {
    const size = this.catalog.sizeOf(digest);
    if (size === undefined) throw notFound(`${digest}: not a file of any index layer on this node`);
    if (this.pool.has(digest)) {
      this.pool.touch(digest);
      this.pool.countUse(true);
      this.usage?.noteNeed(digest, true);
      return { size: this.pool.sizeOf(digest) ?? size };
    }
    // A cold file: a miss, even though the open that follows finds it in the pool.
    this.pool.countUse(false);
    this.usage?.noteNeed(digest, false);
    if (this.isBig(digest)) {
      this.requests(digest); // fail now when it cannot be fetched at all
      return { size }; // OPEN streams it
    }
    await this.ensure(digest, signal);
    return { size };
  }

  async open(digest: string, signal: AbortSignal): Promise<MissFile> {
    if (!this.catalog.has(digest) && !this.pool.has(digest)) throw notFound(`${digest}: unknown file`);
    if (this.isBig(digest)) {
      const fh = await this.pool.open(digest, { count: false });
      if (fh) return poolFile(fh, false); // drop pages an earlier streamed open may have left
      // Streams from the first known location only (unlike ensure(), no fallback to the others).
      const req = this.requests(digest)[0]!;
      return req.chunks ? this.fetcher.openChunked(req) : this.fetcher.stream(req);
    }
    const release = this.pool.pin(digest); // no eviction between fetch and open
    try {
      // The LOOKUP before it counted this need; an open that must fetch again (evicted meanwhile) is another miss.
      for (let attempt = 0; attempt < 3; attempt++) {
        const fh = await this.pool.open(digest, { count: false });
        if (fh) return poolFile(fh);
        this.pool.countUse(false);
        await this.ensure(digest, signal);
      }
      throw unavailable(`${digest}: fetched but gone from the pool again`);
    } finally {
      release();
    }
  }

  noteCaller(digest: string, pid: number): void {
    this.usage?.noteCaller(digest, pid);
  }

  /** Opens served by the kernel from a passthrough backing file still count as uses (LRU). */
  touch(digest: string): void {
    this.pool.touch(digest);
  }
}

function poolFile(fh: FileHandle, keepCache = true): MissFile {
  return {
    keepCache,
    async read(buf: Buffer, position: number): Promise<number> {
      const { bytesRead } = await fh.read(buf, 0, buf.length, position);
      return bytesRead;
    },
    close: () => fh.close(),
    // Pool files are complete and verified: the miss filesystem may let the kernel read this fd directly.
    backingFd: fh.fd,
  };
}
