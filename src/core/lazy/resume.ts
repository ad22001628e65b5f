/**
 * Crash resume: completing into the pool, in the background, the Gear files of
 * index layers that mounted containers still use when the daemon starts.
 *
 * Why: a container overlay made by a previous daemon run keeps a reference to
 * THAT run's miss filesystem (the superblock is fixed at mount time). After a
 * kill -9 its FUSE connection is aborted; after a clean stop it is detached
 * lazily (containers keep running across a plugin restart). Either way the
 * new daemon's miss filesystem at ROOT/miss is a different mount that those
 * overlays never see. What still works in such a container, and what does not:
 *
 * - Files whose data overlay already looked up in ROOT/pool (opened while the
 *   file was cached): keep working; reads go to the pool file, no daemon.
 * - Files never opened yet: overlay looks the data-only layers up lazily, on
 *   the first open, pool first. If the file is in the pool by then, the open
 *   succeeds; otherwise the lookup falls through to the dead miss filesystem
 *   and the open fails (ENOTCONN, "Transport endpoint is not connected").
 *   A failed lookup is not remembered, so a later open retries: once this
 *   module has put the file into the pool, it works. That is what this module
 *   is for.
 * - Files first opened through the miss filesystem (not cached at that time):
 *   overlay remembers the FUSE inode as their data. Reads through fds opened
 *   before the crash, and new opens while overlay keeps that inode cached, go
 *   to the dead connection and fail. Only when the kernel drops the overlay
 *   inode (memory pressure, the container closes it and its dentry is
 *   reclaimed) does a new open look the data up again and find the pool. A
 *   container restart (new overlay mount) always fixes it.
 *
 * Fetches are background priority with at most half of the fetcher's slots in
 * use, so containers blocked in an open (foreground) are never queued behind
 * the resume. Only as many bytes as fit under the pool's low watermark are
 * fetched (smallest files first: most files working for the space); the rest
 * is reported (log line and status), not fetched only to be evicted again.
 * Format v3 files (pack members) are queued together first, so the fetcher
 * serves them with coalesced Range requests (background-fetch.ts fetchPacked).
 */
import type { FetchRequest } from '../fetcher/fetcher.js';
import { silentLogger, type Logger } from '../log.js';
import { formatSize } from '../pool/size.js';
import { fetchInBackground, fetchPacked, type BackgroundFetchDeps } from './background-fetch.js';

/** One Gear file a mounted container may still open. */
export interface ResumeFile {
  digest: string;
  size: number;
}

/** What the resume needs of the pool, the fetcher and the catalog (fakes in unit tests). */
export interface ResumeDeps {
  pool: {
    has(digest: string): boolean;
    sizeOf(digest: string): number | undefined;
    touch(digest: string): boolean;
    stat(): { lowWatermarkBytes: number };
  };
  fetcher: BackgroundFetchDeps['fetcher'] & { readonly maxParallel: number };
  catalog: { requests(digest: string): FetchRequest[] };
  logger?: Logger;
}

export interface ResumePlan {
  /** Distinct files wanted. */
  total: number;
  totalBytes: number;
  /** Already in the pool at start. */
  cached: number;
  cachedBytes: number;
  /** To fetch, in order. */
  todo: ResumeFile[];
  todoBytes: number;
  /** Not fetched: would not fit under the pool's low watermark. */
  skipped: number;
  skippedBytes: number;
}

/**
 * Which files to fetch: the distinct ones not in the pool, smallest first,
 * as many as fit in `budgetBytes` once the cached ones are counted.
 */
export function planResume(files: Iterable<ResumeFile>, inPool: (digest: string) => boolean, budgetBytes: number): ResumePlan {
  const seen = new Map<string, number>();
  for (const f of files) if (!seen.has(f.digest)) seen.set(f.digest, f.size);
  const plan: ResumePlan = { total: 0, totalBytes: 0, cached: 0, cachedBytes: 0, todo: [], todoBytes: 0, skipped: 0, skippedBytes: 0 };
  const missing: ResumeFile[] = [];
  for (const [digest, size] of seen) {
    plan.total++;
    plan.totalBytes += size;
    if (inPool(digest)) {
      plan.cached++;
      plan.cachedBytes += size;
    } else {
      missing.push({ digest, size });
    }
  }
  missing.sort((a, b) => a.size - b.size || (a.digest < b.digest ? -1 : 1));
  let room = budgetBytes - plan.cachedBytes;
  for (const f of missing) {
    if (f.size <= room) {
      plan.todo.push(f);
      plan.todoBytes += f.size;
      room -= f.size;
    } else {
      plan.skipped++;
      plan.skippedBytes += f.size;
    }
  }
  return plan;
}

export type ResumeState = 'idle' | 'running' | 'done' | 'stopped';

export class ResumeQueue {
  private readonly deps: ResumeDeps;
  private readonly log: Logger;
  private readonly controller = new AbortController();
  private plan: ResumePlan | undefined;
  private state: ResumeState = 'idle';
  private fetched = 0;
  private fetchedBytes = 0;
  private failed = 0;
  private started = 0;
  private finished = 0;
  private layers = 0;
  private running: Promise<void> | undefined;

  constructor(deps: ResumeDeps) {
    this.deps = deps;
    this.log = (deps.logger ?? silentLogger()).child({ component: 'resume' });
  }

