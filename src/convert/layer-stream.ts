/**
 * Byte streams of source blobs: digest verification while reading, and
 * decompression chosen by the bytes (gzip, zstd or none), never by the
 * declared media type alone.
 */
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { createGunzip } from 'node:zlib';
import { Decompress as ZstdDecompress } from 'fzstd';
import { ZstdFrameGuard } from '../core/archive/zstd-frames.js';
import { GearError } from '../core/errors.js';

/** A source blob did not match its digest or size. Class InvalidArgument: the source is bad. */
export class SourceDigestError extends GearError {
  constructor(message: string) {
    super('InvalidArgument', message);
    this.name = 'SourceDigestError';
  }
}

/**
 * Passes bytes through while hashing; throws at the end (or as soon as too
 * many bytes arrive) when the sha256 or size differ from what was declared.
 */
export async function* verified(
  src: AsyncIterable<Uint8Array>,
  digest: string,
  size: number | undefined,
  what: string,
): AsyncGenerator<Buffer> {
  const h = createHash('sha256');
  let n = 0;
  for await (const c of src) {
    const b = Buffer.isBuffer(c) ? c : Buffer.from(c);
    n += b.length;
    if (size !== undefined && n > size) throw new SourceDigestError(`${what}: more than the declared ${size} bytes`);
    h.update(b);
    yield b;
  }
  if (size !== undefined && n !== size) {
    throw new SourceDigestError(`${what}: ${n} bytes, but ${size} were declared (truncated?)`);
  }
  const actual = `sha256:${h.digest('hex')}`;
  if (actual !== digest) throw new SourceDigestError(`${what}: content does not match its digest (want ${digest}, got ${actual})`);
}

/** Counts bytes into `onBytes` as they pass. */
export async function* counted(src: AsyncIterable<Buffer>, onBytes: (n: number) => void): AsyncGenerator<Buffer> {
  for await (const c of src) {
    onBytes(c.length);
    yield c;
  }
}

function gunzip(src: AsyncIterable<Buffer>): AsyncIterable<Buffer> {
  // 1 MiB output chunks, not zlib's 16 KiB: a sixteenth of the thread-pool round trips and callbacks.
  const gz = createGunzip({ chunkSize: 1 << 20 });
  const input = Readable.from(src, { objectMode: false });
  input.on('error', (err) => gz.destroy(err));
  input.pipe(gz);
  return gz;
}

async function* unzstd(src: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  let out: Buffer[] = [];
  const d = new ZstdDecompress((chunk) => out.push(Buffer.from(chunk)));
  const guard = new ZstdFrameGuard();
  try {
    for await (const c of src) {
      guard.check(c); // before fzstd allocates the window a frame header claims
      d.push(c);
      yield* out;
      out = [];
    }
    d.push(new Uint8Array(0), true);
  } catch (err) {
    if (err instanceof GearError) throw err;
    throw new SourceDigestError(`zstd: ${err instanceof Error ? err.message : String(err)}`);
  }
  yield* out;
}

/**
 * Decompresses gzip or zstd when the first bytes say so; passes anything else
 * through unchanged (an uncompressed tar). With `refuseCompressed` (the caller
 * knows the bytes are the content itself) compressed bytes are refused with
 * `refuseCompressed` as the error's text.
 */
export async function* decompressed(src: AsyncIterable<Buffer>, refuseCompressed?: string): AsyncGenerator<Buffer> {
  const it = src[Symbol.asyncIterator]();
  let head = Buffer.alloc(0);
  let done = false;
  while (head.length < 4) {
    const r = await it.next();
    if (r.done) {
      done = true;
      break;
    }
    head = Buffer.concat([head, r.value]);
  }
  async function* rest(): AsyncGenerator<Buffer> {
    if (head.length) yield head;
    if (done) return;
    for (;;) {
      const r = await it.next();
      if (r.done) return;
      yield r.value;
    }
  }
  const gzip = head[0] === 0x1f && head[1] === 0x8b;
  const zstd = head.length >= 4 && head.readUInt32LE(0) === 0xfd2fb528;
  if (refuseCompressed !== undefined && (gzip || zstd)) throw new SourceDigestError(`${refuseCompressed} (${gzip ? 'gzip' : 'zstd'})`);
  if (gzip) {
    try {
      yield* gunzip(rest());
    } catch (err) {
      if (err instanceof GearError) throw err;
      throw new SourceDigestError(`gzip: ${err instanceof Error ? err.message : String(err)}`);
    }
  } else if (zstd) {
    yield* unzstd(rest());
  } else {
    yield* rest();
  }
}
