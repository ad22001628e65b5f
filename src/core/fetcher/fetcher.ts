/**
 * The fetcher: registry → pool, for the lazy path (DESIGN.md "How a container
 * sees its files").
 *
 *   const f = new Fetcher({ pool, client, timeoutMs: 60_000, maxParallel: 8 });
 *   await f.fetch({ digest, size, blob, location }, { priority: 'foreground', signal });
 *   // the content is now in pool/sha256/ab/<hex>, verified
 *
 * - One download per digest, however many callers wait for it (in-flight
 *   dedup). A caller that gives up (signal, deadline) does not cancel the
 *   download for the others; the download is aborted only when nobody waits
 *   any more (and it was not asked for in the background).
 * - At most `maxParallel` downloads at a time; foreground requests (a
 *   container blocked in an open) are started before background ones, and a
 *   foreground caller joining a queued background job promotes it.
 * - Every caller's wait is bounded by `timeoutMs` (GEAR_FETCH_TIMEOUT): then
 *   it gets DeadlineExceeded (the miss filesystem turns that into EIO), never
 *   a hang. A running download is bounded by the same deadline.
 * - Content is verified before use: bytes go through a pool writer whose
 *   commit checks sha256 and size; a mismatch never enters the pool. Gear files
 *   stored gzip-compressed (docs/format.md: blob.mediaType
 *   application/vnd.gear.file.v1+gzip) are decompressed on the way, capped at
 *   the declared content size (no gzip bomb), and verified as content.
 * - Retries: the registry client retries requests (408/429/5xx, connection
 *   errors) with backoff; a body that breaks mid-way is fetched again while
 *   the deadline allows; a raw blob resumes with a Range request from the
 *   bytes already written (the hash continues), a gzip blob starts over. A
 *   digest mismatch is not retried (the next open asks again).
 *
 * Streaming (big files, docs/format.md §4 "Big files"):
 *
 *   const f = fetcher.stream(req);          // starts or joins THE download of req.digest
 *   const n = await f.read(buf, position);  // as soon as those bytes have arrived
 *   await f.close();
 *
 * - The same single download as fetch() (dedup, slots, priorities, retries),
 *   written to its pool staging file; a read is served from the staging file
 *   as soon as the bytes it needs are there. A read further than
 *   `rangeAheadBytes` ahead of the download of a raw blob is served by an HTTP
 *   Range request of the `rangeChunkBytes`-aligned chunk around it (a few
 *   chunks per file are kept in memory); a gzip blob cannot be range-read, so
 *   such a read waits for the download.
 * - Bytes served before the download completes are NOT verified (the format
 *   has one digest per file); the file enters the pool only once the whole
 *   content matches its digest. On a mismatch every read of the file fails
 *   (EIO) and nothing enters the pool; the next open downloads again. The
 *   last byte of the file is served from the download only after the whole
 *   file verified, so a reader that reads the file up to its end in order
 *   (cp, sha256sum, a loader) gets EIO rather than a complete corrupt copy.
 *   A Range read far ahead stops short of the last byte too: with
 *   GEAR_FUSE_OPEN=none the kernel's readahead runs far ahead of a reader,
 *   and `sha256sum` once got a whole corrupt copy that way.
 * - Every read waits at most `timeoutMs` for all the bytes it asked for, then
 *   fails DeadlineExceeded (EIO); it never returns a trickle of bytes (the
 *   miss filesystem would ask again, restarting the deadline). A read after a
 *   failed download (or whose download fails while it waits) starts a fresh
 *   one, unless the content was rejected by its digest.
 *   Once any reader opened a streamed file, its download keeps going in the
 *   background after the readers are gone (a queued one is demoted to
 *   background priority), into the pool (the next open, often
 *   right after, is then served from the pool). It is bounded by a stall
 *   deadline instead of a total one (body.ts StallWatch): abandoned when less
 *   than 64 KiB arrived in `timeoutMs` (a multi-GB file may take longer than
 *   the deadline in total; a registry trickling bytes cannot hold it).
 * - The staging file counts in the pool as a write in progress (its size is
 *   reserved against the cap when the download starts).
 *
 * Format v3 (docs/lazy.md): queued members of one pack share one coalesced Range
 * request (pack-fetch.ts, coalesce.ts); chunked files are chunked.ts's.
 */
