/**
 * Background fetch (`--background-fetch`, GEAR_BACKGROUND_FETCH=on; off by
 * default): completes each index layer's image into the pool at low
 * priority, as eStargz's background fetcher does, so that a node keeps
 * working from its cache when the registry later goes away and no later open
 * of that image waits for the network.
 *
 * - Starts once the layer's prefetch (if it lists one) has ended, and only
 *   while containers do not miss: each round waits until the fetcher has had
 *   no foreground demand for `quietMs` (default 5 s; eStargz's silence period
 *   is 2 s), the first one also until `quietMs` after the layer was recorded
 *   (the `docker run` that follows a pull misses first), then fetches up to
 *   `roundBytes` of stored bytes (4 MiB: one coalesced Range request of a
 *   pack, 0.3 s of a 100 Mbit/s link) at background priority, which leaves
 *   two fetch slots to containers' misses. One round at a time over all
 *   layers. With 2 s and 16 MiB, rounds that started while a cold start
 *   computed slowed its later misses (bench/README.md, session 14).
 * - Order: pack members pack by pack in stored order (contiguous ranges, few
 *   requests), then the files stored otherwise (chunked big files, format v1
 *   and v2 blobs), one at a time, in the index's order.
 * - Within the cache cap and never at the cost of other cached files: a
 *   round takes only files that fit under the pool's low watermark, and the
 *   run ends at the first that does not, so background fetch never makes
 *   the pool evict.
 * - Removing the layer, or closing, stops it; a file it fetches is verified
 *   like any other before it enters the pool.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { describeError } from '../errors.js';
import type { FetchRequest } from '../fetcher/fetcher.js';
import { silentLogger, type Logger } from '../log.js';
import { formatSize } from '../pool/size.js';
import { Semaphore } from '../semaphore.js';
import { fetchInBackground, fetchPacked, type BackgroundFetchDeps } from './background-fetch.js';

export const DEFAULT_QUIET_MS = 5_000;
export const DEFAULT_ROUND_BYTES = 4 * 1024 * 1024;

export interface CompletionDeps {
  pool: { has(digest: string): boolean; stat(): { bytes: number; lowWatermarkBytes: number } };
  fetcher: BackgroundFetchDeps['fetcher'] & {
    /** Milliseconds since a container last waited for the network (0 while one does). */
    demandIdleMs(): number;
  };
  catalog: { requests(digest: string): FetchRequest[] };
  logger?: Logger;
}

export interface CompletionOptions {
  /** Foreground silence a round waits for, ms. */
  quietMs?: number;
  /** Stored bytes per round (at least one file). */
  roundBytes?: number;
}

interface File {
  digest: string;
  size: number;
  /** Bytes a round counts for it: the stored length of a member, else its size. */
  stored: number;
  packed: boolean;
}

interface Run {
  layer: string;
  files: number;
  fetched: number;
  fetchedBytes: number;
  /** Files the plan counted that were in the pool when their turn came (a container's miss fetched them). */
  present: number;
  failed: number;
  /** Why it ended early: 'cache full', 'stopped'. */
  ended?: string;
  started: number;
  finished?: number;
  controller: AbortController;
  done: Promise<void>;
}

export class ImageCompletion {
  private readonly deps: CompletionDeps;
  private readonly log: Logger;
  private readonly quietMs: number;
  private readonly roundBytes: number;
  private readonly runs = new Map<string, Run>();
  private readonly rounds = new Semaphore(1);

  constructor(deps: CompletionDeps, opts: CompletionOptions = {}) {
    this.deps = deps;
    this.log = (deps.logger ?? silentLogger()).child({ component: 'background-fetch' });
    this.quietMs = Math.max(0, opts.quietMs ?? DEFAULT_QUIET_MS);
    this.roundBytes = Math.max(1, opts.roundBytes ?? DEFAULT_ROUND_BYTES);
  }

