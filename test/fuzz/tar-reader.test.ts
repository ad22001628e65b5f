/**
 * Fuzzes the tar readers:
 *  - the layer reader (src/core/archive/tarreader.ts: layerBytes + the
 *    hardened tar-stream extractor + the strict PAX parser), driven the way
 *    applyLayer drives it, over arbitrary bytes and over real tars with
 *    mutated headers, lying sizes, truncation, PAX/GNU long names and bogus
 *    PAX records, plain or gzip; and zstd frames with hostile headers;
 *  - the index tar codec (src/core/index/tar.ts readTar) over the same inputs;
 *  - a sample through the real applyLayer onto a temp dir: nothing lands
 *    outside the root, trusted.overlay.* never arrives from the tar, and a
 *    refused layer leaves the root empty.
 * Every case ends in entries or a clean error, within a time bound.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { gzipSync } from 'node:zlib';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { applyLayer } from '../../src/core/archive/apply.js';
import { feedExtract, hardenedExtract } from '../../src/core/archive/tarreader.js';
import { MAX_ZSTD_WINDOW } from '../../src/core/archive/zstd-frames.js';
import { GearError, invalidArgument } from '../../src/core/errors.js';
import { readTar, TarFormatError } from '../../src/core/index/tar.js';
import { listXattrs } from '../../src/core/sys/xattr.js';
import { foreignOverlayXattrs, treeSnapshot } from '../helpers/tree-check.js';
import {
  anyBytes,
  assertAsync,
  casesRun,
  count,
  describe as describeErr,
  expectCleanError,
  expectTyped,
  outcomeAsync,
  printCounts,
  requiredCases,
} from './harness.js';
import { buildTar, tarCaseArb, type TarCase } from './tar-gen.js';

const LAYER = 'tar-reader (tarreader.ts)';
const INDEX_TAR = 'tar-reader (index/tar.ts)';
const APPLY = 'tar-apply (apply.ts onto a temp dir)';

/** Splits into chunks (chunk boundaries inside headers and PAX records are where streaming parsers break). */
function chunked(buf: Buffer, size: number): Readable {
  const parts: Buffer[] = [];
  for (let i = 0; i < buf.length; i += size) parts.push(buf.subarray(i, i + size));
  return Readable.from(parts, { objectMode: false });
}

/** What the layer reader delivered. */
interface LayerRead {
  entries: number;
  dataBytes: number;
}

/**
 * The layer reader as applyLayer runs it (its own feedExtract, the same
 * destroy order), without touching the filesystem. Plain Errors from tar-stream and
 * the PAX parser are its validation errors (applyLayer reports them as
 * InvalidArgument); the zero-block rule is checked as applyLayer checks it.
 */
async function readLayer(input: Readable, maxHeaderBytes: number): Promise<LayerRead> {
  const hx = hardenedExtract(maxHeaderBytes);
  const extract = hx.extract;
  let feedError: unknown;
  const feeding = feedExtract(input, extract).catch((err: unknown) => {
    feedError = err;
    extract.destroy(err as Error);
  });
  const read: LayerRead = { entries: 0, dataBytes: 0 };
  try {
    try {
      for await (const entry of extract) {
        if (hx.zeroBlocks() > 0) throw invalidArgument('layer tar has data after its end-of-archive marker');
        hx.takePax();
        read.entries++;
        const h = entry.header;
        if (typeof h.name !== 'string') throw new Error(`entry name of type ${typeof h.name}`);
        // As applyLayer does, before any data is read: tar-stream 3.2.2 never ends the data stream of a
        // non-file entry whose size claims bytes the input does not have (it hangs), so nothing may read it.
        // Likewise a size that is not a safe integer (base-256 2^80, -0) or that tar-stream could not decode (null).
        for (const v of [h.size, h.mode, h.uid, h.gid]) if ((v as unknown) === null) throw invalidArgument('a numeric field is not a valid number');
        const size = h.size ?? 0;
        if (!Number.isSafeInteger(size) || size < 0 || Object.is(size, -0)) throw invalidArgument(`invalid size ${size}`);
        const isFile = h.type === 'file' || h.type === 'contiguous-file';
        if (!isFile && size !== 0) throw invalidArgument(`a ${h.type} entry must not carry data`);
        for await (const c of entry as AsyncIterable<Buffer>) read.dataBytes += c.length;
      }
    } catch (err) {
      throw feedError ?? err;
    }
    await feeding;
    if (feedError) throw feedError;
    return read;
  } finally {
    extract.destroy();
    input.destroy();
    await feeding;
  }
}