import type { FileHandle } from 'node:fs/promises';
import fs from 'node:fs/promises';
import { deadlineExceeded, describeError, errnoCode, failedPrecondition, GearError, internal, invalidArgument, isClass, unavailable } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import type { Pool, PoolWriter } from '../pool/pool.js';
import { checkDigest, DigestMismatchError } from '../registry/digest.js';
import type { RegistryClient } from '../registry/client.js';
import { sleep } from '../registry/retry.js';
import { copyBody, STALL_MIN_BYTES, StallWatch } from './body.js';
import { parseDuration } from '../duration.js';
import { DEFAULT_MAX_GAP, DEFAULT_MAX_REQUEST, type CoalesceBounds } from './coalesce.js';
import { CommitSlots } from './commit-slots.js';
import { runPackBatch, takePackBatch, type PackFetchDeps, type PackJob } from './pack-fetch.js';
import type { FetchRequest } from './pack-types.js';
import { ChunkedFiles } from './chunked.js';
import { RangeReads } from './range-read.js';
import type { MissFile } from '../missfs/types.js';

/** Re-exported: the settings' duration parser (GEAR_FETCH_TIMEOUT) lives in core/duration.ts. */
export { parseDuration };

/** Default deadline of one fetch as seen by a waiting reader. */
export const DEFAULT_FETCH_TIMEOUT_MS = 60_000;
/** Default number of downloads in flight. */
export const DEFAULT_MAX_FETCHES = 8;
/** Default size of the chunks a streamed file's far-ahead reads fetch by HTTP Range. */
export const DEFAULT_RANGE_CHUNK_BYTES = 1024 * 1024;
/** Default distance ahead of the download beyond which a read is served by a Range request. */
export const DEFAULT_RANGE_AHEAD_BYTES = 4 * 1024 * 1024;

/** What to fetch: a Gear file of an index manifest. */
export type { FetchRequest } from './pack-types.js';

export type FetchPriority = 'foreground' | 'background';

export interface FetchOptions {
  priority?: FetchPriority;
  /** Aborts this caller's wait (not the download, unless it was the last waiter). */
  signal?: AbortSignal;
  /** This caller's deadline; default the fetcher's timeoutMs. */
  timeoutMs?: number;
  /** Fetched along in the background (read-ahead: pack neighbours), queued with req so one request may serve them all. */
  along?: readonly FetchRequest[];
}

export interface FetcherOptions {
  pool: Pool;
  client: RegistryClient;
  logger?: Logger;
  /** Deadline of a fetch (ms). Default: GEAR_FETCH_TIMEOUT (seconds or "30s"/"500ms"), else 60 s. */
  timeoutMs?: number;
  /** Downloads in flight at most. Default 8. */
  maxParallel?: number;
  /** Attempts per download when the body breaks (request-level retries are the client's). Default 3. */
  maxAttempts?: number;
  /** Streaming: size of a Range chunk for far-ahead reads. Default 1 MiB. */
  rangeChunkBytes?: number;
  /** Streaming: a read this far ahead of the download is served by a Range request. Default 4 MiB. */
  rangeAheadBytes?: number;
  /** Told of every download's end: its outcome, seconds from start, bytes received (metrics). */
  onFetchDone?: FetchObserver;
  /** Format v3: how wanted members of one pack are merged into Range requests (coalesce.ts). */
  coalesce?: Partial<CoalesceBounds>;
}

/** How a download ended, as metrics label it. */
export type FetchOutcome = 'ok' | 'verify_failed' | 'deadline' | 'http_error' | 'error';
export type FetchObserver = (outcome: FetchOutcome, seconds: number, bytes: number, digest?: string) => void;

/** The outcome label of a failed download. */
export function fetchOutcomeOf(err: unknown, verifyFailed: boolean): FetchOutcome {
  if (verifyFailed) return 'verify_failed';
  if (isClass(err, 'DeadlineExceeded')) return 'deadline';
  // The registry client's words for an HTTP error status (client.ts, transport.ts), or a refusal of access.
  if (isClass(err, 'PermissionDenied') || isClass(err, 'NotFound') || (err instanceof GearError && /\banswered [1-5]\d\d\b/.test(err.message))) return 'http_error';
  return 'error';
}

/** A reader of a file being downloaded (Fetcher.stream); a MissFile. */
export interface StreamedFile {
  /** Positioned read; resolves once the bytes are there (0 at end of file). */
  read(buf: Buffer, position: number, signal?: AbortSignal): Promise<number>;
  close(): Promise<void>;
  /** Bytes served may be unverified: the kernel must not keep them cached across opens. */
  readonly keepCache: false;
}

/** Where a download stands (for status and tests). */
export interface FetchProgress {
  state: 'queued' | 'running';
  /** Content bytes written to the staging file so far (unverified until the download completes). */
  written: number;
  size: number;
  streaming: boolean;
  /** Open streamed readers. */
  readers: number;
}

