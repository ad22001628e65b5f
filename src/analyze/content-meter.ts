/**
 * ContentMeter: what `gear analyze` does with each regular file body of a
 * layer in place of staging it (src/convert/stage.ts): hash it, and for a
 * content not measured before, find the size of the blob `gear convert` would
 * upload for it (the same gzip settings and the same gzip-when-worth-it rule,
 * docs/format.md §4), and with --chunks the sha256 and stored size of each
 * fixed-size chunk. Nothing is written to disk.
 *
 * Memory: a body of up to SMALL_BODY_BYTES (256 KiB, as the converter's stage)
 * is hashed in memory and compressed only if its content is new; a larger body
 * streams through sha256 and a gzip stream at once (gzip can only be avoided
 * once the digest is known at the end), holding one chunk at most. Gzip runs
 * on libuv's thread pool, beside the hashing and decompression on the main
 * thread; small-file compression is queued, a few jobs in flight.
 */
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { promisify } from 'node:util';
import { createGzip, gzip as gzipCb, type ZlibOptions } from 'node:zlib';
import { keepsGzip, wouldGzip, type StoragePolicy } from '../convert/storage-policy.js';
import { SMALL_BODY_BYTES } from '../convert/stage.js';
import type { ChunkTable } from './chunk-table.js';
import { ContentTable, digestKey } from './content-table.js';

export type { StoragePolicy };

const gzipAsync = promisify(gzipCb) as (buf: Buffer, opts: ZlibOptions) => Promise<Buffer>;

/** Small-file compressions in flight at once. */
const SMALL_JOBS = 4;

export class ContentMeter {
  /** True while reading a layer measured before: its contents are all known, so only hashing is needed. */
  knownLayer = false;
  /** Bytes of file bodies hashed (progress). */
  bytesHashed = 0;
  private readonly jobs = new Set<Promise<void>>();
  private readonly inFlight = new Set<string>();
  private failed: unknown;

  constructor(
    private readonly table: ContentTable,
    private readonly policy: StoragePolicy,
    private readonly chunks?: ChunkTable,
  ) {}

  /** The Flattener's content sink: hashes the body and measures a new content. */
  async add(body: AsyncIterable<Buffer>, knownSize?: number): Promise<{ digest: string; size: number }> {
    this.throwIfFailed();
    if (knownSize !== undefined && knownSize <= SMALL_BODY_BYTES) return this.addSmall(body);
    return this.addStreamed(body, knownSize);
  }

  /** Waits for queued compressions; call before listing an image's contents. */
  async settle(): Promise<void> {
    while (this.jobs.size > 0) await Promise.all([...this.jobs]);
    this.throwIfFailed();
  }

  private throwIfFailed(): void {
    if (this.failed !== undefined) throw this.failed;
  }

  private async addSmall(body: AsyncIterable<Buffer>): Promise<{ digest: string; size: number }> {
    const parts: Buffer[] = [];
    let size = 0;
    for await (const c of body) {
      parts.push(c);
      size += c.length;
      if (size > SMALL_BODY_BYTES) throw new Error(`a tar body grew past its header size (${size} bytes)`);
    }
    this.bytesHashed += size;
    const data = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
    const raw = createHash('sha256').update(data).digest();
    const key = raw.toString('latin1');
    const digest = `sha256:${raw.toString('hex')}`;
    if (this.table.has(key) || this.inFlight.has(key)) return { digest, size };
    if (this.knownLayer) throw new Error('internal: a content of a measured layer is unknown');
    while (this.jobs.size >= SMALL_JOBS) await Promise.race(this.jobs);
    this.throwIfFailed();
    this.inFlight.add(key);
    const job = this.measureSmall(key, data).then(
      () => undefined,
      (err: unknown) => {
        this.failed ??= err;
      },
    );
    const tracked = job.finally(() => {
      this.jobs.delete(tracked);
      this.inFlight.delete(key);
    });
    this.jobs.add(tracked);
    return { digest, size };
  }