  /**
   * Completes `files` (an index layer's Gear files, in index order) for `layer`
   * once `after` (its prefetch) has settled; replaces a run of the same layer.
   * Never throws; done(layer) waits for the end.
   */
  begin(layer: string, files: ReadonlyArray<{ digest: string; size: number }>, after: Promise<unknown> = Promise.resolve()): void {
    this.stop(layer);
    const run: Run = { layer, files: 0, fetched: 0, fetchedBytes: 0, present: 0, failed: 0, started: Date.now(), controller: new AbortController(), done: Promise.resolve() };
    this.runs.set(layer, run);
    run.done = (async () => {
      try {
        await after.catch(() => undefined);
        await this.run(run, files);
      } catch (err) {
        if (!run.controller.signal.aborted) this.log.warn({ layer, err: describeError(err) }, 'background fetch failed');
      } finally {
        run.finished = Date.now();
        run.ended ??= run.controller.signal.aborted ? 'stopped' : undefined;
      }
    })();
  }

  /** The files to fetch, in fetch order: pack members by pack and offset, then the others. */
  plan(files: ReadonlyArray<{ digest: string; size: number }>): File[] {
    const { catalog, pool } = this.deps;
    const seen = new Set<string>();
    const packs = new Map<string, Array<File & { offset: number }>>();
    const others: File[] = [];
    for (const f of files) {
      if (seen.has(f.digest) || pool.has(f.digest)) continue;
      seen.add(f.digest);
      const req = catalog.requests(f.digest)[0];
      if (!req) continue; // no registry location known: nothing to fetch from
      const m = req.member;
      if (!m) {
        others.push({ digest: f.digest, size: f.size, stored: req.blob?.size ?? f.size, packed: false });
        continue;
      }
      let list = packs.get(m.pack.digest);
      if (!list) packs.set(m.pack.digest, (list = []));
      list.push({ digest: f.digest, size: f.size, stored: m.length, packed: true, offset: m.offset });
    }
    const out: File[] = [];
    for (const list of packs.values()) {
      list.sort((a, b) => a.offset - b.offset);
      for (const f of list) out.push({ digest: f.digest, size: f.size, stored: f.stored, packed: true });
    }
    for (const f of others) out.push(f);
    return out;
  }

  private async run(run: Run, files: ReadonlyArray<{ digest: string; size: number }>): Promise<void> {
    const signal = run.controller.signal;
    const todo = this.plan(files);
    run.files = todo.length;
    if (todo.length === 0) return;
    const total = todo.reduce((n, f) => n + f.stored, 0);
    this.log.info({ layer: run.layer, files: todo.length, storedBytes: total }, `background fetch: ${todo.length} files (${formatSize(total)} stored) of index layer ${run.layer} not in the cache`);
    let next = 0;
    while (next < todo.length && !signal.aborted) {
      // One round at a time over all layers (many index layers at a start).
      const release = await this.rounds.acquire(signal).catch(() => undefined);
      if (!release) break;
      try {
        await this.quiet(run.started, signal);
        if (signal.aborted) break;
        next = await this.round(run, todo, next, signal);
      } finally {
        release();
      }
      if (run.ended === 'cache full') break;
    }
    if (!signal.aborted) {
      this.log.info({ layer: run.layer, fetched: run.fetched, bytes: run.fetchedBytes, failed: run.failed, ms: Date.now() - run.started, ended: run.ended ?? 'complete' }, 'background fetch: done');
    }
  }

  /** Fetches the round that starts at todo[next]; returns where the next one starts. */
  private async round(run: Run, todo: File[], next: number, signal: AbortSignal): Promise<number> {
    const { pool } = this.deps;
    // The round: files in order up to roundBytes of stored bytes (at least one), as long as they
    // fit under the pool's low watermark.
    const p = pool.stat();
    let room = p.lowWatermarkBytes - p.bytes;
    const round: File[] = [];
    let stored = 0;
    while (next < todo.length && (round.length === 0 || stored + todo[next]!.stored <= this.roundBytes)) {
      const f = todo[next]!;
      if (pool.has(f.digest)) {
        run.present++;
        next++;
        continue;
      }
      if (f.size > room) {
        run.ended = 'cache full';
        break;
      }
      next++;
      round.push(f);
      stored += f.stored;
      room -= f.size;
    }
    if (round.length) await this.fetchRound(run, round, signal);
    if (run.ended === 'cache full') {
      this.log.info({ layer: run.layer, poolBytes: p.bytes, lowWatermarkBytes: p.lowWatermarkBytes, left: todo.length - next }, "background fetch: stopped at the cache's low watermark (it never evicts to complete an image)");
    }
    return next;
  }