/** Counters for status and the demo (monotonic except the gauges). */
export interface FetcherStats {
  /** Files fetched and verified into the pool. */
  files: number;
  /** Content bytes that entered the pool through the fetcher. */
  bytes: number;
  /** Bytes received from registries (compressed size for gzip blobs). */
  blobBytes: number;
  /** Downloads that failed (any reason, counted once per download). */
  failures: number;
  /** Downloads rejected because the content did not match its digest. */
  verifyFailures: number;
  /** Callers whose wait hit the deadline. */
  timeouts: number;
  /** Callers that joined a download already in flight or queued. */
  joined: number;
  /** Requests answered from the pool without a download. */
  cached: number;
  /** Streamed readers opened (Fetcher.stream). */
  streams: number;
  /** Reads of streamed files served by HTTP Range requests, and their bytes (unverified). */
  rangeRequests: number;
  rangeBytes: number;
  /** Format v3: Range requests of packs, and the members they committed. */
  packRequests: number;
  packMembers: number;
  /** Gauges. */
  running: number;
  queued: number;
}


interface Job {
  req: FetchRequest;
  priority: FetchPriority;
  /** Callers waiting for the result. */
  waiters: number;
  /** Asked for in the background: keep going without waiters. */
  keep: boolean;
  state: 'queued' | 'running' | 'done';
  controller: AbortController;
  promise: Promise<void>;
  resolve: () => void;
  reject: (e: unknown) => void;
  releasePin?: () => void;
  /** Streamed readers used it: download in the background to the end, with a stall deadline. */
  streaming: boolean;
  /** The pool write of the current attempt (kept across a resumed raw download). */
  writer?: PoolWriter | undefined;
  /** The staging file of the current attempt and how much content it holds. */
  stage?: Stage | undefined;
  /** The stall watch of the running download (streamed jobs). */
  watch?: StallWatch | undefined;
  /** The content was rejected (digest mismatch): reads fail until the next open. */
  rejected: boolean;
  /** The registry mirror the current attempt's body came from (registry/mirrors.ts), if any. */
  mirror?: { host: string; reject(): void } | undefined;
  /** Wake-ups of readers waiting for bytes or the end. */
  listeners: Set<() => void>;
  /** Open streamed readers; read descriptors are closed when none is left and the job is done. */
  readers: number;
  readFds: Promise<FileHandle>[];
  /** Range-fetched chunks of a raw blob, by chunk index. */
  ranges: Map<number, Promise<Buffer>>;
  error?: unknown;
}

interface Stage {
  path: string;
  written: number;
  fh?: Promise<FileHandle>;
}

export class Fetcher {
  readonly timeoutMs: number;
  readonly maxParallel: number;
  private readonly pool: Pool;
  private readonly onFetchDone: FetchObserver | undefined;
  private readonly client: RegistryClient;
  private readonly log: Logger;
  private readonly maxAttempts: number;
  private readonly rangeChunkBytes: number;
  private readonly rangeAheadBytes: number;
  private readonly rangeReads: RangeReads;
  private readonly packDeps: Omit<PackFetchDeps, 'onCommitted'>;
  private readonly jobs = new Map<string, Job>();
  private readonly fg: Job[] = [];
  private readonly bg: Job[] = [];
  private running = 0;
  private closed = false;
  /** fetchMany() is queueing: start nothing yet. */
  private holding = false;
  /** When a container last asked for bytes from the network (demandIdleMs). */
  private lastDemand = 0;
  private readonly counters = {
    files: 0,
    bytes: 0,
    blobBytes: 0,
    failures: 0,
    verifyFailures: 0,
    timeouts: 0,
    joined: 0,
    cached: 0,
    streams: 0,
    rangeRequests: 0,
    rangeBytes: 0,
    packRequests: 0,
    packMembers: 0,
  };
  readonly coalesce: CoalesceBounds;
  private readonly chunked: ChunkedFiles;
  private readonly commitSlots = new CommitSlots();

