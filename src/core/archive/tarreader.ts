/**
 * Reading a hostile layer stream: decompression picked by magic bytes, and a
 * tar-stream extractor hardened to agree with Go's archive/tar (what Docker
 * and containerd use), so that a layer cannot mean one file set to us and
 * another to the daemon that computed its diffID (CVE-2025-62518 class).
 *
 * tar-stream 3.x gets three things wrong for this use, fixed here by wrapping
 * two of its (private) methods on our own instance:
 *  - PAX values are decoded as UTF-8 strings, which corrupts binary xattrs
 *    (security.capability). We parse the raw PAX block ourselves, strictly
 *    (Go's parsePAX rules), and keep values as bytes.
 *  - Global PAX headers are merged into later entries (path, size!). Go
 *    returns them as a separate header and Docker ignores them; so do we.
 *  - Parsing continues past the end-of-archive marker. Go stops at two zero
 *    blocks and rejects a zero block followed by a header. We record zero
 *    blocks and apply.ts refuses any entry that follows one.
 * The wrappers check that the methods exist, so an incompatible tar-stream
 * upgrade fails loudly (and the tests that pin each behaviour fail).
 */
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream';
import { createGunzip } from 'node:zlib';
import { Decompress } from 'fzstd';
import tarStream from 'tar-stream';
import { GearError, internal, invalidArgument } from '../errors.js';
import { ZstdFrameGuard } from './zstd-frames.js';

/** One decoded PAX extended header: key → raw value bytes. */
export type PaxRecords = Map<string, Buffer>;

/** Input slice fed to a decompressor at a time: bounds the output one call can produce. */
const ZSTD_SLICE = 256;
const GZIP_SLICE = 16 * 1024;

/**
 * Parses a PAX extended header block ("%d %s=%s\n" records) the way Go's
 * archive/tar does, refusing anything malformed. Values stay raw bytes.
 */
export function parsePax(buf: Buffer): PaxRecords {
  const out: PaxRecords = new Map();
  let rest = buf;
  while (rest.length > 0) {
    const sp = rest.indexOf(0x20);
    if (sp < 1 || sp > 20) throw new Error('malformed PAX record length');
    const lenText = rest.subarray(0, sp).toString('latin1');
    if (!/^[0-9]+$/.test(lenText)) throw new Error('malformed PAX record length');
    const len = Number(lenText);
    if (len <= sp + 1 || len > rest.length) throw new Error('PAX record length out of range');
    const rec = rest.subarray(sp + 1, len);
    if (rec[rec.length - 1] !== 0x0a) throw new Error('PAX record not terminated by a newline');
    const eq = rec.indexOf(0x3d);
    if (eq < 1) throw new Error('PAX record without a key');
    const key = rec.subarray(0, eq).toString('utf8');
    if (key.includes('\0')) throw new Error('PAX key contains a NUL byte');
    const value = rec.subarray(eq + 1, rec.length - 1);
    validatePaxValue(key, value);
    out.set(key, Buffer.from(value));
    rest = rest.subarray(len);
  }
  return out;
}

/** Go's parsePAXInt/parsePAXTime strictness for the fields tar-stream also reads. */
function validatePaxValue(key: string, value: Buffer): void {
  const text = value.toString('latin1');
  switch (key) {
    case 'size':
    case 'uid':
    case 'gid':
      if (!/^[0-9]{1,19}$/.test(text)) throw new Error(`PAX ${key} is not a decimal integer`);
      break;
    case 'mtime':
    case 'atime':
    case 'ctime':
      if (!/^-?[0-9]{1,19}(\.[0-9]{0,19})?$/.test(text)) throw new Error(`PAX ${key} is not a decimal time`);
      break;
    case 'path':
    case 'linkpath':
      if (value.length === 0 || value.includes(0)) throw new Error(`PAX ${key} is empty or contains a NUL byte`);
      break;
  }
}

/** tar-stream's private surface we wrap; checked at run time. */
interface ExtractInternals {
  _decodeLongHeader(buf: Buffer): void;
  _consumeHeader(): boolean;
  _consumeLongHeader(): boolean;
  _continueWrite(err: Error | null): void;
  _header: { type: string | null; size: number | null } | null;
  _longHeader: boolean;
  _missing: number;
}

