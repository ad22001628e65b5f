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
 *   the deadline allows. A digest mismatch is not retried (the next open asks
 *   again).
 */
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { deadlineExceeded, describeError, GearError, invalidArgument, isClass, unavailable } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import type { BlobLocation, StoredBlob } from '../index/manifest.js';
import type { Pool } from '../pool/pool.js';
import { checkDigest } from '../registry/digest.js';
import type { RegistryClient } from '../registry/client.js';
import { sleep } from '../registry/retry.js';

/** Default deadline of one fetch as seen by a waiting reader. */
export const DEFAULT_FETCH_TIMEOUT_MS = 60_000;
/** Default number of downloads in flight. */
export const DEFAULT_MAX_FETCHES = 8;

/** What to fetch: a Gear file of an index manifest. */
export interface FetchRequest {
  /** Content digest (the pool key). */
  digest: string;
  /** Content size in bytes. */
  size: number;
  /** The stored form when not raw (gzip). */
  blob?: StoredBlob | undefined;
  /** Where the blob lives. */
  location: BlobLocation;
}

export type FetchPriority = 'foreground' | 'background';

export interface FetchOptions {
  priority?: FetchPriority;
  /** Aborts this caller's wait (not the download, unless it was the last waiter). */
  signal?: AbortSignal;
  /** This caller's deadline; default the fetcher's timeoutMs. */
  timeoutMs?: number;
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
  /** Gauges. */
  running: number;
  queued: number;
}

