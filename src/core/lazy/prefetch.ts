/**
 * Prefetch: the files an index lists under `prefetch` (docs/format.md §3.3,
 * recorded from a run of the image with `gear prefetch`) are fetched into the
 * pool in the background as soon as the index layer is applied, in the
 * listed order, so that the container finds them there instead of fetching
 * them one open at a time. Format v3: the listed pack members in coalesced
 * ranges, and alongside them the files stored otherwise (chunks), one at a
 * time, both in the listed order.
 *
 * Background priority, with all but two of the fetcher's slots: a container's
 * open (foreground) is never queued behind the prefetch, and an open of a file
 * the prefetch has queued joins that fetch (one fetch per digest). Only what
 * fits under the pool's low watermark is prefetched, never more than the
 * cache could keep. Removing the layer stops its prefetch.
 */
import { describeError } from '../errors.js';
import type { FetchRequest } from '../fetcher/fetcher.js';
import { silentLogger, type Logger } from '../log.js';
import { formatSize } from '../pool/size.js';
import { fetchInBackground, fetchPacked, type BackgroundFetchDeps } from './background-fetch.js';

/**
 * Files stored otherwise (big files in chunks) fetched at a time while the pack members of a v3
 * index come: one, in listed order. With two, nodejs's 31 MB file shared the link with its 47 MB
 * binary (gear-opt at 100 Mbit/s: 4.83 s, against 3.67-4.35 s with one).
 */
const ALONGSIDE_PACKS = 1;

export interface PrefetchDeps {
  pool: { has(digest: string): boolean; stat(): { lowWatermarkBytes: number } };
  fetcher: BackgroundFetchDeps['fetcher'] & { readonly maxParallel: number };
  catalog: { requests(digest: string): FetchRequest[] };
  logger?: Logger;
}

interface Run {
  layer: string;
  todo: Array<{ digest: string; size: number; done?: boolean }>;
  fetched: number;
  fetchedBytes: number;
  failed: number;
  cached: number;
  skipped: number;
  started: number;
  finished?: number;
  controller: AbortController;
  done: Promise<void>;
}

export class Prefetcher {
  private readonly deps: PrefetchDeps;
  private readonly log: Logger;
  private readonly runs = new Map<string, Run>();

  constructor(deps: PrefetchDeps) {
    this.deps = deps;
    this.log = (deps.logger ?? silentLogger()).child({ component: 'prefetch' });
  }

  /** Fetches at a time per layer: all but two of the fetcher's slots (at least one). */
  get window(): number {
    return Math.max(1, this.deps.fetcher.maxParallel - 2);
  }

  /**
   * Starts prefetching `files` (in order, duplicates ignored) for `layer`;
   * replaces a run of the same layer. Returns the run's end (never rejects).
   */
  start(layer: string, files: ReadonlyArray<{ digest: string; size: number }>): Promise<void> {
    this.stop(layer);
    const { pool } = this.deps;
    const seen = new Set<string>();
    const todo: Run['todo'] = [];
    let cached = 0;
    let skipped = 0;
    let room = pool.stat().lowWatermarkBytes;
    for (const f of files) {
      if (seen.has(f.digest)) continue;
      seen.add(f.digest);
      if (pool.has(f.digest)) {
        cached++;
        continue;
      }
      if (f.size > room) {
        skipped++;
        continue;
      }
      room -= f.size;
      todo.push(f);
    }
    const run: Run = { layer, todo, fetched: 0, fetchedBytes: 0, failed: 0, cached, skipped, started: Date.now(), controller: new AbortController(), done: Promise.resolve() };
    this.runs.set(layer, run);
    const bytes = todo.reduce((n, f) => n + f.size, 0);
    this.log.info({ layer, files: todo.length, bytes, cached, skipped, window: this.window }, `prefetch: fetching ${todo.length} files (${formatSize(bytes)}) listed by index layer ${layer}`);
    run.done = this.run(run);
    return run.done;
  }

  /**
   * start() as background work (a pull's), planned on the next turn of the
   * event loop: the ApplyDiff that calls it answers first (planning hundreds
   * of fetches takes tens of ms of the main thread). done(layer) waits for it
   * at once; stop(layer) before then cancels it. A failure is logged, never
   * thrown nor a rejection nobody handles.
   */
  begin(layer: string, files: ReadonlyArray<{ digest: string; size: number }>): void {
    const failed = (err: unknown) => this.log.warn({ layer, err: describeError(err) }, 'prefetch failed');
    this.stop(layer);
    const planned: Run = { layer, todo: [], fetched: 0, fetchedBytes: 0, failed: 0, cached: 0, skipped: 0, started: Date.now(), controller: new AbortController(), done: Promise.resolve() };
    planned.done = new Promise<void>((resolve) => {
      setImmediate(() => {
        if (planned.controller.signal.aborted || this.runs.get(layer) !== planned) return resolve();
        try {
          this.start(layer, files).then(resolve, (err: unknown) => {
            failed(err);
            resolve();
          });
        } catch (err) {
          failed(err);
          resolve();
        }
      });
    });
    this.runs.set(layer, planned);
  }