/** A tar-stream extractor plus what the hardening wrappers observed. */
export interface HardenedExtract {
  extract: tarStream.Extract;
  /** The PAX records for the entry being delivered now (take once per entry). */
  takePax(): PaxRecords | null;
  /** Zero (end-of-archive) blocks seen so far. */
  zeroBlocks(): number;
}

export function hardenedExtract(maxHeaderBytes: number): HardenedExtract {
  const extract = tarStream.extract();
  const inner = extract as unknown as ExtractInternals;
  const decodeLong = inner._decodeLongHeader;
  const consumeHeader = inner._consumeHeader;
  if (typeof decodeLong !== 'function' || typeof consumeHeader !== 'function' || typeof inner._consumeLongHeader !== 'function' || typeof inner._continueWrite !== 'function') {
    throw internal('tar-stream internals changed (_decodeLongHeader/_consumeHeader/_consumeLongHeader/_continueWrite); the layer extractor needs review');
  }
  let pending: PaxRecords | null = null;
  let zeros = 0;
  inner._decodeLongHeader = function (this: ExtractInternals, buf: Buffer): void {
    const type = this._header?.type ?? 'extended header';
    // tar-stream itself refuses more than 4 MiB before buffering.
    if (buf.length > maxHeaderBytes) {
      throw new Error(`${type} of ${buf.length} bytes exceeds the ${maxHeaderBytes}-byte limit`);
    }
    if (type === 'pax-global-header') return; // ignored, as Go/Docker do
    if (type === 'pax-header') pending = parsePax(buf);
    decodeLong.call(this, buf);
  };
  inner._consumeHeader = function (this: ExtractInternals): boolean {
    const consumed = consumeHeader.call(this);
    if (consumed && this._header === null) zeros++;
    // An extension header of size 0 leaves tar-stream's long-header flag set with nothing to read, and
    // it would then take `size` bytes after the next entry's data for a long header, skipping them (a
    // parser differential: bytes Go reads as an entry's content become headers). Consume it now.
    if (consumed && this._longHeader) {
      // The same confusion follows a size tar-stream decoded as null (undecodable base-256): refuse it.
      const size = this._header?.size;
      if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) {
        this._continueWrite(new Error(`${this._header?.type ?? 'extension header'} has an invalid size field`));
        return false;
      }
      if (this._missing === 0) return this._consumeLongHeader();
    }
    return consumed;
  };
  return {
    extract,
    takePax() {
      const p = pending;
      pending = null;
      return p;
    },
    zeroBlocks: () => zeros,
  };
}

/** Marks errors of the source stream itself (not of its content). */
async function* sourceChunks(input: Readable): AsyncGenerator<Buffer> {
  // destroyOnReturn: false, so the caller decides whether to destroy or drain.
  const it = input.iterator({ destroyOnReturn: false })[Symbol.asyncIterator]();
  try {
    for (;;) {
      let r: IteratorResult<unknown>;
      try {
        r = await it.next();
      } catch (err) {
        // The input's own class survives (a body idle timeout stays DeadlineExceeded); anything else is Unavailable.
        const cls = err instanceof GearError && err.class !== 'Internal' ? err.class : 'Unavailable';
        throw new GearError(cls, `reading the layer stream: ${(err as Error).message}`, { cause: err });
      }
      if (r.done) return;
      const v = r.value;
      yield Buffer.isBuffer(v) ? v : Buffer.from(v as Uint8Array);
    }
  } finally {
    await it.return?.();
  }
}

function* slices(chunk: Buffer, size: number): Generator<Buffer> {
  for (let i = 0; i < chunk.length; i += size) yield chunk.subarray(i, i + size);
}

export type Compression = 'none' | 'gzip' | 'zstd';