/** readTar over the bytes, every body read (or skipped), with the codec's invariants on each header. */
async function readIndexTar(buf: Buffer, chunk: number): Promise<number> {
  let n = 0;
  for await (const e of readTar(chunked(buf, chunk))) {
    const h = e.header;
    if (!Number.isSafeInteger(h.size) || h.size < 0) throw new Error(`size ${h.size}`);
    if (h.type !== 'file' && h.size !== 0) throw new Error(`a ${h.type} with a body`);
    if (h.path.includes('\0') || h.linkname.includes('\0')) throw new Error('NUL in a path');
    if (!Number.isSafeInteger(h.uid) || !Number.isSafeInteger(h.gid) || !Number.isSafeInteger(h.mtime)) throw new Error('bad numeric field');
    if (n++ % 2 === 0) {
      let got = 0;
      for await (const c of e.body()) got += c.length;
      if (got !== h.size) throw new Error(`body of ${got} bytes for size ${h.size}`);
    }
  }
  return n;
}

/**
 * fzstd (a third-party decoder) throws RangeErrors on malformed frames;
 * layerBytes catches every fzstd error at that boundary and reports it as
 * InvalidArgument "layer stream is not valid zstd: …". That wrapper is the
 * typed error, so such a cause is clean; a RangeError anywhere else is not.
 */
const fzstdCause = (err: GearError) => (cause: Error): boolean => err.message.startsWith('layer stream is not valid zstd') && cause === err.cause;

const chunkArb = fc.oneof({ weight: 1, arbitrary: fc.integer({ min: 1, max: 64 }) }, { weight: 4, arbitrary: fc.integer({ min: 65, max: 8192 }) });
const compressionArb = fc.constantFrom('none', 'none', 'none', 'none', 'none', 'gzip') as fc.Arbitrary<'none' | 'gzip'>;

const layerInputArb = fc.oneof(
  { weight: 4, arbitrary: fc.record({ tar: tarCaseArb, raw: fc.constant(undefined) }) },
  { weight: 1, arbitrary: fc.record({ tar: fc.constant(undefined), raw: anyBytes(3000) }) },
);

function inputBytes(v: { tar: TarCase | undefined; raw: Uint8Array | undefined }): Buffer {
  return v.tar ? buildTar(v.tar) : Buffer.from(v.raw!);
}

afterAll(() => {
  printCounts('tar-reader.test.ts');
});

describe('layer tar reader (tarreader.ts)', () => {
  it('real tars with mutated headers, lying sizes, PAX/GNU extensions, truncation; and arbitrary bytes', async () => {
    await assertAsync('tar: layer reader', fc.tuple(layerInputArb, chunkArb, compressionArb), 48_000, async ([v, chunk, compression]) => {
      count(LAYER);
      const tar = inputBytes(v);
      const bytes = compression === 'gzip' ? gzipSync(tar) : tar;
      await outcomeAsync(
        () => readLayer(chunked(bytes, chunk), 64 * 1024),
        (err) => expectCleanError(err, ['InvalidArgument'], 'layer reader', err instanceof GearError ? fzstdCause(err) : undefined),
        (r) => {
          if (r.dataBytes > tar.length) throw new Error(`read ${r.dataBytes} data bytes from a ${tar.length}-byte tar`);
        },
      );
    });
  });

  it('zstd streams with hostile frame headers: a window over the limit is refused before it is allocated', async () => {
    // magic, frame header descriptor, window descriptor / content size, then a few blocks of any type.
    const frameArb = fc.record({
      fhd: fc.integer({ min: 0, max: 255 }),
      header: fc.uint8Array({ minLength: 0, maxLength: 14 }),
      blocks: fc.array(fc.uint8Array({ minLength: 3, maxLength: 12 }), { maxLength: 3 }),
      window: fc.integer({ min: 0, max: 31 }),
    });
    await assertAsync('tar: zstd frames', frameArb, 2_000, async ({ fhd, header, blocks, window }) => {
      count(LAYER);
      const single = (fhd & 0x20) !== 0;
      const hdr = Buffer.from(header);
      if (!single && hdr.length > 0) hdr[0] = (window << 3) | (hdr[0]! & 7);
      const claimed = claimedWindow(fhd, hdr);
      // An accepted large window is legitimate (and fzstd allocates it): keep this property's allocations small.
      if (claimed !== undefined && claimed <= MAX_ZSTD_WINDOW && claimed > 8 << 20) return;
      const bytes = Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd, fhd]), hdr, ...blocks.map((b) => Buffer.from(b))]);
      await outcomeAsync(
        () => readLayer(chunked(bytes, 97), 64 * 1024),
        (err) => {
          expectCleanError(err, ['InvalidArgument'], 'zstd layer', err instanceof GearError ? fzstdCause(err) : undefined);
          if (claimed !== undefined && claimed > MAX_ZSTD_WINDOW && !/window/.test((err as Error).message)) {
            throw new Error(`a ${claimed}-byte window was not refused for its size: ${(err as Error).message}`);
          }
        },
        () => {
          if (claimed !== undefined && claimed > MAX_ZSTD_WINDOW) throw new Error(`a ${claimed}-byte window was accepted`);
        },
      );
    });
    expect(casesRun(LAYER)).toBeGreaterThanOrEqual(requiredCases(50_000));
  });
});

