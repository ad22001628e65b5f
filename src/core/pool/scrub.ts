/**
 * Scrubbing the pool at rest: re-hash every file under ROOT/pool/sha256/ and
 * remove those whose content no longer matches their name.
 *
 * Why: overlayfs reads pool files directly (the data-only lower layer), so a
 * file altered on disk after its verification (a bit flip, an admin's
 * mistake) would be served to containers unchecked. Without fs-verity (see
 * docs/pool-integrity.md) the only defence is to look: a scrub reads each
 * file at a bounded rate, and on a mismatch unlinks it. Unlinking is the
 * eviction path (DESIGN.md, "Eviction is always safe"): a container that has
 * the file open keeps its inode; the next lookup misses the pool, falls
 * through to the miss filesystem and fetches (and verifies) the file again.
 *
 * What is scrubbed: the directory, not the pool's table, so that a file put
 * there behind the daemon's back is checked too. Only names the overlay
 * redirects can reach count (`sha256/<first two hex>/<64 hex>`); anything
 * else is reported as ignored and left alone.
 *
 * Races (all in one process: the pool's single-writer lock keeps every other
 * writer out):
 * - a file evicted while it is hashed: the open fd still reads the old,
 *   complete inode, so its hash is right; a file gone before it was opened
 *   is counted as gone, never as bad;
 * - a bad file replaced meanwhile by a fresh fetch (evicted, fetched again):
 *   Pool.removeCorrupt unlinks only when the name still points at the inode
 *   that was hashed (same dev and ino), under the pool's per-digest eviction
 *   marker, so a commit of that digest waits for it and a commit already in
 *   progress makes it back off;
 * - files being written live in .staging/ until verified, never scrubbed.
 */
