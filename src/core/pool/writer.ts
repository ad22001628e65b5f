/**
 * PoolWriter: one two-phase write into the pool (moved out of pool.ts; see
 * Pool.beginWrite and the file comment of pool.ts for the protocol).
 */
import { createHash, type Hash } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import fs from 'node:fs/promises';
import { Writable } from 'node:stream';
import { errnoCode, failedPrecondition, internal, invalidArgument } from '../errors.js';
import { PoolNoSpaceError } from './admission.js';

/**
 * What a writer needs of its pool (Pool implements it): the writer depends on
 * this face, not on pool.ts, so the two files do not import each other.
 */
export interface PoolWriteSink {
  /** Moves the verified staging file to its content name and accounts for it. */
  install(hex: string, staging: string, size: number): Promise<void>;
  /** Evicts for room after ENOSPC and builds the error to throw. */
  noSpace(hex: string, wanted: number, cause: unknown): Promise<Error>;
  /** Evicts down to the cap. */
  enforceCap(): Promise<unknown>;
  /** Releases the room announced for this write. */
  endWrite(hex: string, reserved: number): void;
}

/**
 * One two-phase write (see Pool.beginWrite). Not safe for concurrent calls on
 * the same writer: await each write before the next. `commit()` and `abort()`
 * end the write; `abort()` is idempotent and a no-op after commit.
 */
export class PoolWriter {
  private readonly hash: Hash = createHash('sha256');
  private written = 0;
  private state: 'open' | 'committing' | 'done' = 'open';
  private stream_: Writable | undefined;

  /** @internal use Pool.beginWrite */
  constructor(
    private readonly pool: PoolWriteSink,
    private readonly hex: string,
    /** the staging file; never visible in sha256/ */
    readonly stagingPath: string,
    private readonly fh: FileHandle,
    readonly expectedSize: number | undefined,
  ) {}

  get digest(): string {
    return `sha256:${this.hex}`;
  }

  /** Bytes written so far. */
  get size(): number {
    return this.written;
  }

  /** True until commit, abort or a failed write ended this writer (a broken download may then append more). */
  get isOpen(): boolean {
    return this.state === 'open';
  }

  /** Appends a chunk. Fails (and aborts) on a size overrun or a full disk (PoolNoSpaceError). */
  async write(chunk: Uint8Array): Promise<void> {
    if (this.state !== 'open') throw failedPrecondition(`pool write ${this.digest}: writer is already ${this.state === 'done' ? 'finished' : 'committing'}`);
    if (this.expectedSize !== undefined && this.written + chunk.length > this.expectedSize) {
      await this.abort();
      throw invalidArgument(`pool write ${this.digest}: more than the expected ${this.expectedSize} bytes`);
    }
    this.hash.update(chunk);
    try {
      let off = 0;
      while (off < chunk.length) {
        const { bytesWritten } = await this.fh.write(chunk, off, chunk.length - off, null);
        off += bytesWritten;
      }
    } catch (err) {
      throw await this.fail(err);
    }
    this.written += chunk.length;
  }

  /** A Writable over this writer, for `pipeline(source, w.stream)`; commit after it finishes. */
  get stream(): Writable {
    this.stream_ ??= new Writable({
      write: (chunk: Buffer, _enc, cb) => {
        this.write(chunk).then(() => cb(), cb);
      },
    });
    return this.stream_;
  }

  /**
   * Verifies sha256 and size (InvalidArgument naming both digests on a
   * mismatch, staging file deleted), then makes the file visible. Resolves
   * when the file is durable in the pool.
   */
  async commit(): Promise<void> {
    if (this.state !== 'open') throw failedPrecondition(`pool write ${this.digest}: commit after ${this.state === 'done' ? 'finish' : 'commit'}`);
    this.state = 'committing';
    const actual = this.hash.digest('hex');
    if (actual !== this.hex || (this.expectedSize !== undefined && this.written !== this.expectedSize)) {
      await this.cleanup();
      const sizeNote = this.expectedSize !== undefined && this.written !== this.expectedSize ? `, ${this.written} bytes instead of ${this.expectedSize}` : '';
      throw invalidArgument(`pool write ${this.digest}: content does not match, got sha256:${actual}${sizeNote}`);
    }
    try {
      await this.fh.chmod(0o444);
      await this.fh.sync();
      await this.fh.close();
    } catch (err) {
      throw await this.fail(err);
    }
    try {
      await this.pool.install(this.hex, this.stagingPath, this.written);
    } catch (err) {
      await this.cleanup();
      if (errnoCode(err) === 'ENOSPC') throw await this.pool.noSpace(this.hex, this.written, err);
      throw internal(`pool write ${this.digest}: could not install the file`, err);
    }
    this.finish();
    await this.pool.enforceCap();
  }

  /** Discards the write and its staging file. Idempotent; a no-op after commit. */
  async abort(): Promise<void> {
    if (this.state === 'done') return;
    await this.cleanup();
  }

  private async fail(err: unknown): Promise<Error> {
    await this.cleanup();
    if (errnoCode(err) === 'ENOSPC' || errnoCode(err) === 'EDQUOT') {
      return this.pool.noSpace(this.hex, Math.max(this.expectedSize ?? 0, this.written), err);
    }
    return internal(`pool write ${this.digest}: ${String(err)}`, err);
  }

  private async cleanup(): Promise<void> {
    if (this.state === 'done') return;
    this.finish();
    await this.fh.close().catch(() => undefined);
    await fs.rm(this.stagingPath, { force: true });
  }

  private finish(): void {
    if (this.state === 'done') return;
    this.state = 'done';
    this.pool.endWrite(this.hex, this.expectedSize ?? 0);
  }
}

/** Copies a local file into the pool through a PoolWriter; retries once after a disk-full eviction freed room. */
export async function copyFileInto(pool: { beginWrite(digest: string, size?: number): Promise<PoolWriter> }, file: string, digest: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    const src = await fs.open(file, 'r');
    try {
      const { size } = await src.stat();
      const w = await pool.beginWrite(digest, size);
      try {
        const buf = Buffer.allocUnsafe(1024 * 1024);
        for (;;) {
          const { bytesRead } = await src.read(buf, 0, buf.length, null);
          if (bytesRead === 0) break;
          await w.write(buf.subarray(0, bytesRead));
        }
        await w.commit();
        return;
      } catch (err) {
        await w.abort();
        if (err instanceof PoolNoSpaceError && err.freed.bytes > 0 && attempt === 0) continue;
        throw err;
      }
    } finally {
      await src.close();
    }
  }
}

/** Stores a stream's content through a PoolWriter. Nothing is left behind on failure. */
export async function streamInto(
  pool: { beginWrite(digest: string, size?: number): Promise<PoolWriter> },
  readable: AsyncIterable<Uint8Array | string>,
  digest: string,
  expectedSize?: number,
): Promise<void> {
  const w = await pool.beginWrite(digest, expectedSize);
  try {
    for await (const chunk of readable) await w.write(typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
    await w.commit();
  } catch (err) {
    await w.abort();
    throw err;
  }
}