  private async fetchRound(run: Run, round: File[], signal: AbortSignal): Promise<void> {
    const { pool } = this.deps;
    const packed = round.filter((f) => f.packed);
    if (packed.length) await fetchPacked(this.deps, packed.map((f) => f.digest), signal);
    for (const f of round) {
      if (signal.aborted) return;
      // Pack members the packed fetch did not bring, and the others: one at a time.
      if (!pool.has(f.digest)) {
        const r = await fetchInBackground(this.deps, f.digest, signal);
        if (signal.aborted) return;
        if (!r.inPool) {
          run.failed++;
          if (r.why) this.log.debug({ digest: f.digest, err: r.why }, 'background fetch: fetch failed');
          continue;
        }
      }
      run.fetched++;
      run.fetchedBytes += f.size;
    }
  }

  /**
   * Resolves once no container has waited for the network for quietMs, counting from `since` at
   * the earliest (a pull is often followed by a run: its misses go first), or on abort.
   */
  private async quiet(since: number, signal: AbortSignal): Promise<void> {
    for (;;) {
      const idle = Math.min(this.deps.fetcher.demandIdleMs(), Date.now() - since);
      if (idle >= this.quietMs || signal.aborted) return;
      await sleep(Math.max(50, this.quietMs - idle), undefined, { signal }).catch(() => undefined);
    }
  }

  /** Stops a layer's background fetch (removed); running downloads finish or hit their deadline. */
  stop(layer: string): void {
    const run = this.runs.get(layer);
    if (!run) return;
    run.controller.abort(new Error('background fetch stopped'));
    this.runs.delete(layer);
  }

  /** Resolves when the run of layer has ended (at once when there is none). */
  done(layer: string): Promise<void> {
    return this.runs.get(layer)?.done ?? Promise.resolve();
  }

  /**
   * Totals over this run's layers: files missing when each run planned, of those now in the pool
   * (`done`: fetched here, or by a container's miss first), fetched here (and their bytes), failed;
   * layers still running, runs stopped at the low watermark.
   */
  progress(): { layers: number; files: number; done: number; fetched: number; bytes: number; failed: number; running: number; cacheFull: number } {
    let files = 0;
    let done = 0;
    let fetched = 0;
    let bytes = 0;
    let failed = 0;
    let running = 0;
    let cacheFull = 0;
    for (const r of this.runs.values()) {
      files += r.files;
      done += r.fetched + r.present;
      fetched += r.fetched;
      bytes += r.fetchedBytes;
      failed += r.failed;
      if (r.finished === undefined) running++;
      if (r.ended === 'cache full') cacheFull++;
    }
    return { layers: this.runs.size, files, done, fetched, bytes, failed, running, cacheFull };
  }

  /** The "Background Fetch" line of the daemon status. */
  status(): string {
    const p = this.progress();
    if (p.layers === 0) return 'on (no index layer yet)';
    let s = `on: ${p.done} of ${p.files} missing files in the pool (${p.fetched} fetched in the background, ${formatSize(p.bytes)}; ${p.layers} index layers)`;
    if (p.running) s += `, ${p.running} running`;
    if (p.cacheFull) s += `, ${p.cacheFull} stopped at the cache's low watermark`;
    if (p.failed) s += `, ${p.failed} failed`;
    return s;
  }

  async close(): Promise<void> {
    const runs = [...this.runs.values()];
    for (const r of runs) r.controller.abort(new Error('background fetch stopped'));
    this.runs.clear();
    await Promise.all(runs.map((r) => r.done));
  }
}
