/**
 * The pool: level 1 of DESIGN.md. One content-addressed, verified, size-capped
 * file cache shared by every image on the node.
 *
 * On-disk layout (the `sha256/` part is an API: overlayfs reads these files
 * directly as the data-only lower layer `lowerdir=…::ROOT/pool` through the
 * metacopy redirect `/sha256/ab/<hex>`):
 *
 *   ROOT/pool/
 *     sha256/ab/<64 hex>      one regular file per content digest, mode 0444, owned by
 *                             the daemon's user (root); present only once verified
 *     .staging/<hex>.<rand>   writes in progress; deleted at startup (never renamed later)
 *     .meta/state.json        snapshot: size, mtime, last use, verified flag per file,
 *                             the configured cap and the cumulative counters
 *     .meta/refs/<h>.json     one file per owner (index layer): {owner, digests}
 *     .lock                   the single-writer lock (see lock.ts)
 *
 * Writes are two-phase (stargz `cache.Add` → `Commit`/`Abort`): bytes go to a
 * staging file while their sha256 is computed; commit checks digest and size,
 * chmods 0444, fsyncs, renames into `sha256/ab/` (the directory is not
 * fsynced: a rename lost in a crash is a missing file, fetched again). A crash
 * at any moment leaves at most a staging file, deleted on next open, and never
 * a visible file whose data is not on disk. `addBuffer` does the same steps for
 * bytes already in memory (a fetched pack member) as one native threadpool task.
 *
 * Eviction: when usage passes `highWatermark × cap` (default 95 %), files are
 * unlinked until usage is at most `lowWatermark × cap` (default 85 %).
 * Unreferenced files go first, then referenced ones, each group least recently
 * used first. Pinned files and files being written are never chosen. Unlink
 * is safe (DESIGN.md, "Eviction is always safe"): open files stay readable and
 * later opens fall through to the miss filesystem.
 *
 * Recency is honest about what the daemon can see. Reads that overlayfs
 * serves from a pool file never reach the daemon, so a file's last use is the
 * latest of: its commit, `touch()`/`open()`/`pin()` calls (the lazy path makes
 * these when the miss filesystem serves a file), `touchReferenced(owner)` (a
 * container is created on that index layer's image: all its cached files count
 * as used), and its atime as sampled at startup and every `atimeSampleMs`
 * (default 15 min) when later than its mtime (a read after the write).
 * overlayfs opens lower files O_NOATIME (root owns them): its reads from the
 * pool never move atime (6.18: a cat through an overlay left the lower atime
 * alone), only other readers' do; so do the pool's own reads (verification).
 *
 * Persistence: the snapshot is rewritten atomically (temp, fsync, rename) a
 * short while after a change and on close; references are written at once.
 * Startup never trusts the snapshot over the disk: the directory is scanned,
 * files unknown to the snapshot are adopted as unverified (verified on their
 * next `open()` or by `verify()`), entries whose file is gone are dropped,
 * sizes come from stat, and a file whose size or mtime differs from the
 * snapshot is marked unverified.
 *
 * Concurrency: all methods may be called concurrently. Several writers of
 * one digest may run at once (each has its own staging file; every commit
 * renames verified, identical content into place). One process at a time
 * may open the pool for writing (`.lock`); `readOnly` opens take no lock.
 */