  constructor(opts: FetcherOptions) {
    this.pool = opts.pool;
    this.client = opts.client;
    this.onFetchDone = opts.onFetchDone;
    this.log = (opts.logger ?? silentLogger()).child({ component: 'fetcher' });
    const envTimeout = process.env.GEAR_FETCH_TIMEOUT;
    this.timeoutMs = opts.timeoutMs ?? (envTimeout ? parseDuration(envTimeout, 'GEAR_FETCH_TIMEOUT') : DEFAULT_FETCH_TIMEOUT_MS);
    if (!(this.timeoutMs > 0)) throw invalidArgument(`fetch timeout ${this.timeoutMs}: must be more than 0`);
    this.maxParallel = opts.maxParallel ?? DEFAULT_MAX_FETCHES;
    if (!(Number.isSafeInteger(this.maxParallel) && this.maxParallel > 0)) {
      throw invalidArgument(`max parallel fetches ${this.maxParallel}: must be a positive integer`);
    }
    this.maxAttempts = Math.max(1, opts.maxAttempts ?? 3);
    this.rangeChunkBytes = opts.rangeChunkBytes ?? DEFAULT_RANGE_CHUNK_BYTES;
    this.rangeAheadBytes = opts.rangeAheadBytes ?? DEFAULT_RANGE_AHEAD_BYTES;
    if (!(Number.isSafeInteger(this.rangeChunkBytes) && this.rangeChunkBytes > 0 && Number.isSafeInteger(this.rangeAheadBytes) && this.rangeAheadBytes >= 0)) {
      throw invalidArgument(`range chunk ${this.rangeChunkBytes} / ahead ${this.rangeAheadBytes} bytes: must be non-negative integers (chunk > 0)`);
    }
    this.coalesce = { maxGap: opts.coalesce?.maxGap ?? DEFAULT_MAX_GAP, maxRequest: opts.coalesce?.maxRequest ?? DEFAULT_MAX_REQUEST };
    const common = { client: this.client, timeoutMs: this.timeoutMs, log: this.log, counters: this.counters };
    this.packDeps = { ...common, pool: this.pool, maxAttempts: this.maxAttempts, slots: this.commitSlots };
    this.rangeReads = new RangeReads({ ...common, maxParallel: this.maxParallel, chunkBytes: this.rangeChunkBytes });
    this.chunked = new ChunkedFiles({ ...common, bounds: this.coalesce, onReaderWaits: () => (this.lastDemand = Date.now()) });
  }

  /**
   * Format v3, a chunked file (req.chunks): a reader served chunk by chunk, each verified (chunked.ts);
   * starts (or joins) the background job that puts the whole file into the pool.
   */
  openChunked(req: FetchRequest): MissFile {
    if (!req.chunks) throw invalidArgument(`${req.digest}: not a chunked file`);
    if (this.closed) throw unavailable('fetcher is closed');
    this.counters.streams++;
    this.fetch(req, { priority: 'background' }).catch((err: unknown) => this.log.debug({ digest: req.digest, err: describeError(err) }, 'chunked file not completed into the pool'));
    return this.chunked.open(req, () => this.pool.open(req.digest, { count: false }));
  }

  /**
   * Milliseconds since a container last waited for the network (a foreground
   * download queued or promoted, a read of a chunked file not in the pool yet);
   * 0 while foreground downloads are queued or running (a streamed file's
   * download is one while it has readers). Background fetch
   * (lazy/completion.ts) runs only after a quiet spell.
   */
  demandIdleMs(): number {
    if (this.fg.length > 0) return 0;
    for (const j of this.jobs.values()) if (j.priority === 'foreground' && j.state === 'running') return 0;
    return Math.max(0, Date.now() - this.lastDemand);
  }

  stats(): FetcherStats {
    return { ...this.counters, running: this.running, queued: this.fg.length + this.bg.length };
  }

  /** True while a download of digest is queued or running. */
  inFlight(digest: string): boolean {
    return this.jobs.has(digest);
  }

  /** The download of digest in progress, if any. */
  progress(digest: string): FetchProgress | undefined {
    const job = this.jobs.get(digest);
    if (!job || job.state === 'done') return undefined;
    return { state: job.state, written: job.stage?.written ?? 0, size: job.req.size, streaming: job.streaming, readers: job.readers };
  }

  /**
   * Makes the content of req.digest present in the pool. Resolves at once when
   * it already is. Rejects DeadlineExceeded after the deadline, the signal's
   * reason when aborted, Unavailable/NotFound/PermissionDenied for registry
   * failures and InvalidArgument when the content does not match.
   */
  async fetch(req: FetchRequest, opts: FetchOptions = {}): Promise<void> {
    checkDigest(req.digest);
    if (!(Number.isSafeInteger(req.size) && req.size >= 0)) throw invalidArgument(`fetch ${req.digest}: bad size ${req.size}`);
    if (this.closed) throw unavailable('fetcher is closed');
    const priority = opts.priority ?? 'foreground';
    if (this.pool.has(req.digest) && !this.jobs.has(req.digest)) {
      this.counters.cached++;
      return;
    }
    let job = this.jobs.get(req.digest);
    if (job) {
      this.counters.joined++;
      if (priority === 'foreground' && job.priority === 'background') this.promote(job);
    } else {
      job = this.enqueue(req, priority, !opts.along?.length);
    }
    if (opts.along?.length) {
      // Queued before anything starts, so that one request of their pack serves them all.
      for (const r of opts.along) if (!this.jobs.has(r.digest) && !this.pool.has(r.digest)) this.enqueue(r, 'background', false).keep = true;
      this.pump();
    }
    if (priority === 'background') {
      job.keep = true;
      return this.wait(job, opts, false);
    }
    return this.wait(job, opts, true);
  }