export function detectCompression(head: Buffer): Compression | 'xz' | 'bzip2' {
  if (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) return 'gzip';
  if (head.length >= 4 && head.readUInt32LE(0) === 0xfd2fb528) return 'zstd';
  if (head.length >= 6 && head.subarray(0, 6).equals(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))) return 'xz';
  if (head.length >= 3 && head.subarray(0, 3).toString('latin1') === 'BZh') return 'bzip2';
  return 'none';
}

/**
 * The tar bytes of input: plain, gzip or zstd, detected by magic bytes.
 * Pulling drives everything (no buffering beyond one decompressed slice), and
 * ending the iteration early never destroys input.
 */
export async function* layerBytes(input: Readable): AsyncGenerator<Buffer> {
  const src = sourceChunks(input);
  let head: Buffer = Buffer.alloc(0);
  try {
    while (head.length < 6) {
      const r = await src.next();
      if (r.done) break;
      head = head.length === 0 ? r.value : Buffer.concat([head, r.value]);
    }
    const rest = async function* (): AsyncGenerator<Buffer> {
      if (head.length > 0) yield head;
      yield* src;
    };
    const kind = detectCompression(head);
    switch (kind) {
      case 'none':
        yield* rest();
        return;
      case 'gzip':
        yield* gunzip(rest());
        return;
      case 'zstd':
        yield* unzstd(rest());
        return;
      default:
        throw invalidArgument(`layer stream is ${kind}-compressed, which is not supported (use gzip, zstd or none)`);
    }
  } finally {
    await src.return(undefined);
  }
}

async function* gunzip(src: AsyncGenerator<Buffer>): AsyncGenerator<Buffer> {
  const sliced = async function* (): AsyncGenerator<Buffer> {
    for await (const chunk of src) yield* slices(chunk, GZIP_SLICE);
  };
  const z = createGunzip({ chunkSize: 64 * 1024 });
  pipeline(Readable.from(sliced(), { objectMode: false, highWaterMark: GZIP_SLICE }), z, () => {
    // errors surface through the iteration of z below
  });
  try {
    for await (const out of z) yield out as Buffer;
  } catch (err) {
    if (err instanceof GearError) throw err;
    throw invalidArgument(`layer stream is not valid gzip: ${(err as Error).message}`, err);
  } finally {
    z.destroy();
  }
}

async function* unzstd(src: AsyncGenerator<Buffer>): AsyncGenerator<Buffer> {
  const out: Uint8Array[] = [];
  const d = new Decompress((chunk) => {
    if (chunk.length > 0) out.push(chunk);
  });
  const push = (chunk: Uint8Array, final: boolean): void => {
    try {
      d.push(chunk, final);
    } catch (err) {
      throw invalidArgument(`layer stream is not valid zstd: ${(err as Error).message}`, err);
    }
  };
  const guard = new ZstdFrameGuard();
  for await (const chunk of src) {
    for (const s of slices(chunk, ZSTD_SLICE)) {
      guard.check(s); // before fzstd allocates a window the frame header claims
      push(s, false);
      while (out.length > 0) {
        const c = out.shift()!;
        yield Buffer.from(c.buffer, c.byteOffset, c.byteLength);
      }
    }
  }
  push(new Uint8Array(0), true);
  for (const c of out) yield Buffer.from(c.buffer, c.byteOffset, c.byteLength);
}

/**
 * Pumps the decompressed bytes of a layer tar into an extractor, honouring its
 * backpressure; fails past maxBytes. Ends the extractor when the input ends.
 */
export async function feedExtract(tar: Readable, extract: tarStream.Extract, maxBytes = Infinity): Promise<void> {
  let total = 0;
  for await (const chunk of layerBytes(tar)) {
    if (extract.destroying) return;
    total += chunk.length;
    if (total > maxBytes) throw invalidArgument(`layer tar is larger than the ${maxBytes}-byte limit`);
    if (!extract.write(chunk)) {
      if (extract.destroying) return;
      await new Promise<void>((resolve) => {
        const done = (): void => {
          extract.off('drain', done);
          extract.off('close', done);
          resolve();
        };
        extract.on('drain', done);
        extract.on('close', done);
      });
      if (extract.destroying) return;
    }
  }
  if (!extract.destroying) extract.end(undefined);
}