import { randomBytes } from 'node:crypto';
import fs, { type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { errnoCode, failedPrecondition, internal, invalidArgument } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { checkDigest } from '../registry/digest.js';
import { readJson, syncDir, writeFileAtomic } from '../sys/fsutil.js';
import { native } from '../sys/native.js';
import { mustEvictOnRelease, PoolNoSpaceError, type EvictResult } from './admission.js';
import { PoolLock } from './lock.js';
import { hashHandle, openForHash, type RemoveOutcome } from './scrub.js';
import { formatSize, parseSize } from './size.js';
import { PoolReferences } from './references.js';
import type { Entry, PoolCounters, PoolOptions, PoolStat, Snapshot, SnapshotEntry } from './types.js';
import { copyFileInto, PoolWriter, streamInto, type PoolWriteSink } from './writer.js';

export { PoolWriter } from './writer.js';
export type { PoolCounters, PoolOptions, PoolStat } from './types.js';
export { PoolNoSpaceError, type EvictResult } from './admission.js';

/** The cap used when neither the caller nor a previous run set one. */
export const DEFAULT_CACHE_SIZE = '20GiB';
/** Default fractions of the cap: evict when usage exceeds 95 %, down to 85 %. */
export const DEFAULT_HIGH_WATERMARK = 0.95;
export const DEFAULT_LOW_WATERMARK = 0.85;

const HEX_RE = /^[a-f0-9]{64}$/;
/** The shard directories of sha256/: the first two hex digits of a digest. */
const SHARDS = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'));
const SNAPSHOT_VERSION = 1;
/** Extra room asked for beyond a write's size when the disk is nearly full. */
const DISK_MARGIN = 1024 * 1024;
/** Free space above which makeRoom trusts a statfs up to a second old. */
const FREE_CUSHION = 256 * 1024 * 1024;

function hexOf(digest: string): string {
  return checkDigest(digest).slice(7);
}

function fraction(v: number | undefined, dflt: number, what: string): number {
  const f = v ?? dflt;
  if (!(f > 0 && f <= 1)) throw invalidArgument(`pool ${what} ${v}: want a fraction in (0, 1]`);
  return f;
}

/** Opens (creating if needed) the pool under opts.root. See the file comment. */
export function openPool(opts: PoolOptions): Promise<Pool> {
  return Pool.open(opts);
}

export class Pool implements PoolWriteSink {
  readonly root: string;
  readonly dir: string;
  readonly readOnly: boolean;
  private capBytes = 0;
  private readonly high: number;
  private readonly low: number;
  private readonly log: Logger;
  private readonly snapshotDelayMs: number;
  private readonly now: () => number;

  private readonly entries = new Map<string, Entry>();
  private used = 0;
  private readonly refs: PoolReferences;
  private readonly pins = new Map<string, number>();
  private readonly writing = new Map<string, number>();
  /** bytes announced by writers in progress (expectedSize), for room checks */
  private reserved = 0;
  private readonly evicting = new Map<string, Promise<void>>();
  /** Free disk space at the last statfs, less what was written since (makeRoom). */
  private freeKnown: { free: number; at: number } | undefined;
  /** Shard directories (sha256/ab) known to exist. */
  private readonly shards = new Set<string>();
  private readonly corruptListeners: ((digest: string) => void)[] = [];
  private counters: PoolCounters = { hits: 0, misses: 0, bytesFetched: 0, evictions: 0, evictedBytes: 0 };

  private readonly tasks = new Set<Promise<unknown>>();
  private snapshotTimer: NodeJS.Timeout | undefined;
  private sampleTimer: NodeJS.Timeout | undefined;
  private saving: Promise<void> | undefined;
  private lock: PoolLock | undefined;
  private closed = false;

  private constructor(opts: PoolOptions) {
    this.root = path.resolve(opts.root);
    this.dir = path.join(this.root, 'pool');
    this.readOnly = opts.readOnly ?? false;
    this.high = fraction(opts.highWatermark, DEFAULT_HIGH_WATERMARK, 'highWatermark');
    this.low = fraction(opts.lowWatermark, DEFAULT_LOW_WATERMARK, 'lowWatermark');
    if (this.low > this.high) throw invalidArgument(`pool lowWatermark ${this.low} is above highWatermark ${this.high}`);
    this.log = opts.logger ?? silentLogger();
    this.snapshotDelayMs = opts.snapshotDelayMs ?? 2000;
    this.now = opts.clock ?? Date.now;
    this.refs = new PoolReferences(path.join(this.dir, '.meta', 'refs'), this.log);
  }

  static async open(opts: PoolOptions): Promise<Pool> {
    const pool = new Pool(opts);
    try {
      await pool.init(opts);
    } catch (err) {
      await pool.lock?.release();
      throw err;
    }
    return pool;
  }

  // ---------------------------------------------------------------- paths

  private get shaDir(): string {
    return path.join(this.dir, 'sha256');
  }
  private get stagingDir(): string {
    return path.join(this.dir, '.staging');
  }
  private get metaDir(): string {
    return path.join(this.dir, '.meta');
  }
  private fileOf(hex: string): string {
    return path.join(this.shaDir, hex.slice(0, 2), hex);
  }

  /** `ROOT/pool/sha256/ab/<hex>` for a digest (validated; InvalidArgument otherwise). Does not check presence. */
  path(digest: string): string {
    return this.fileOf(hexOf(digest));
  }

  /** The overlay redirect for a digest: `/sha256/ab/<hex>`. */
  static redirectOf(digest: string): string {
    const hex = hexOf(digest);
    return `/sha256/${hex.slice(0, 2)}/${hex}`;
  }

  // ---------------------------------------------------------------- startup

  private async init(opts: PoolOptions): Promise<void> {
    if (!this.readOnly) {
      await fs.mkdir(this.dir, { recursive: true, mode: 0o755 });
      this.lock = await PoolLock.acquire(path.join(this.dir, '.lock'), `open the pool ${this.dir} for writing`);
      await fs.mkdir(this.stagingDir, { recursive: true, mode: 0o700 });
      await fs.mkdir(this.refs.dir, { recursive: true, mode: 0o700 });
      await fs.mkdir(this.shaDir, { recursive: true, mode: 0o755 });
      // The 256 shard dirs at once, with one sync of sha256/: made on first use, a new shard cost a
      // directory fsync in the path of a commit, 256 of them in the first prefetch of a node.
      const have = new Set(await fs.readdir(this.shaDir));
      const missing = SHARDS.filter((x) => !have.has(x));
      await Promise.all(missing.map((x) => fs.mkdir(path.join(this.shaDir, x), { recursive: true, mode: 0o755 })));
      if (missing.length) await syncDir(this.shaDir);
      for (const x of SHARDS) this.shards.add(x);
      const leftovers = await fs.readdir(this.stagingDir);
      await Promise.all(leftovers.map((n) => fs.rm(path.join(this.stagingDir, n), { recursive: true, force: true })));
      if (leftovers.length) this.log.info({ count: leftovers.length }, 'pool: removed leftover staging files');
    }

    let snap: Snapshot | undefined;
    try {
      snap = await readJson<Snapshot>(path.join(this.metaDir, 'state.json'));
      if (snap && (snap.version !== SNAPSHOT_VERSION || typeof snap.entries !== 'object')) snap = undefined;
    } catch (err) {
      this.log.warn({ err: String(err) }, 'pool: unreadable snapshot; rebuilding from the directory');
    }
    const cap = opts.capBytes ?? snap?.capBytes ?? DEFAULT_CACHE_SIZE;
    this.capBytes = parseSize(cap);
    if (this.capBytes <= 0) throw invalidArgument(`pool cap ${JSON.stringify(cap)}: must be more than 0 bytes`);
    if (snap?.counters) this.counters = { ...this.counters, ...snap.counters };

    await this.refs.load(this.readOnly, hexOf);
    await this.scan(snap);

    if (!this.readOnly) {
      await this.saveSnapshot();
      if (opts.enforceCapOnOpen ?? true) await this.enforceCap();
      const every = opts.atimeSampleMs ?? 15 * 60_000;
      if (every > 0) {
        this.sampleTimer = setInterval(() => this.track(this.sampleAtimes()), every);
        this.sampleTimer.unref();
      }
    }
  }

  private async scan(snap: Snapshot | undefined): Promise<void> {
    let shards: string[];
    try {
      shards = await fs.readdir(this.shaDir);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return;
      throw err;
    }
    let adopted = 0;
    for (const shard of shards) {
      const names = await fs.readdir(path.join(this.shaDir, shard)).catch(() => [] as string[]);
      await Promise.all(
        names.map(async (hex) => {
          if (!HEX_RE.test(hex) || !hex.startsWith(shard)) {
            this.log.warn({ file: path.join(shard, hex) }, 'pool: ignoring a file that is not named by its digest');
            return;
          }
          const file = this.fileOf(hex);
          let st;
          try {
            st = await fs.lstat(file);
          } catch {
            return;
          }
          if (!st.isFile()) return;
          const known = snap?.entries[hex];
          let verified = !!known && known[3] === 1 && known[0] === st.size && known[2] === st.mtimeMs;
          if ((st.mode & 0o7777) !== 0o444 && !this.readOnly) {
            await fs.chmod(file, 0o444);
            verified = false;
          }
          if (!known) adopted++;
          // atime counts as a use only when later than mtime, i.e. a read after the write.
          const readAt = st.atimeMs > st.mtimeMs ? st.atimeMs : 0;
          const lastUse = Math.round(Math.max(known ? known[1] : st.mtimeMs, readAt));
          this.entries.set(hex, { size: st.size, lastUse, mtimeMs: st.mtimeMs, verified });
          this.used += st.size;
        }),
      );
    }
    const dropped = snap ? Object.keys(snap.entries).filter((h) => !this.entries.has(h)).length : 0;
    if (adopted || dropped) this.log.info({ adopted, dropped }, 'pool: reconciled the snapshot with the directory');
  }

  // ---------------------------------------------------------------- queries

  /** True when the digest's file is in the pool (as far as this process knows). */
  has(digest: string): boolean {
    return this.entries.has(hexOf(digest));
  }

  /** Size of a present file, or undefined. */
  sizeOf(digest: string): number | undefined {
    return this.entries.get(hexOf(digest))?.size;
  }

  /** Records a use of the digest (recency for LRU). Returns false when absent. */
  touch(digest: string): boolean {
    const e = this.entries.get(hexOf(digest));
    if (!e) return false;
    e.lastUse = Math.max(e.lastUse, this.now());
    this.markDirty();
    return true;
  }

  /** Records a use of every present file `owner` references (setReferenced); returns how many. */
  touchReferenced(owner: string): number {
    let n = 0;
    const now = this.now();
    for (const hex of this.refs.of(owner)) {
      const e = this.entries.get(hex);
      if (!e) continue;
      e.lastUse = Math.max(e.lastUse, now);
      n++;
    }
    if (n) this.markDirty();
    return n;
  }

  /**
   * Counts a container's need of a file that reached the miss filesystem: a
   * hit when the pool had it, a miss when it had to be fetched. (Opens that
   * overlay serves from ROOT/pool itself never reach the daemon.)
   */
  countUse(hit: boolean): void {
    if (hit) this.counters.hits++;
    else this.counters.misses++;
    this.markDirty();
  }

  /**
   * Opens a present file for reading (the miss filesystem's path), touching
   * it and counting a hit, or returns null and counts a miss (`count: false`
   * skips the counters, e.g. right after the caller wrote the file). A file
   * adopted at startup is verified first; a corrupt one is deleted and
   * reported as absent. A file deleted behind the pool's back is forgotten.
   */
  async open(digest: string, opts: { count?: boolean } = {}): Promise<FileHandle | null> {
    const hex = hexOf(digest);
    const count = opts.count ?? true;
    const e = this.entries.get(hex);
    if (e && !e.verified && !(await this.verify(digest))) {
      if (count) this.counters.misses++;
      return null;
    }
    if (!e) {
      if (count) this.counters.misses++;
      this.markDirty();
      return null;
    }
    try {
      const fh = await fs.open(this.fileOf(hex), 'r');
      e.lastUse = Math.max(e.lastUse, this.now());
      if (count) this.counters.hits++;
      this.markDirty();
      return fh;
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') throw err;
      this.forget(hex);
      if (count) this.counters.misses++;
      return null;
    }
  }

  /**
   * Re-hashes a present file. Returns true when it matches; on a mismatch the
   * file is deleted (logged as an error) and false is returned; false too
   * when the file is absent.
   */
  async verify(digest: string): Promise<boolean> {
    const hex = hexOf(digest);
    let fh: FileHandle;
    try {
      fh = await openForHash(this.fileOf(hex));
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') throw err;
      this.forget(hex);
      return false;
    }
    let res;
    try {
      res = await hashHandle(fh);
    } finally {
      await fh.close();
    }
    if (res.hex === hex) {
      this.markVerified(hex);
      return true;
    }
    this.log.error({ digest, actual: `sha256:${res.hex}`, size: res.size }, 'pool: corrupt file removed');
    if (!this.readOnly) await this.removeCorrupt(hex, res);
    return false;
  }

  /**
   * Calls f(digest) after a corrupt file was removed (scrub, verify), e.g. so the miss filesystem
   * drops what it still holds of the removed inode. Not called for evictions (their content is good).
   */
  onCorruptRemoved(f: (digest: string) => void): void {
    this.corruptListeners.push(f);
  }

  /** @internal (scrub.ts) records that the file under hex hashed right. */
  markVerified(hex: string): void {
    const e = this.entries.get(hex);
    if (e && !e.verified) {
      e.verified = true;
      this.markDirty();
    }
  }

  /**
   * @internal (scrub.ts, verify) Unlinks a file found corrupt, only if the
   * name still points at the inode that was hashed (`id`) and no write or
   * eviction of the digest is in progress. While it runs, the digest is
   * marked as being evicted, so a commit of it waits (install) and eviction
   * skips it. Not counted as an eviction.
   */
  async removeCorrupt(hex: string, id: { dev: number; ino: number }): Promise<RemoveOutcome> {
    this.checkWritable('remove a corrupt file');
    if (this.evicting.has(hex) || this.writing.get(hex)) return 'busy';
    const file = this.fileOf(hex);
    let done!: () => void;
    this.evicting.set(hex, new Promise<void>((r) => (done = r)));
    try {
      let st;
      try {
        st = await fs.lstat(file);
      } catch (err) {
        if (errnoCode(err) !== 'ENOENT') throw err;
        this.forget(hex);
        return 'gone';
      }
      if (st.dev !== id.dev || st.ino !== id.ino) return 'replaced';
      this.forget(hex);
      await fs.rm(file, { force: true });
      await syncDir(path.dirname(file)).catch(() => undefined);
      for (const f of this.corruptListeners) {
        try {
          f(`sha256:${hex}`);
        } catch (err) {
          this.log.warn({ digest: `sha256:${hex}`, err: String(err) }, 'pool: a removal listener failed');
        }
      }
      return 'removed';
    } finally {
      this.evicting.delete(hex);
      done();
    }
  }

  /** Usage, cap and counters. */
  stat(): PoolStat {
    let refFiles = 0;
    let refBytes = 0;
    let unverified = 0;
    for (const [hex, e] of this.entries) {
      if (this.refs.has(hex)) {
        refFiles++;
        refBytes += e.size;
      }
      if (!e.verified) unverified++;
    }
    const { hits, misses } = this.counters;
    return {
      root: this.root,
      capBytes: this.capBytes,
      highWatermarkBytes: Math.floor(this.capBytes * this.high),
      lowWatermarkBytes: Math.floor(this.capBytes * this.low),
      files: this.entries.size,
      bytes: this.used,
      referencedFiles: refFiles,
      referencedBytes: refBytes,
      unreferencedFiles: this.entries.size - refFiles,
      unreferencedBytes: this.used - refBytes,
      unverifiedFiles: unverified,
      owners: this.refs.size,
      pinned: [...this.pins.values()].filter((n) => n > 0).length,
      writing: [...this.writing.values()].filter((n) => n > 0).length,
      counters: { ...this.counters },
      hitRate: hits + misses > 0 ? hits / (hits + misses) : null,
    };
  }

  /** Digests present, least recently used first (for tests and tools). */
  list(): { digest: string; size: number; lastUse: number; referenced: boolean; verified: boolean }[] {
    return [...this.entries]
      .sort((a, b) => a[1].lastUse - b[1].lastUse || (a[0] < b[0] ? -1 : 1))
      .map(([hex, e]) => ({
        digest: `sha256:${hex}`,
        size: e.size,
        lastUse: e.lastUse,
        referenced: this.refs.has(hex),
        verified: e.verified,
      }));
  }

  // ---------------------------------------------------------------- pins and references

  /**
   * Protects a digest from eviction (present or not yet) until the returned
   * function is called; the release is idempotent. Pins count: a digest stays
   * protected while any pin is held. Also records a use.
   */
  pin(digest: string): () => void {
    const hex = hexOf(digest);
    this.pins.set(hex, (this.pins.get(hex) ?? 0) + 1);
    this.touch(digest);
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const n = (this.pins.get(hex) ?? 1) - 1;
      if (n > 0) return void this.pins.set(hex, n);
      this.pins.delete(hex);
      // Over the cap because of files in use (admission.ts): evict now that one is not.
      if (!this.closed && !this.readOnly && mustEvictOnRelease(this.used, this.capBytes, this.high)) {
        this.enforceCap().catch((err: unknown) => this.log.warn({ err: String(err) }, 'pool: eviction after release failed'));
      }
    };
  }

  /**
   * Declares the full set of digests `owner` (an index layer id) references,
   * replacing any previous set; durable when the promise resolves. Referenced
   * files are evicted only after every unreferenced one. Digests are validated
   * first (InvalidArgument, nothing changed). Calls for one owner apply in order.
   */
  async setReferenced(owner: string, digests: Iterable<string>): Promise<void> {
    this.checkWritable('set references');
    if (typeof owner !== 'string' || owner === '') throw invalidArgument('pool reference owner must be a non-empty string');
    await this.runTask(this.refs.set(owner, [...new Set([...digests].map(hexOf))]));
  }

  /**
   * Owners with recorded references (persisted across restarts). A layer store
   * calls dropReferences for owners it no longer has, e.g. layers removed while
   * the daemon was down.
   */
  referenceOwners(): string[] {
    return this.refs.owners();
  }

  /** Forgets every reference of `owner` (layer removed); durable when it resolves. Idempotent. */
  async dropReferences(owner: string): Promise<void> {
    this.checkWritable('drop references');
    await this.runTask(this.refs.drop(owner));
  }

  // ---------------------------------------------------------------- writes

  /**
   * Starts a two-phase write of `digest`. Write the content, then `commit()`
   * (verifies sha256 and size, makes the file visible) or `abort()`. With
   * `expectedSize`, room is made first (eviction, free disk space) and a
   * longer write fails at once. Throws InvalidArgument for a bad digest.
   */
  async beginWrite(digest: string, expectedSize?: number): Promise<PoolWriter> {
    this.checkWritable('write');
    const hex = hexOf(digest);
    if (expectedSize !== undefined && !(Number.isSafeInteger(expectedSize) && expectedSize >= 0)) {
      throw invalidArgument(`pool write ${digest}: bad expected size ${expectedSize}`);
    }
    this.writing.set(hex, (this.writing.get(hex) ?? 0) + 1);
    const reserve = expectedSize ?? 0;
    this.reserved += reserve;
    try {
      if (reserve > 0) await this.makeRoom(reserve);
      const staging = path.join(this.stagingDir, `${hex}.${randomBytes(6).toString('hex')}`);
      const fh = await fs.open(staging, 'wx', 0o600);
      return new PoolWriter(this, hex, staging, fh, expectedSize);
    } catch (err) {
      this.endWrite(hex, reserve);
      if (errnoCode(err) === 'ENOSPC' || errnoCode(err) === 'EDQUOT') throw await this.noSpace(hex, reserve, err);
      throw err;
    }
  }

  /** Copies a local file into the pool, verifying it; retries once after a disk-full eviction. */
  addFromFile(file: string, digest: string): Promise<void> {
    return copyFileInto(this, file, digest);
  }

  /** Stores a stream's content under `digest`, verifying it. Nothing is left behind on failure. */
  addFromStream(readable: AsyncIterable<Uint8Array | string>, digest: string, expectedSize?: number): Promise<void> {
    return streamInto(this, readable, digest, expectedSize);
  }

  /**
   * Stores the content of `data` under `digest`, verified, durable when it
   * resolves: `data` is the content, or with `zstd` one zstd frame of it
   * (`size` bytes; default data.length). One native threadpool task decodes,
   * hashes, creates, writes, fsyncs and renames the file (writeFileDurable),
   * where a PoolWriter takes seven round trips through the event loop and
   * hashes on it: a prefetch commits hundreds of small files while an
   * ApplyDiff builds an index on the same thread. Content that does not match
   * throws InvalidArgument ("does not match") and leaves nothing.
   */
  async addBuffer(digest: string, data: Buffer, opts: { size?: number; zstd?: boolean } = {}): Promise<void> {
    this.checkWritable('write');
    const hex = hexOf(digest);
    const size = opts.size ?? data.length;
    this.writing.set(hex, (this.writing.get(hex) ?? 0) + 1);
    this.reserved += size;
    try {
      await this.makeRoom(size);
      const file = await this.installTarget(hex);
      const staging = path.join(this.stagingDir, `${hex}.${randomBytes(6).toString('hex')}`);
      const mtimeMs = await native.writeFileDurable(staging, file, data, 0o444, { sha256: hex, size, zstd: opts.zstd === true });
      this.installed(hex, size, mtimeMs);
    } catch (err) {
      const code = errnoCode(err);
      if (code === 'ENOSPC' || code === 'EDQUOT') throw await this.noSpace(hex, size, err);
      if (code === 'ERR_GEAR_ZSTD' || code === 'ERR_GEAR_SIZE' || code === 'ERR_GEAR_DIGEST') {
        throw invalidArgument(`pool write ${digest}: content does not match: ${(err as Error).message}`, err);
      }
      throw internal(`pool write ${digest}: ${String(err)}`, err);
    } finally {
      this.endWrite(hex, size);
    }
    await this.enforceCap();
  }

  /** @internal called by PoolWriter */
  endWrite(hex: string, reserved: number): void {
    this.reserved -= reserved;
    const n = (this.writing.get(hex) ?? 1) - 1;
    if (n > 0) this.writing.set(hex, n);
    else this.writing.delete(hex);
  }

  /** @internal called by PoolWriter after verification: makes the staging file visible. */
  async install(hex: string, staging: string, size: number): Promise<void> {
    const file = await this.installTarget(hex);
    // No fsync of the directory: the data was fsynced before the rename, and a rename lost in a
    // crash only means a missing file, which startup drops from the snapshot and the next open
    // fetches again. It would cost a journal commit on the path of every first open.
    await fs.rename(staging, file);
    this.installed(hex, size, (await fs.stat(file)).mtimeMs);
  }

  /** Where a verified file of hex goes, once no unlink of it is in flight; its shard directory exists. */
  private async installTarget(hex: string): Promise<string> {
    await this.evicting.get(hex); // never let an in-flight unlink remove the new file
    const file = this.fileOf(hex);
    const shard = hex.slice(0, 2);
    // Concurrent mkdirs of one shard are fine (recursive ignores EEXIST); shards are never removed.
    if (!this.shards.has(shard) && (await fs.mkdir(path.dirname(file), { recursive: true, mode: 0o755 }))) await syncDir(this.shaDir);
    this.shards.add(shard);
    return file;
  }

  private installed(hex: string, size: number, mtimeMs: number): void {
    const old = this.entries.get(hex);
    if (old) this.used -= old.size;
    this.entries.set(hex, { size, lastUse: this.now(), mtimeMs, verified: true });
    this.used += size;
    this.counters.bytesFetched += size;
    this.markDirty();
  }

  /** @internal a writer hit ENOSPC: evict and build the error to throw. */
  async noSpace(hex: string, wanted: number, cause: unknown): Promise<PoolNoSpaceError> {
    const freed = await this.evictBytes(wanted + DISK_MARGIN, true);
    const what = `no space left on device while writing sha256:${hex} to the pool ${this.dir}`;
    const how =
      freed.files > 0
        ? `evicted ${freed.files} file(s), ${formatSize(freed.bytes)}; the write can be retried`
        : `nothing could be evicted (${this.entries.size} file(s) present, ${this.stat().pinned} pinned, ${this.stat().writing} being written); free space on the filesystem holding the pool, or lower its cap (--cache-size)`;
    this.log.warn({ digest: `sha256:${hex}`, freed }, 'pool: disk full during a write');
    return new PoolNoSpaceError(`${what}: ${how}`, freed, cause);
  }

  // ---------------------------------------------------------------- eviction

  /** Evicts (unreferenced first, then LRU) if usage is above the high watermark, down to the low one. */
  async enforceCap(): Promise<EvictResult> {
    if (this.used <= this.capBytes * this.high) return { files: 0, bytes: 0 };
    return this.evictDownTo(Math.floor(this.capBytes * this.low), true);
  }

  /**
   * Removes files on request (`gear cache prune`): by default every
   * unreferenced file; `all`: every file; `toBytes`: in eviction order until
   * usage is at most that. Pinned files and files being written stay.
   */
  async prune(opts: { all?: boolean; toBytes?: number } = {}): Promise<EvictResult> {
    this.checkWritable('prune');
    if (opts.toBytes !== undefined) return this.evictDownTo(opts.toBytes, true);
    return this.evictDownTo(0, opts.all ?? false);
  }

  private candidates(includeReferenced: boolean): [string, Entry][] {
    const free = [...this.entries].filter(
      ([h]) => !this.pins.get(h) && !this.writing.get(h) && !this.evicting.has(h),
    );
    const byUse = (a: [string, Entry], b: [string, Entry]) => a[1].lastUse - b[1].lastUse || (a[0] < b[0] ? -1 : 1);
    const unref = free.filter(([h]) => !this.refs.has(h)).sort(byUse);
    const ref = includeReferenced ? free.filter(([h]) => this.refs.has(h)).sort(byUse) : [];
    return [...unref, ...ref];
  }

  private evictDownTo(target: number, includeReferenced: boolean): Promise<EvictResult> {
    const victims: string[] = [];
    let after = this.used;
    for (const [hex, e] of this.candidates(includeReferenced)) {
      if (after <= target) break;
      victims.push(hex);
      after -= e.size;
    }
    return this.evict(victims);
  }

  private evictBytes(bytes: number, includeReferenced: boolean): Promise<EvictResult> {
    const victims: string[] = [];
    let freed = 0;
    for (const [hex, e] of this.candidates(includeReferenced)) {
      if (freed >= bytes) break;
      victims.push(hex);
      freed += e.size;
    }
    return this.evict(victims);
  }

  private async evict(victims: string[]): Promise<EvictResult> {
    const result: EvictResult = { files: 0, bytes: 0 };
    if (victims.length === 0) return result;
    await this.runTask(
      Promise.all(
        victims.map(async (hex) => {
          const e = this.entries.get(hex);
          if (!e) return;
          // Accounting first (synchronously), so concurrent evictions never pick it twice.
          this.entries.delete(hex);
          this.used -= e.size;
          const unlink = fs.rm(this.fileOf(hex), { force: true });
          this.evicting.set(hex, unlink.then(() => undefined, () => undefined));
          try {
            await unlink;
            result.files++;
            result.bytes += e.size;
          } catch (err) {
            this.log.warn({ digest: `sha256:${hex}`, err: String(err) }, 'pool: eviction failed');
            if (!this.entries.has(hex)) {
              this.entries.set(hex, e);
              this.used += e.size;
            }
          } finally {
            this.evicting.delete(hex);
          }
        }),
      ),
    );
    await Promise.all([...new Set(victims.map((h) => path.join(this.shaDir, h.slice(0, 2))))].map((d) => syncDir(d).catch(() => undefined)));
    this.counters.evictions += result.files;
    this.counters.evictedBytes += result.bytes;
    this.markDirty();
    if (result.files) this.log.info(result, 'pool: evicted');
    return result;
  }

  /** Makes room for `bytes` more: cap (with writes in progress counted) and free disk space. */
  private async makeRoom(bytes: number): Promise<void> {
    const high = this.capBytes * this.high;
    if (this.used + this.reserved > high) {
      await this.evictDownTo(Math.max(0, Math.floor(this.capBytes * this.low) - this.reserved), true);
    }
    // A disk known to be far from full within the last second skips the statfs (a threadpool round
    // trip per file: 928 of them in a prefetch); what was written since is counted off.
    const known = this.freeKnown;
    if (known && this.now() - known.at < 1000 && known.free - bytes > FREE_CUSHION) {
      known.free -= bytes;
      return;
    }
    try {
      const sf = await fs.statfs(this.stagingDir);
      const free = sf.bavail * sf.bsize;
      this.freeKnown = { free: free - bytes, at: this.now() };
      if (free < bytes + DISK_MARGIN) await this.evictBytes(bytes + DISK_MARGIN - free, true);
    } catch (err) {
      this.log.debug({ err: String(err) }, 'pool: statfs failed');
    }
  }

  private forget(hex: string): void {
    const e = this.entries.get(hex);
    if (!e) return;
    this.entries.delete(hex);
    this.used -= e.size;
    this.markDirty();
  }

  // ---------------------------------------------------------------- recency sampling and persistence

  /**
   * Takes each file's atime as a use when it is later than the recorded one,
   * and drops entries whose file disappeared. Runs every `atimeSampleMs`.
   */
  async sampleAtimes(): Promise<void> {
    const hexes = [...this.entries.keys()];
    for (let i = 0; i < hexes.length; i += 256) {
      await Promise.all(
        hexes.slice(i, i + 256).map(async (hex) => {
          try {
            const st = await fs.stat(this.fileOf(hex));
            const e = this.entries.get(hex);
            if (e && st.atimeMs > st.mtimeMs && st.atimeMs > e.lastUse) {
              e.lastUse = Math.round(st.atimeMs);
              this.markDirty();
            }
          } catch (err) {
            if (errnoCode(err) === 'ENOENT' && !this.writing.get(hex)) this.forget(hex);
          }
        }),
      );
    }
  }

  private markDirty(): void {
    if (this.readOnly || this.closed) return;
    if (this.snapshotTimer) return;
    this.snapshotTimer = setTimeout(() => {
      this.snapshotTimer = undefined;
      this.track(this.saveSnapshot());
    }, this.snapshotDelayMs);
    this.snapshotTimer.unref();
  }

  /** Writes the snapshot now (crash-safe). Also done on close. */
  async flush(): Promise<void> {
    if (this.readOnly) return;
    if (this.snapshotTimer) {
      clearTimeout(this.snapshotTimer);
      this.snapshotTimer = undefined;
    }
    await this.saveSnapshot();
  }

  private async saveSnapshot(): Promise<void> {
    // One writer at a time; a change made during a save is picked up by the next one.
    while (this.saving) await this.saving;
    const entries: Record<string, SnapshotEntry> = {};
    for (const [hex, e] of this.entries) entries[hex] = [e.size, Math.round(e.lastUse), e.mtimeMs, e.verified ? 1 : 0];
    const snap: Snapshot = {
      version: SNAPSHOT_VERSION,
      savedAt: new Date().toISOString(),
      capBytes: this.capBytes,
      counters: this.counters,
      entries,
    };
    this.saving = writeFileAtomic(path.join(this.metaDir, 'state.json'), JSON.stringify(snap), 0o600).catch((err: unknown) => {
      // e.g. ENOSPC: the next change schedules another save
      this.log.warn({ err: String(err) }, 'pool: could not save the snapshot');
    });
    try {
      await this.saving;
    } finally {
      this.saving = undefined;
    }
  }

  private track(p: Promise<unknown>): void {
    const t = p.catch((err: unknown) => this.log.error({ err: String(err) }, 'pool: background task failed'));
    this.tasks.add(t);
    void t.finally(() => this.tasks.delete(t));
  }

  private async runTask<T>(p: Promise<T>): Promise<T> {
    const t = p.then(
      () => undefined,
      () => undefined,
    );
    this.tasks.add(t);
    try {
      return await p;
    } finally {
      this.tasks.delete(t);
    }
  }

  private checkWritable(what: string): void {
    if (this.readOnly) throw failedPrecondition(`pool ${this.dir} is open read-only: cannot ${what}`);
    if (this.closed) throw failedPrecondition(`pool ${this.dir} is closed: cannot ${what}`);
  }

  /**
   * Stops timers, waits for background work, writes the snapshot and releases
   * the lock. Idempotent. Writers still open are left to their owners (their
   * staging files are removed at the next open).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.sampleTimer) clearInterval(this.sampleTimer);
    while (this.tasks.size) await Promise.all([...this.tasks]);
    if (!this.readOnly) await this.flush();
    this.closed = true;
    if (this.snapshotTimer) clearTimeout(this.snapshotTimer);
    if (this.writing.size) this.log.warn({ writers: this.writing.size }, 'pool: closed with writes in progress');
    await this.lock?.release();
  }
}