/** The window a frame header claims, when the header is complete (the format's rules, independent of the guard). */
function claimedWindow(fhd: number, hdr: Buffer): number | undefined {
  const single = (fhd & 0x20) !== 0;
  const did = [0, 1, 2, 4][fhd & 3]!;
  const fcsFlag = fhd >> 6;
  const fcsBytes = fcsFlag === 0 ? (single ? 1 : 0) : [0, 2, 4, 8][fcsFlag]!;
  if (hdr.length < (single ? 0 : 1) + did + fcsBytes) return undefined;
  if (!single) {
    const wd = hdr[0]!;
    const base = 2 ** (10 + (wd >> 3));
    return base + (base / 8) * (wd & 7);
  }
  let v = 0;
  for (let k = fcsBytes - 1; k >= 0; k--) v = v * 256 + hdr[did + k]!;
  return v + (fcsFlag === 1 ? 256 : 0);
}

describe('index tar codec (index/tar.ts readTar)', () => {
  it('the same hostile tars and arbitrary bytes end in entries or a TarFormatError', async () => {
    await assertAsync('tar: index readTar', fc.tuple(layerInputArb, chunkArb), 50_000, async ([v, chunk]) => {
      count(INDEX_TAR);
      await outcomeAsync(
        () => readIndexTar(inputBytes(v), chunk),
        (err) => {
          expectTyped(err, ['InvalidArgument'], 'readTar');
          if (!(err instanceof TarFormatError)) throw new Error(`readTar threw a ${describeErr(err)}, not a TarFormatError`);
        },
      );
    });
    expect(casesRun(INDEX_TAR)).toBeGreaterThanOrEqual(requiredCases(50_000));
  });
});

// ---------------------------------------------------------------------------
// Through the real apply code

let base: string;
let outside: string;
let outsideBefore: string;

/** Every path of the applied tree stays inside it, and overlay xattrs are only the opaque markers apply sets. */
function checkApplied(root: string): void {
  const bad = foreignOverlayXattrs(root);
  if (bad.length) throw new Error(`arrived from the tar: ${bad.slice(0, 5).join('; ')}`);
}

beforeAll(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), 'gear-fuzz-apply-'));
  outside = path.join(base, 'outside');
  fs.mkdirSync(path.join(outside, 'etc'), { recursive: true });
  fs.writeFileSync(path.join(outside, 'victim'), 'untouched', { mode: 0o600 });
  fs.writeFileSync(path.join(outside, 'etc', 'passwd'), 'root:x:0:0\n');
  fs.symlinkSync('victim', path.join(outside, 'link'));
  outsideBefore = treeSnapshot(outside);
});

afterAll(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

describe('layer tars through applyLayer onto a temp dir', () => {
  it('nothing lands outside the root, no overlay xattr arrives from the tar, refused layers leave the root empty', async () => {
    let n = 0;
    await assertAsync('tar: applyLayer', fc.tuple(tarCaseArb, chunkArb), 3_000, async ([c, chunk]) => {
      count(APPLY);
      const dest = path.join(base, `d${n++}`);
      fs.mkdirSync(dest);
      try {
        await outcomeAsync(
          () => applyLayer(chunked(buildTar(c), chunk), dest, { limits: { maxHeaderBytes: 64 * 1024, maxEntries: 100 } }),
          (err) => {
            expectTyped(err, ['InvalidArgument'], 'applyLayer');
            if (fs.readdirSync(dest).length !== 0) throw new Error(`refused layer left ${fs.readdirSync(dest).join(', ')} behind`);
            if (listXattrs(dest).length !== 0) throw new Error('refused layer left xattrs on the root');
          },
          () => checkApplied(dest),
        );
        const now = treeSnapshot(outside);
        if (now !== outsideBefore) throw new Error(`the tree outside the root changed:\n${now}`);
        if (fs.readdirSync(base).some((e) => e !== 'outside' && !/^d\d+$/.test(e))) throw new Error(`something appeared next to the root: ${fs.readdirSync(base).join(', ')}`);
      } finally {
        fs.rmSync(dest, { recursive: true, force: true });
      }
    });
    expect(casesRun(APPLY)).toBeGreaterThanOrEqual(requiredCases(3_000));
  });
});