  /**
   * fetch() of many requests, all queued before any starts: members of one pack are then served by
   * few coalesced requests (the prefetch of a v3 index). One promise per request.
   */
  fetchMany(reqs: readonly FetchRequest[], opts: FetchOptions = {}): Promise<void>[] {
    this.holding = true;
    try {
      return reqs.map((r) => this.fetch(r, opts));
    } finally {
      this.holding = false;
      this.pump();
    }
  }

  private enqueue(req: FetchRequest, priority: FetchPriority, pump = true): Job {
    let resolve!: () => void;
    let reject!: (e: unknown) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise.catch(() => undefined); // waiters get it; never unhandled
    const job: Job = {
      req,
      priority,
      waiters: 0,
      keep: false,
      state: 'queued',
      controller: new AbortController(),
      promise,
      resolve,
      reject,
      streaming: req.chunks !== undefined,
      rejected: false,
      listeners: new Set(),
      readers: 0,
      readFds: [],
      ranges: new Map(),
    };
    // Protect the file from eviction between its commit and the reader's open.
    job.releasePin = this.pool.pin(req.digest);
    this.jobs.set(req.digest, job);
    (priority === 'foreground' ? this.fg : this.bg).push(job);
    if (priority === 'foreground') this.lastDemand = Date.now();
    if (pump && !this.holding) this.pump();
    return job;
  }

  private promote(job: Job): void {
    job.priority = 'foreground';
    this.lastDemand = Date.now();
    const i = this.bg.indexOf(job);
    if (i >= 0) {
      this.bg.splice(i, 1);
      this.fg.push(job);
    }
  }

  private demote(job: Job): void {
    job.priority = 'background';
    const i = this.fg.indexOf(job);
    if (i >= 0) {
      this.fg.splice(i, 1);
      this.bg.push(job);
    }
  }