  private async measureSmall(key: string, data: Buffer): Promise<void> {
    let stored = data.length;
    let gzDigest: Buffer | undefined;
    if (wouldGzip(data.length, this.policy)) {
      const gz = await gzipAsync(data, { level: this.policy.gzipLevel });
      if (keepsGzip(data.length, gz.length)) {
        stored = gz.length;
        gzDigest = createHash('sha256').update(gz).digest();
      }
    }
    if (this.chunks) {
      const keys: string[] = [];
      const cs = this.chunks.size;
      // A content of one chunk is that chunk: its stored size is the file's (same bytes, same rule).
      if (data.length <= cs) keys.push(await this.measureChunk(data, stored));
      else for (let off = 0; off < data.length; off += cs) keys.push(await this.measureChunk(data.subarray(off, off + cs)));
      this.chunks.setContentChunks(key, keys);
    }
    this.table.add(key, data.length, stored, gzDigest);
  }

  /** Hashes a chunk and, when new, finds its stored size (unless given); returns its key. */
  private async measureChunk(chunk: Buffer, knownStored?: number): Promise<string> {
    const ck = createHash('sha256').update(chunk).digest().subarray(0, 16).toString('latin1');
    if (this.chunks!.has(ck)) return ck;
    let stored = knownStored ?? chunk.length;
    if (knownStored === undefined && wouldGzip(chunk.length, this.policy)) {
      const gz = await gzipAsync(chunk, { level: this.policy.gzipLevel });
      if (keepsGzip(chunk.length, gz.length)) stored = gz.length;
    }
    this.chunks!.measured(ck, stored);
    return ck;
  }

  private async addStreamed(body: AsyncIterable<Buffer>, knownSize: number | undefined): Promise<{ digest: string; size: number }> {
    const h = createHash('sha256');
    let size = 0;
    // Speculative gzip: only a new content needs it, but that is known at the end.
    const measure = !this.knownLayer;
    const gz = measure && this.policy.storage === 'auto' && (knownSize === undefined || wouldGzip(knownSize, this.policy)) ? createGzip({ level: this.policy.gzipLevel }) : undefined;
    const gzHash = createHash('sha256');
    let gzSize = 0;
    let gzDone: Promise<unknown> | undefined;
    if (gz) {
      gz.on('data', (c: Buffer) => {
        gzHash.update(c);
        gzSize += c.length;
      });
      gzDone = once(gz, 'end');
      gzDone.catch(() => undefined);
    }
    const cs = this.chunks?.size ?? 0;
    const chunkKeys: string[] = [];
    let chunk: Buffer | undefined = measure && this.chunks ? Buffer.allocUnsafe(cs) : undefined;
    let fill = 0;
    try {
      for await (const c of body) {
        h.update(c);
        size += c.length;
        this.bytesHashed += c.length;
        if (gz && !gz.write(c)) await once(gz, 'drain');
        if (chunk) {
          for (let off = 0; off < c.length; ) {
            const n = Math.min(cs - fill, c.length - off);
            c.copy(chunk, fill, off, off + n);
            fill += n;
            off += n;
            if (fill === cs) {
              chunkKeys.push(await this.measureChunk(chunk));
              fill = 0;
            }
          }
        }
      }
      if (gz) {
        gz.end();
        await gzDone;
      }
      if (chunk && fill > 0) {
        // The whole content in one chunk: the file's own gzip decides (it is the same bytes).
        const whole = chunkKeys.length === 0 ? (gz && wouldGzip(size, this.policy) && keepsGzip(size, gzSize) ? gzSize : size) : undefined;
        chunkKeys.push(await this.measureChunk(chunk.subarray(0, fill), whole));
      }
      chunk = undefined;
    } catch (err) {
      gz?.destroy();
      throw err;
    }
    const raw = h.digest();
    const key = raw.toString('latin1');
    const digest = `sha256:${raw.toString('hex')}`;
    if (this.table.has(key) || this.inFlight.has(key)) return { digest, size };
    if (!measure) throw new Error('internal: a content of a measured layer is unknown');
    let stored = size;
    let gzDigest: Buffer | undefined;
    if (gz && wouldGzip(size, this.policy) && keepsGzip(size, gzSize)) {
      stored = gzSize;
      gzDigest = gzHash.digest();
    }
    if (this.chunks) this.chunks.setContentChunks(key, chunkKeys);
    this.table.add(key, size, stored, gzDigest);
    return { digest, size };
  }
}

export { digestKey };