/** Parses GEAR_FETCH_TIMEOUT-style durations: "60", "60s", "500ms", "2m". */
export function parseDuration(input: string | number, what = 'duration'): number {
  if (typeof input === 'number') {
    if (!(Number.isFinite(input) && input > 0)) throw invalidArgument(`${what} ${input}: must be a positive number of ms`);
    return input;
  }
  const m = /^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$/.exec(input);
  if (!m) throw invalidArgument(`${what} ${JSON.stringify(input)}: expected e.g. 60, 60s, 500ms or 2m`);
  const n = Number(m[1]);
  const ms = n * ({ ms: 1, s: 1000, m: 60_000, h: 3_600_000 } as const)[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h'];
  if (!(ms > 0)) throw invalidArgument(`${what} ${JSON.stringify(input)}: must be more than 0`);
  return Math.round(ms);
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
}

export class Fetcher {
  readonly timeoutMs: number;
  readonly maxParallel: number;
  private readonly pool: Pool;
  private readonly client: RegistryClient;
  private readonly log: Logger;
  private readonly maxAttempts: number;
  private readonly jobs = new Map<string, Job>();
  private readonly fg: Job[] = [];
  private readonly bg: Job[] = [];
  private running = 0;
  private closed = false;
  private readonly counters = {
    files: 0,
    bytes: 0,
    blobBytes: 0,
    failures: 0,
    verifyFailures: 0,
    timeouts: 0,
    joined: 0,
    cached: 0,
  };

  constructor(opts: FetcherOptions) {
    this.pool = opts.pool;
    this.client = opts.client;
    this.log = (opts.logger ?? silentLogger()).child({ component: 'fetcher' });
    const envTimeout = process.env.GEAR_FETCH_TIMEOUT;
    this.timeoutMs = opts.timeoutMs ?? (envTimeout ? parseDuration(envTimeout, 'GEAR_FETCH_TIMEOUT') : DEFAULT_FETCH_TIMEOUT_MS);
    if (!(this.timeoutMs > 0)) throw invalidArgument(`fetch timeout ${this.timeoutMs}: must be more than 0`);
    this.maxParallel = opts.maxParallel ?? DEFAULT_MAX_FETCHES;
    if (!(Number.isSafeInteger(this.maxParallel) && this.maxParallel > 0)) {
      throw invalidArgument(`max parallel fetches ${this.maxParallel}: must be a positive integer`);
    }
    this.maxAttempts = Math.max(1, opts.maxAttempts ?? 3);
  }

  stats(): FetcherStats {
    return { ...this.counters, running: this.running, queued: this.fg.length + this.bg.length };
  }

  /** True while a download of digest is queued or running. */
  inFlight(digest: string): boolean {
    return this.jobs.has(digest);
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
      job = this.enqueue(req, priority);
    }
    if (priority === 'background') {
      job.keep = true;
      return this.wait(job, opts, false);
    }
    return this.wait(job, opts, true);
  }

  private enqueue(req: FetchRequest, priority: FetchPriority): Job {
    let resolve!: () => void;
    let reject!: (e: unknown) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise.catch(() => undefined); // waiters get it; never unhandled
    const job: Job = { req, priority, waiters: 0, keep: false, state: 'queued', controller: new AbortController(), promise, resolve, reject };
    // Protect the file from eviction between its commit and the reader's open.
    job.releasePin = this.pool.pin(req.digest);
    this.jobs.set(req.digest, job);
    (priority === 'foreground' ? this.fg : this.bg).push(job);
    this.pump();
    return job;
  }

  private promote(job: Job): void {
    job.priority = 'foreground';
    const i = this.bg.indexOf(job);
    if (i >= 0) {
      this.bg.splice(i, 1);
      this.fg.push(job);
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
    if (this.jobs.get(job.req.digest) === job) this.jobs.delete(job.req.digest);
    job.releasePin?.();
    if (err === undefined) job.resolve();
    else job.reject(err);
  }

  private pump(): void {
    while (!this.closed && this.running < this.maxParallel) {
      const job = this.fg.shift() ?? this.bg.shift();
      if (!job) return;
      this.running++;
      job.state = 'running';
      void this.run(job).finally(() => {
        this.running--;
        this.pump();
      });
    }
  }

  private async run(job: Job): Promise<void> {
    const { req } = job;
    const started = Date.now();
    const deadline = setTimeout(
      () => job.controller.abort(deadlineExceeded(`fetch ${req.digest}: download not done within ${this.timeoutMs} ms`)),
      this.timeoutMs,
    );
    deadline.unref();
    const signal = job.controller.signal;
    try {
      for (let attempt = 1; ; attempt++) {
        if (this.pool.has(req.digest)) break; // someone else (another writer) put it there
        try {
          await this.download(req, signal);
          this.counters.files++;
          this.counters.bytes += req.size;
          this.log.debug({ digest: req.digest, size: req.size, ms: Date.now() - started }, 'fetched');
          break;
        } catch (err) {
          if (signal.aborted) throw signal.reason;
          const mismatch = isClass(err, 'InvalidArgument') && /does not match|more than the expected/.test(String((err as Error).message));
          if (mismatch) {
            this.counters.verifyFailures++;
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
      this.counters.failures++;
      const e = signal.aborted ? signal.reason : err;
      this.log.warn({ digest: req.digest, err: describeError(e) }, 'fetch failed');
      this.settle(job, e);
    } finally {
      clearTimeout(deadline);
    }
  }

  /** One attempt: GET the blob, (gunzip), write through a verifying pool writer. */
  private async download(req: FetchRequest, signal: AbortSignal): Promise<void> {
    const repo = `${req.location.registry}/${req.location.repository}`;
    const blobDigest = req.blob ? req.blob.digest : req.digest;
    const blobSize = req.blob ? req.blob.size : req.size;
    const { stream } = await this.client.openBlob(repo, blobDigest, { signal, expectedSize: blobSize });
    const writer = await this.pool.beginWrite(req.digest, req.size).catch((err: unknown) => {
      stream.destroy();
      throw err;
    });
    let received = 0;
    stream.on('data', (c: Buffer) => {
      received += c.length;
    });
    try {
      const onAbort = () => stream.destroy(signal.reason as Error);
      signal.addEventListener('abort', onAbort, { once: true });
      try {
        if (req.blob) await pipeline(stream, createGunzip(), writer.stream, { signal });
        else await pipeline(stream, writer.stream, { signal });
      } finally {
        signal.removeEventListener('abort', onAbort);
        this.counters.blobBytes += received;
      }
      await writer.commit();
    } catch (err) {
      await writer.abort();
      if (signal.aborted) throw signal.reason;
      // zlib errors (corrupt gzip) are content problems too.
      if (err && typeof err === 'object' && 'errno' in err && String((err as { code?: string }).code ?? '').startsWith('Z_')) {
        throw invalidArgument(`fetch ${req.digest}: stored blob does not match (bad gzip: ${describeError(err)})`, err);
      }
      throw err;
    }
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