  private async run(run: Run): Promise<void> {
    const signal = run.controller.signal;
    const { catalog } = this.deps;
    const members = new Set(run.todo.filter((f) => catalog.requests(f.digest)[0]?.member).map((f) => f.digest));
    const others = run.todo.filter((f) => !members.has(f.digest));
    // Format v3: the listed pack members (coalesced) and, alongside them in listed order, the files
    // stored otherwise (big files in chunks). Those once waited for every member: python3's first
    // open, its 6.8 MB binary, then missed and was fetched on demand (bench profile, 2026-12-07).
    await Promise.all([this.runPacked(run, signal), this.fetchEach(run, others, members.size > 0 ? ALONGSIDE_PACKS : this.window, signal)]);
    // What the packed fetch did not bring (a failed range), file by file.
    await this.fetchEach(
      run,
      run.todo.filter((f) => !f.done && members.has(f.digest)),
      this.window,
      signal,
    );
    run.finished = Date.now();
    this.log.info({ layer: run.layer, fetched: run.fetched, bytes: run.fetchedBytes, failed: run.failed, ms: run.finished - run.started, stopped: signal.aborted }, 'prefetch: done');
  }

  /** Fetches files one by one, `window` at a time, in their order. */
  private async fetchEach(run: Run, files: Run['todo'], window: number, signal: AbortSignal): Promise<void> {
    let next = 0;
    const worker = async () => {
      while (!signal.aborted && next < files.length) {
        const f = files[next++]!;
        if (f.done) continue;
        if (await this.fetchOne(f.digest, signal)) {
          f.done = true;
          run.fetched++;
          run.fetchedBytes += f.size;
        } else if (!signal.aborted) run.failed++;
      }
    };
    await Promise.all(Array.from({ length: Math.min(window, files.length) }, worker));
  }

  /** Format v3: the listed pack members, queued together (background-fetch.ts fetchPacked). */
  private async runPacked(run: Run, signal: AbortSignal): Promise<void> {
    const done = await fetchPacked(this.deps, run.todo.map((f) => f.digest), signal);
    for (const f of run.todo) {
      if (f.done || !done.has(f.digest)) continue;
      f.done = true;
      run.fetched++;
      run.fetchedBytes += f.size;
    }
  }

  /** True when the file is in the pool afterwards. */
  private async fetchOne(digest: string, signal: AbortSignal): Promise<boolean> {
    const r = await fetchInBackground(this.deps, digest, signal);
    if (r.why) this.log.debug({ digest, err: r.why }, 'prefetch: fetch failed');
    return r.inPool;
  }

  /** Stops the prefetch of a layer (removed); running downloads finish or hit their deadline. */
  stop(layer: string): void {
    const run = this.runs.get(layer);
    if (!run) return;
    run.controller.abort(new Error('prefetch stopped'));
    this.runs.delete(layer);
  }

  /** Totals over this run's prefetches: files listed (and fitting the cap), in the pool, failed; layers still prefetching. */
  progress(): { layers: number; files: number; done: number; failed: number; running: number } {
    let files = 0;
    let done = 0;
    let failed = 0;
    let running = 0;
    for (const r of this.runs.values()) {
      files += r.todo.length + r.cached;
      done += r.fetched + r.cached;
      failed += r.failed;
      if (r.finished === undefined) running++;
    }
    return { layers: this.runs.size, files, done, failed, running };
  }

  /** One layer's prefetch in this run (gear stats), or undefined when it listed nothing. */
  layerProgress(layer: string): { listed: number; cached: number; fetched: number; fetchedBytes: number; failed: number; skipped: number; running: boolean } | undefined {
    const r = this.runs.get(layer);
    if (!r) return undefined;
    return { listed: r.todo.length + r.cached + r.skipped, cached: r.cached, fetched: r.fetched, fetchedBytes: r.fetchedBytes, failed: r.failed, skipped: r.skipped, running: r.finished === undefined };
  }

  /** The line shown as "Prefetch" in the daemon status. */
  status(): string {
    if (this.runs.size === 0) return 'none (no index layer applied in this run lists files to prefetch)';
    const { files, done, failed, running } = this.progress();
    let s = `${done} of ${files} listed files in the pool (${this.runs.size} index layers)`;
    if (running) s += `, ${running} prefetching`;
    if (failed) s += `, ${failed} failed`;
    return s;
  }

  /** Resolves when the run of layer has ended (at once when there is none). */
  done(layer: string): Promise<void> {
    return this.runs.get(layer)?.done ?? Promise.resolve();
  }

  async close(): Promise<void> {
    const runs = [...this.runs.values()];
    for (const r of runs) r.controller.abort(new Error('prefetch stopped'));
    this.runs.clear();
    await Promise.all(runs.map((r) => r.done));
  }
}