  /** A caller's bounded wait on a job. */
  private wait(job: Job, opts: FetchOptions, counts: boolean): Promise<void> {
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    if (counts) job.waiters++;
    return new Promise<void>((resolve, reject) => {
      let done = false;
      const finish = (err?: unknown) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        if (counts) {
          job.waiters--;
          if (job.waiters <= 0 && !job.keep && job.state !== 'done' && err !== undefined) {
            // Nobody wants it any more: free the slot.
            this.abandon(job, err);
          }
        }
        if (err === undefined) resolve();
        else reject(err);
      };
      const onAbort = () => finish(opts.signal!.reason ?? unavailable(`fetch ${job.req.digest}: aborted`));
      const timer = setTimeout(() => {
        this.counters.timeouts++;
        finish(deadlineExceeded(`fetch ${job.req.digest}: not done within ${timeoutMs} ms`));
      }, timeoutMs);
      timer.unref();
      if (opts.signal?.aborted) return onAbort();
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      job.promise.then(
        () => finish(),
        (e) => finish(e),
      );
    });
  }

  private abandon(job: Job, reason: unknown): void {
    if (job.state === 'queued') {
      for (const q of [this.fg, this.bg]) {
        const i = q.indexOf(job);
        if (i >= 0) q.splice(i, 1);
      }
      this.settle(job, reason);
      return;
    }
    job.controller.abort(reason);
  }

  private settle(job: Job, err?: unknown): void {
    if (job.state === 'done') return;
    job.state = 'done';
    if (err !== undefined) job.error = err;
    if (this.jobs.get(job.req.digest) === job) this.jobs.delete(job.req.digest);
    job.releasePin?.();
    job.ranges.clear();
    if (err === undefined) job.resolve();
    else job.reject(err);
    this.notify(job);
    this.closeReadFds(job);
  }

  private notify(job: Job): void {
    for (const l of [...job.listeners]) l();
  }

  private pump(): void {
    while (!this.closed && this.running < this.maxParallel) {
      // Background pack requests leave two slots to containers' misses (the prefetch queues many at once).
      const bgPack = this.bg[0]?.req.member !== undefined && this.running >= Math.max(1, this.maxParallel - 2);
      const job = this.fg.shift() ?? (bgPack ? undefined : this.bg.shift());
      if (!job) return;
      this.running++;
      job.state = 'running';
      const work = job.req.member ? this.runPack(takePackBatch(job, [this.fg, this.bg], this.coalesce)) : this.run(job);
      void work.finally(() => {
        this.running--;
        this.pump();
      });
    }
  }

  /** One coalesced Range request for queued members of one pack (pack-fetch.ts). */
  private async runPack(batch: Job[]): Promise<void> {
    const started = Date.now();
    const deps = { ...this.packDeps, onCommitted: (pj: PackJob) => this.observe('ok', started, pj.size, pj.digest) };
    await runPackBatch(deps, batch, (job, err, rejected) => {
      if (err !== undefined) {
        this.counters.failures++;
        if (rejected) this.counters.verifyFailures++;
        job.rejected ||= rejected === true;
        this.observe(fetchOutcomeOf(err, rejected === true), started, 0, job.req.digest);
      }
      this.settle(job, err);
    });
    const m = batch[0]!.req.member!;
    this.log.debug({ pack: m.pack.digest, members: batch.length, priority: batch.some((j) => j.priority === 'foreground') ? 'foreground' : 'background', ms: Date.now() - started }, 'pack range done');
  }

  private observe(outcome: FetchOutcome, started: number, bytes: number, digest: string): void {
    try {
      this.onFetchDone?.(outcome, (Date.now() - started) / 1000, bytes, digest);
    } catch (err) {
      this.log.debug({ err: describeError(err) }, 'fetch observer failed');
    }
  }

  private async run(job: Job): Promise<void> {
    const { req } = job;
    const started = Date.now();
    // A download is bounded by the deadline in total, except a streamed (big) file's, which may take
    // longer: that one is abandoned when it stalls (less than 64 KiB per deadline, see body.ts).
    const deadline = setTimeout(() => {
      if (!job.streaming) job.controller.abort(deadlineExceeded(`fetch ${req.digest}: download not done within ${this.timeoutMs} ms`));
    }, this.timeoutMs);
    deadline.unref();
    job.watch = new StallWatch({
      windowMs: this.timeoutMs,
      minBytes: STALL_MIN_BYTES,
      remaining: () => req.size - (job.stage?.written ?? 0),
      onStall: (idleMs) =>
        job.controller.abort(
          deadlineExceeded(
            `fetch ${req.digest}: ${req.location.registry}/${req.location.repository} sent less than ${STALL_MIN_BYTES} bytes in ${idleMs} ms (at ${job.stage?.written ?? 0} of ${req.size} bytes): abandoned as stalled, the next read starts a fresh request; check the registry's reachability or raise GEAR_FETCH_TIMEOUT`,
          ),
        ),
    });
    const signal = job.controller.signal;
    try {
      for (let attempt = 1; ; attempt++) {
        if (!job.writer && this.pool.has(req.digest)) break; // someone else (another writer) put it there
        try {
          await this.download(job, signal);
          this.counters.files++;
          this.counters.bytes += req.size;
          this.observe('ok', started, req.size, req.digest);
          this.log.debug({ digest: req.digest, size: req.size, ms: Date.now() - started }, 'fetched');
          break;
        } catch (err) {
          if (signal.aborted) throw signal.reason;
          const mismatch = isClass(err, 'InvalidArgument') && /does not match|more than the expected/.test(String((err as Error).message));
          const mirror = job.mirror;
          if ((mismatch || err instanceof DigestMismatchError) && mirror && attempt < this.maxAttempts) {
            // A registry mirror served wrong bytes: put it behind the registry and fetch again (from the next host).
            this.counters.verifyFailures++;
            mirror.reject();
            this.log.warn({ digest: req.digest, mirror: mirror.host, err: describeError(err) }, 'registry mirror served wrong content; fetching from the next host');
            continue;
          }
          if (mismatch) {
            this.counters.verifyFailures++;
            job.rejected = true;
            throw unavailable(`fetch ${req.digest} from ${req.location.registry}/${req.location.repository}: content rejected: ${(err as Error).message}`, err);
          }
          const retryable = !(err instanceof GearError) || isClass(err, 'Unavailable') || isClass(err, 'DeadlineExceeded');
          if (!retryable || attempt >= this.maxAttempts) throw err;
          this.log.info({ digest: req.digest, attempt, err: describeError(err) }, 'fetch failed; retrying');
          await sleep(Math.min(2000, 100 * 2 ** attempt), signal);
        }
      }
      this.settle(job);
    } catch (err) {
      await job.writer?.abort();
      job.writer = undefined;
      this.counters.failures++;
      let e = signal.aborted ? signal.reason : err;
      // Whatever broke (a socket error of undici, a file system error), the waiters get a GearError naming it.
      if (!(e instanceof GearError)) {
        e = unavailable(`fetch ${req.digest} from ${req.location.registry}/${req.location.repository}: ${describeError(e)}; the next open tries again`, e);
      }
      this.observe(fetchOutcomeOf(e, job.rejected === true), started, 0, req.digest);
      this.log.warn({ digest: req.digest, err: describeError(e) }, 'fetch failed');
      this.settle(job, e);
    } finally {
      clearTimeout(deadline);
      job.watch.stop();
    }
  }

  /**
   * One attempt: GET the blob, (gunzip), write through a verifying pool
   * writer. A raw blob whose body broke keeps its writer (job.writer) and the
   * next attempt asks for the rest with a Range request.
   */
  private async download(job: Job, signal: AbortSignal): Promise<void> {
    const { req } = job;
    if (req.chunks) return this.chunked.assembleJob(job, this.pool, signal); // format v3: chunk by chunk, each verified
    const repo = `${req.location.registry}/${req.location.repository}`;
    const blobDigest = req.blob ? req.blob.digest : req.digest;
    const blobSize = req.blob ? req.blob.size : req.size;
    const raw = !req.blob;
    let w = job.writer;
    if (w && (!raw || !w.isOpen)) {
      await w.abort();
      w = job.writer = undefined;
    }
    const offset = w ? w.size : 0;
    job.mirror = undefined;
    const { stream, mirror } = await this.client.openBlob(repo, blobDigest, {
      signal,
      expectedSize: blobSize,
      ...(offset > 0 ? { range: { start: offset } } : {}),
    });
    job.mirror = mirror;
    if (!w) {
      try {
        w = await this.pool.beginWrite(req.digest, req.size);
      } catch (err) {
        stream.destroy();
        throw err;
      }
      job.writer = w;
      // Readers of an earlier attempt's staging file (gzip restart) wait for this one to catch up.
      const stage: Stage = { path: w.stagingPath, written: 0 };
      if (job.streaming) stage.fh = this.openReadFd(job, stage.path);
      job.stage = stage;
    }
    const writer = w;
    const stage = job.stage!;
    let received = 0;
    stream.on('data', (c: Buffer) => {
      received += c.length;
    });
    try {
      await copyBody(stream, {
        gunzip: !raw,
        maxBytes: req.size - offset,
        signal,
        what: `fetch ${req.digest}`,
        write: async (chunk) => {
          await writer.write(chunk);
          stage.written = writer.size;
          job.watch?.progress(writer.size);
          this.notify(job);
        },
      });
    } catch (err) {
      // A broken raw body resumes from here on the next attempt; anything else starts over.
      // Bytes that did not match their digest (a lying mirror: client.ts verifies a mirror's whole blob) are not resumed from,
      // nor are a mirror's bytes at all: the next attempt may go to another host, and a mismatch of the mixed file would
      // then blame nobody (the file rejected, the mirror kept).
      const resumable =
        raw &&
        !mirror &&
        !signal.aborted &&
        writer.isOpen &&
        !(err instanceof DigestMismatchError) &&
        !(err instanceof GearError && !isClass(err, 'Unavailable') && !isClass(err, 'DeadlineExceeded'));
      if (!resumable) {
        await writer.abort();
        job.writer = undefined;
      }
      throw err;
    } finally {
      stream.destroy();
      this.counters.blobBytes += received;
    }
    job.writer = undefined;
    try {
      await writer.commit(); // verifies the whole content; a mismatch deletes the staging file
    } catch (err) {
      await writer.abort();
      if (signal.aborted) throw signal.reason;
      throw err;
    }
  }

  // ---------------------------------------------------------------- streaming

  /**
   * Opens a reader of req's content that is served while the content
   * downloads (see the file comment). Starts the download (foreground) or
   * joins the one in flight; it then runs to the end in the background.
   * The caller checks the pool first: this always goes through a download.
   */
  stream(req: FetchRequest): StreamedFile {
    checkDigest(req.digest);
    if (!(Number.isSafeInteger(req.size) && req.size >= 0)) throw invalidArgument(`stream ${req.digest}: bad size ${req.size}`);
    if (this.closed) throw unavailable('fetcher is closed');
    this.counters.streams++;
    let j = this.attachReader(req);
    let open = true;
    const detach = (job: Job) => {
      job.readers--;
      // Nobody reads it now: a queued download lets foreground requests go first.
      if (job.readers === 0 && job.waiters === 0 && job.state === 'queued' && job.priority === 'foreground') this.demote(job);
      this.closeReadFds(job);
    };
    return {
      keepCache: false,
      read: async (buf, position, signal) => {
        if (!open) throw failedPrecondition(`read of ${req.digest} after close`);
        const deadline = Date.now() + this.timeoutMs;
        // The download failed (a stalled or broken registry), before or during this read: the read starts
        // a fresh one within its deadline, unless the content was rejected (that stays an error until the
        // next open) or the fetcher is closing. A few rounds at most.
        const failed = () => j.state === 'done' && j.error !== undefined && !j.rejected && !this.closed;
        for (let round = 1; ; round++) {
          if (failed()) {
            const old = j;
            j = this.attachReader(req);
            detach(old);
          }
          try {
            return await this.readStreamed(j, buf, position, deadline, signal);
          } catch (err) {
            // Within this read, only a transient failure (a broken or stalled registry) is worth another round.
            const transient = isClass(j.error, 'Unavailable') || isClass(j.error, 'DeadlineExceeded');
            if (round >= 3 || !failed() || !transient || Date.now() >= deadline || signal?.aborted) throw err;
          }
        }
      },
      close: async () => {
        if (!open) return;
        open = false;
        detach(j);
      },
    };
  }

  /** Starts (foreground) or joins the download of req for a streamed reader. */
  private attachReader(req: FetchRequest): Job {
    let job = this.jobs.get(req.digest);
    if (job) {
      this.counters.joined++;
      if (job.priority === 'background') this.promote(job);
    } else {
      job = this.enqueue(req, 'foreground');
    }
    job.keep = true;
    job.streaming = true;
    job.readers++;
    if (job.stage && !job.stage.fh) job.stage.fh = this.openReadFd(job, job.stage.path);
    return job;
  }

  private openReadFd(job: Job, file: string): Promise<FileHandle> {
    const digest = job.req.digest;
    const p = fs.open(file, 'r').catch((err: unknown) => {
      // Committed meanwhile: the staging file was renamed into the pool.
      if (errnoCode(err) === 'ENOENT') return fs.open(this.pool.path(digest), 'r');
      throw err;
    });
    p.catch(() => undefined);
    job.readFds.push(p);
    return p;
  }

  private closeReadFds(job: Job): void {
    if (job.state !== 'done' || job.readers > 0) return;
    for (const p of job.readFds.splice(0)) void p.then((fh) => fh.close()).catch(() => undefined);
  }

  private async readStreamed(job: Job, buf: Buffer, pos: number, deadline: number, signal?: AbortSignal): Promise<number> {
    const { req } = job;
    if (!Number.isSafeInteger(pos) || pos < 0) throw invalidArgument(`read of ${req.digest}: bad position ${pos}`);
    if (pos >= req.size || buf.length === 0) return 0;
    const want = Math.min(buf.length, req.size - pos);
    for (;;) {
      if (job.state === 'done') {
        if (job.error !== undefined) {
          const next = job.rejected ? 'the next open tries again' : 'the next read tries again';
          throw unavailable(`read of ${req.digest}: the download failed, the file is not served (${describeError(job.error)}); ${next}`, job.error);
        }
        // Complete and verified: the staging file is now the pool file (same inode).
        job.stage ??= { path: this.pool.path(req.digest), written: req.size };
        job.stage.fh ??= this.openReadFd(job, job.stage.path);
        return this.readFd(job.stage.fh, buf, want, pos);
      }
      const stage = job.stage;
      // The last byte is served only once the whole file verified (job done, above). A read waits for
      // all it asked for: the miss filesystem fills a request with reads until it is full, so
      // returning what trickled in would restart the deadline with every byte.
      const ready = stage ? Math.min(stage.written, req.size - 1) : 0;
      if (stage && ready >= pos + want) {
        stage.fh ??= this.openReadFd(job, stage.path);
        return this.readFd(stage.fh, buf, want, pos);
      }
      const have = stage?.written ?? 0;
      // Far ahead: a Range request, short of the last byte too (a read of it waits for the download), so
      // that a reader that reads to the end learns of a corrupt download whichever way it read.
      if (!req.blob && pos - have >= this.rangeAheadBytes && pos < req.size - 1) return this.rangeReads.read(job, buf, pos, Math.min(want, req.size - 1 - pos), deadline, signal);
      await this.waitProgress(job, pos, deadline, signal);
    }
  }

  private async readFd(fhp: Promise<FileHandle>, buf: Buffer, n: number, pos: number): Promise<number> {
    const fh = await fhp;
    const { bytesRead } = await fh.read(buf, 0, n, pos);
    if (bytesRead === 0) throw internal(`staging file shorter than recorded (read at ${pos})`);
    return bytesRead;
  }

  private waitProgress(job: Job, pos: number, deadline: number, signal?: AbortSignal): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const cleanup = () => {
        job.listeners.delete(wake);
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
      };
      const wake = () => {
        cleanup();
        resolve();
      };
      const onAbort = () => {
        cleanup();
        reject(signal!.reason ?? unavailable(`read of ${job.req.digest}: aborted`));
      };
      const timer = setTimeout(
        () => {
          cleanup();
          this.counters.timeouts++;
          reject(
            deadlineExceeded(
              `read of ${job.req.digest} at byte ${pos}: not downloaded within ${this.timeoutMs} ms (download at ${job.stage?.written ?? 0} of ${job.req.size} bytes, ${job.state}); check the registry's reachability or raise GEAR_FETCH_TIMEOUT`,
            ),
          );
        },
        Math.max(0, deadline - Date.now()),
      );
      timer.unref();
      job.listeners.add(wake);
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** Stops starting downloads and aborts the running ones; waiters get Unavailable. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const reason = unavailable('fetcher closed');
    for (const q of [this.fg, this.bg]) for (const job of q.splice(0)) this.settle(job, reason);
    for (const job of this.jobs.values()) job.controller.abort(reason);
    for (let i = 0; i < 100 && this.running > 0; i++) await new Promise((r) => setTimeout(r, 20));
  }
}