  /** At most this many resume fetches at a time: half the fetcher's slots stay free for containers. */
  get window(): number {
    return Math.max(1, Math.floor(this.deps.fetcher.maxParallel / 2));
  }

  /**
   * Plans and starts completing `files` (of `layers` index layers) in the
   * background. Resolves the run's end (never rejects); call once.
   */
  start(files: Iterable<ResumeFile>, layers: number): Promise<void> {
    if (this.state !== 'idle') throw new Error('resume already started');
    const { pool } = this.deps;
    const list = [...files];
    // Files of running containers already in the pool: most recently used, so
    // that the fetches below evict other files first.
    for (const f of list) if (pool.has(f.digest)) pool.touch(f.digest);
    this.plan = planResume(list, (d) => pool.has(d), pool.stat().lowWatermarkBytes);
    this.layers = layers;
    this.started = Date.now();
    this.state = 'running';
    const p = this.plan;
    this.log.info(
      { layers, files: p.total, cached: p.cached, toFetch: p.todo.length, bytes: p.todoBytes, window: this.window },
      `resume: completing ${p.todo.length} uncached Gear files (${formatSize(p.todoBytes)}) of ${layers} index layers in use by mounted containers`,
    );
    if (p.skipped) {
      this.log.warn(
        { skipped: p.skipped, skippedBytes: p.skippedBytes, lowWatermark: pool.stat().lowWatermarkBytes },
        `resume: ${p.skipped} files (${formatSize(p.skippedBytes)}) do not fit in the pool cap and are not fetched; ` +
          'containers started before the restart cannot open them (raise --cache-size, or restart those containers)',
      );
    }
    this.running = this.run(p.todo);
    return this.running;
  }

  private async run(todo: ResumeFile[]): Promise<void> {
    let next = 0;
    // Format v3: pack members first, queued together so that one Range request serves many.
    const packed = await fetchPacked(this.deps, todo.map((f) => f.digest), this.controller.signal);
    const worker = async () => {
      while (!this.controller.signal.aborted && next < todo.length) {
        const f = todo[next++]!;
        if (packed.has(f.digest) || (await this.fetchOne(f))) {
          this.fetched++;
          this.fetchedBytes += f.size;
        } else if (!this.controller.signal.aborted) {
          this.failed++;
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.window, todo.length) }, worker));
    this.finished = Date.now();
    if (this.controller.signal.aborted) {
      this.state = 'stopped';
      this.log.info({ fetched: this.fetched, failed: this.failed, left: todo.length - this.fetched - this.failed }, 'resume: stopped');
      return;
    }
    this.state = 'done';
    const ms = this.finished - this.started;
    if (this.failed) {
      this.log.warn(
        { fetched: this.fetched, failed: this.failed, ms },
        `resume: done in ${ms} ms, ${this.failed} files could not be fetched (see the fetch failures above); the next open of one of them in a container started before the restart fails`,
      );
    } else {
      this.log.info({ fetched: this.fetched, bytes: this.fetchedBytes, ms }, `resume: done in ${ms} ms`);
    }
  }

  /** True when f is in the pool afterwards. */
  private async fetchOne(f: ResumeFile): Promise<boolean> {
    const r = await fetchInBackground(this.deps, f.digest, this.controller.signal);
    if (r.why) this.log.debug({ digest: f.digest, err: r.why }, 'resume: fetch failed');
    return r.inPool;
  }

  /** Numbers of the crash resume: files of the index layers in use at start, in the pool, left to fetch, failed. */
  progress(): { state: ResumeState; total: number; inPool: number; left: number; failed: number } | undefined {
    const p = this.plan;
    if (!p) return undefined;
    const left = this.state === 'running' ? p.todo.length - this.fetched - this.failed : 0;
    return { state: this.state, total: p.total, inPool: p.cached + this.fetched, left, failed: this.failed };
  }

  /** The line shown as "Resume" in the daemon status. */
  status(): string {
    const p = this.plan;
    if (!p) return 'none (no mounted container used a Gear index layer at start)';
    const inPool = p.cached + this.fetched;
    let s = `${inPool} of ${p.total} files in the pool (${this.layers} index layers in use at start)`;
    if (this.state === 'running') {
      const left = p.todo.length - this.fetched - this.failed;
      s += `, completing in the background: ${left} left (${formatSize(p.todoBytes - this.fetchedBytes)})`;
    } else {
      s += `, ${this.state} in ${((this.finished - this.started) / 1000).toFixed(1)} s`;
    }
    if (this.failed) s += `, ${this.failed} failed`;
    if (p.skipped) s += `, ${p.skipped} files (${formatSize(p.skippedBytes)}) over the pool cap not fetched`;
    return s;
  }

  /** Resolves when the run has ended (done or stopped); at once when never started. */
  get done(): Promise<void> {
    return this.running ?? Promise.resolve();
  }

  get current(): { state: ResumeState; plan: ResumePlan | undefined; fetched: number; failed: number } {
    return { state: this.state, plan: this.plan, fetched: this.fetched, failed: this.failed };
  }

  /** Stops starting fetches and waits for the resume workers to return (the fetcher's close aborts running downloads). */
  async close(): Promise<void> {
    this.controller.abort(new Error('resume stopped'));
    await this.running;
  }
}
