/**
 * Reading a blob body into the pool, for the fetcher: the copy (raw or
 * gunzip, capped at the declared content size) and the stall watch of a
 * download.
 *
 *   const watch = new StallWatch({ windowMs: 5000, minBytes: 64 * 1024, onStall: (idleMs) => abort() });
 *   await copyBody(stream, { gunzip: true, maxBytes: size, signal, write: (c) => writer.write(c).then(() => watch.progress(writer.size)) });
 *   watch.stop();
 *
 * A body is "stalled" when fewer than `minBytes` arrived in the last
 * `windowMs` (a body idle timeout that a registry trickling a byte a second
 * cannot defeat, unlike undici's per-chunk bodyTimeout). The window is the
 * fetch deadline (GEAR_FETCH_TIMEOUT), the floor 64 KiB (or what is left of
 * the file): with the default 60 s that is about 1 KiB/s.
 */
import type { Readable } from 'node:stream';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { describeError, invalidArgument } from '../errors.js';

/** Least progress per window below which a body counts as stalled. */
export const STALL_MIN_BYTES = 64 * 1024;

/**
 * Output chunk of the gunzip of a compressed Gear file. zlib's default (16 KiB)
 * costs a threadpool round trip, a pool write and a hash update per 16 KiB:
 * the main thread spent ~10 ms per MB on that, ~4 ms with 256 KiB chunks (the
 * prefetch of a python app, ~19 MB, competes with the index build there).
 */
const GUNZIP_CHUNK_BYTES = 256 * 1024;

export interface CopyBodyOptions {
  /** The body is a gzip stream of the content (application/vnd.gear.file.v1+gzip). */
  gunzip: boolean;
  /** Content bytes at most: decompression stops right there (a gzip bomb cannot fill the disk). */
  maxBytes: number;
  signal: AbortSignal;
  /** Stores one chunk of content (awaited before the next). */
  write: (chunk: Buffer) => Promise<void>;
  /** What the content is, for errors ("fetch sha256:…"). */
  what: string;
}

/**
 * Copies a body into `write`. Rejects with the body's error (a broken body),
 * the signal's reason, or InvalidArgument "does not match" for bad gzip and
 * content past maxBytes (content problems: not worth a retry).
 */
export async function copyBody(body: Readable, opts: CopyBodyOptions): Promise<void> {
  let written = 0;
  const sink = new Writable({
    highWaterMark: GUNZIP_CHUNK_BYTES,
    write: (chunk: Buffer, _enc, cb) => {
      if (written + chunk.length > opts.maxBytes) {
        cb(invalidArgument(`${opts.what}: content does not match: more than the expected ${opts.maxBytes} bytes${opts.gunzip ? ' after decompression' : ''}`));
        return;
      }
      written += chunk.length;
      opts.write(chunk).then(() => cb(), cb);
    },
  });
  try {
    if (opts.gunzip) await pipeline(body, createGunzip({ chunkSize: GUNZIP_CHUNK_BYTES }), sink, { signal: opts.signal });
    else await pipeline(body, sink, { signal: opts.signal });
  } catch (err) {
    if (opts.signal.aborted) throw opts.signal.reason;
    // zlib errors (corrupt gzip) are content problems too.
    if (err && typeof err === 'object' && 'errno' in err && String((err as { code?: string }).code ?? '').startsWith('Z_')) {
      throw invalidArgument(`${opts.what}: stored blob does not match (bad gzip: ${describeError(err)})`, err);
    }
    throw err;
  }
}

export interface StallWatchOptions {
  /** The window (ms): the fetch deadline. */
  windowMs: number;
  /** Bytes that must arrive per window (capped by `remaining()`). */
  minBytes: number;
  /** Content bytes still to come (the floor never asks for more). */
  remaining: () => number;
  /** Called once when the body stalled; `idleMs` since the last useful progress. */
  onStall: (idleMs: number) => void;
  now?: () => number;
}

/** Watches a download's progress; see the file comment. */
export class StallWatch {
  private mark: { at: number; bytes: number };
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private readonly now: () => number;

  constructor(private readonly opts: StallWatchOptions) {
    this.now = opts.now ?? Date.now;
    this.mark = { at: this.now(), bytes: 0 };
    this.arm(opts.windowMs);
  }

  /** Content bytes written so far (monotonic within an attempt; a restart may go back to 0). */
  progress(bytes: number): void {
    if (bytes < this.mark.bytes) this.mark = { at: this.mark.at, bytes }; // a gzip restart: count from here
    const floor = Math.max(1, Math.min(this.opts.minBytes, this.opts.remaining() + (bytes - this.mark.bytes)));
    if (bytes - this.mark.bytes >= floor) this.mark = { at: this.now(), bytes };
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private arm(ms: number): void {
    this.timer = setTimeout(() => this.check(), Math.max(1, ms));
    this.timer.unref();
  }

  private check(): void {
    if (this.stopped) return;
    const idle = this.now() - this.mark.at;
    if (idle < this.opts.windowMs) return this.arm(this.opts.windowMs - idle);
    this.stopped = true;
    this.opts.onStall(idle);
  }
}