import { constants as fsc } from 'node:fs';
import { createHash } from 'node:crypto';
import fs, { type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { errnoCode } from '../errors.js';

const HEX_RE = /^[a-f0-9]{64}$/;
// 256 KiB: each synchronous hash update stays well under a millisecond of the daemon's event loop.
const CHUNK = 256 * 1024;

/** The default scrub rate (bytes per second): GEAR_SCRUB_RATE. */
export const DEFAULT_SCRUB_RATE = 50 * 1024 * 1024;

/**
 * A bound on bytes per time window: at most `budget` bytes are granted in any
 * window [k·windowMs, (k+1)·windowMs). `take(n)` waits for the next window
 * when the current one cannot hold n more bytes. The bound is on counts per
 * window, so it holds whatever the disk's speed; it is not a speed target.
 */
export class ByteRateLimiter {
  readonly budget: number;
  private window = -1;
  private used = 0;

  constructor(
    readonly bytesPerSecond: number,
    readonly windowMs = 1000,
    private readonly now: () => number = Date.now,
    private readonly sleep: (ms: number) => Promise<void> = (ms) => new Promise((r) => setTimeout(r, ms)),
  ) {
    if (!(bytesPerSecond > 0)) throw new RangeError(`scrub rate ${bytesPerSecond}: must be more than 0 bytes/s`);
    this.budget = Math.max(1, Math.floor((bytesPerSecond * windowMs) / 1000));
  }

  /** Largest single grant; callers read at most this much per take(). */
  get maxChunk(): number {
    return this.budget;
  }

  /** Waits until n bytes (at most `budget`) fit in the current window and books them. */
  async take(n: number, signal?: AbortSignal): Promise<void> {
    if (n > this.budget) throw new RangeError(`take(${n}) exceeds the window budget ${this.budget}`);
    for (let i = 0; ; i++) {
      signal?.throwIfAborted();
      const t = this.now();
      const w = Math.floor(t / this.windowMs);
      if (w !== this.window) {
        this.window = w;
        this.used = 0;
      }
      if (this.used + n <= this.budget) {
        this.used += n;
        return;
      }
      if (i > 1_000_000) throw new Error('rate limiter: the clock does not advance');
      await this.sleep(Math.max(1, (w + 1) * this.windowMs - t));
    }
  }
}

export interface HashResult {
  hex: string;
  size: number;
  dev: number;
  ino: number;
}

/**
 * sha256 of an open file, read from offset 0 to its end in chunks, each
 * granted by `limiter` first (unlimited without one).
 */
export async function hashHandle(
  fh: FileHandle,
  opts: { limiter?: ByteRateLimiter; signal?: AbortSignal; onBytes?: (n: number) => void } = {},
): Promise<HashResult> {
  const st = await fh.stat();
  const h = createHash('sha256');
  const chunk = Math.min(CHUNK, opts.limiter?.maxChunk ?? CHUNK);
  const buf = Buffer.allocUnsafe(chunk);
  let size = 0;
  for (;;) {
    opts.signal?.throwIfAborted();
    // Book what is left by the size at open (at least 1 byte, for the read that sees the end), so a
    // small file does not use up a whole window; never read more than was booked.
    const want = Math.min(chunk, Math.max(1, st.size - size));
    if (opts.limiter) await opts.limiter.take(want, opts.signal);
    const { bytesRead } = await fh.read(buf, 0, want, size);
    if (bytesRead === 0) break;
    h.update(buf.subarray(0, bytesRead));
    size += bytesRead;
    opts.onBytes?.(bytesRead);
  }
  return { hex: h.digest('hex'), size, dev: st.dev, ino: st.ino };
}

/** Opens a pool file for hashing: read-only, no atime update (not a use), no symlink following. */
export function openForHash(file: string): Promise<FileHandle> {
  return fs.open(file, fsc.O_RDONLY | fsc.O_NOATIME | fsc.O_NOFOLLOW);
}

/** What the scrub needs of the pool (Pool implements it). */
export interface ScrubTarget {
  /** ROOT/pool */
  readonly dir: string;
  readonly readOnly: boolean;
  /** Called after a matching hash of a file the pool knows. */
  markVerified(hex: string): void;
  /**
   * Removes a file found corrupt if its name still points at the inode that
   * was hashed and no fetch or eviction of the digest is in progress.
   */
  removeCorrupt(hex: string, id: { dev: number; ino: number }): Promise<RemoveOutcome>;
}

/** removed: unlinked; gone: already absent; replaced: a new inode under the name (a fresh fetch); busy: a fetch or eviction of it runs. */
export type RemoveOutcome = 'removed' | 'gone' | 'replaced' | 'busy';

export interface BadFile {
  /** the digest the file's name promises */
  digest: string;
  /** what its content hashes to, or a description when it is not a regular file */
  actual: string;
  size: number;
  path: string;
  removed: boolean;
  /** why it was not removed (or 'removed') */
  outcome: RemoveOutcome | 'not a regular file' | 'read-only';
}

export interface ScrubProgress {
  /** files hashed so far (good or bad) */
  files: number;
  bytes: number;
  /** files and bytes found by the directory walk (the bytes are sizes at walk time) */
  totalFiles: number;
  totalBytes: number;
  bad: number;
}

export interface ScrubReport extends ScrubProgress {
  startedAt: string;
  finishedAt: string;
  /** bytes per second asked for (0: unlimited) */
  rate: number;
  badFiles: BadFile[];
  /** bad files removed */
  removed: number;
  /** files that disappeared before they could be hashed (evicted): not bad */
  gone: number;
  /** entries that are not digest-named pool files (not reachable by a redirect; left alone) */
  ignored: number;
  /** true when stopped before the end (daemon shutdown) */
  aborted: boolean;
  /** read errors other than ENOENT, by file */
  errors: { path: string; error: string }[];
}

export interface ScrubOptions {
  /** Bytes per second (default DEFAULT_SCRUB_RATE); 0 or Infinity: unlimited. */
  rate?: number;
  /** Length of the rate window in ms (default 1000). */
  windowMs?: number;
  signal?: AbortSignal;
  /** Called after each chunk read and after each file (throttle on the caller side). */
  onProgress?: (p: ScrubProgress) => void;
  /** Called for each bad file, as found. */
  onBad?: (b: BadFile) => void;
  /** Injected time source and sleep of the rate limiter (tests). */
  now?: () => number;
  sleep?: (ms: number) => Promise<void>;
}

/** Re-hashes every digest-named file under target.dir/sha256 (see the file comment). */
export async function scrubPool(target: ScrubTarget, opts: ScrubOptions = {}): Promise<ScrubReport> {
  const rate = opts.rate ?? DEFAULT_SCRUB_RATE;
  const limited = rate > 0 && Number.isFinite(rate);
  const limiter = limited ? new ByteRateLimiter(rate, opts.windowMs ?? 1000, opts.now, opts.sleep) : undefined;
  const shaDir = path.join(target.dir, 'sha256');
  const report: ScrubReport = {
    startedAt: new Date().toISOString(),
    finishedAt: '',
    rate: limited ? rate : 0,
    files: 0,
    bytes: 0,
    totalFiles: 0,
    totalBytes: 0,
    bad: 0,
    badFiles: [],
    removed: 0,
    gone: 0,
    ignored: 0,
    aborted: false,
    errors: [],
  };
  const progress = () => opts.onProgress?.({ files: report.files, bytes: report.bytes, totalFiles: report.totalFiles, totalBytes: report.totalBytes, bad: report.bad });

  // Walk first (cheap: readdir + lstat), so progress has a total.
  const work: { hex: string; file: string }[] = [];
  let shards: string[] = [];
  try {
    shards = (await fs.readdir(shaDir)).sort();
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw err;
  }
  for (const shard of shards) {
    const dir = path.join(shaDir, shard);
    let names: string[];
    try {
      names = (await fs.readdir(dir)).sort();
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') continue;
      if (errnoCode(err) === 'ENOTDIR') {
        report.ignored++;
        continue;
      }
      throw err;
    }
    for (const name of names) {
      if (!HEX_RE.test(name) || !name.startsWith(shard)) {
        report.ignored++;
        continue;
      }
      const file = path.join(dir, name);
      try {
        const st = await fs.lstat(file);
        report.totalFiles++;
        report.totalBytes += st.isFile() ? st.size : 0;
      } catch (err) {
        if (errnoCode(err) !== 'ENOENT') throw err;
        continue;
      }
      work.push({ hex: name, file });
    }
  }
  progress();

  const bad = async (b: BadFile) => {
    report.bad++;
    if (b.removed) report.removed++;
    report.badFiles.push(b);
    opts.onBad?.(b);
  };

  try {
    for (const { hex, file } of work) {
      opts.signal?.throwIfAborted();
      let fh: FileHandle;
      try {
        fh = await openForHash(file);
      } catch (err) {
        const code = errnoCode(err);
        if (code === 'ENOENT') {
          report.gone++;
          continue;
        }
        if (code === 'ELOOP' || code === 'ENXIO' || code === 'EISDIR') {
          // A symlink, socket or directory under a digest name: overlay cannot use it as data.
          const st = await fs.lstat(file).catch(() => undefined);
          if (!st) {
            report.gone++;
            continue;
          }
          let outcome: BadFile['outcome'] = 'not a regular file';
          if (!target.readOnly && !st.isDirectory()) outcome = await target.removeCorrupt(hex, { dev: st.dev, ino: st.ino });
          await bad({ digest: `sha256:${hex}`, actual: `not a regular file (mode ${(st.mode >>> 12).toString(8)})`, size: st.size, path: file, removed: outcome === 'removed', outcome });
          report.files++;
          continue;
        }
        report.errors.push({ path: file, error: String(err) });
        continue;
      }
      let res: HashResult;
      try {
        res = await hashHandle(fh, {
          ...(limiter ? { limiter } : {}),
          ...(opts.signal ? { signal: opts.signal } : {}),
          onBytes: (n) => {
            report.bytes += n;
            progress();
          },
        });
      } catch (err) {
        if (opts.signal?.aborted) throw err;
        report.errors.push({ path: file, error: String(err) });
        continue;
      } finally {
        await fh.close().catch(() => undefined);
      }
      report.files++;
      if (res.hex === hex) {
        target.markVerified(hex);
      } else {
        const outcome = target.readOnly ? 'read-only' : await target.removeCorrupt(hex, res);
        await bad({ digest: `sha256:${hex}`, actual: `sha256:${res.hex}`, size: res.size, path: file, removed: outcome === 'removed', outcome });
      }
      progress();
    }
  } catch (err) {
    if (!opts.signal?.aborted) throw err;
    report.aborted = true;
  }
  report.finishedAt = new Date().toISOString();
  return report;
}
