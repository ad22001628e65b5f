/**
 * Crashes the decoder fuzz target (test/fuzz) found, as fixed cases: the
 * minimized input, and the typed error it must now produce.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { applyLayer } from '../../src/core/archive/apply.js';
import { layerBytes } from '../../src/core/archive/tarreader.js';
import { decompressed } from '../../src/convert/layer-stream.js';
import { GearError } from '../../src/core/errors.js';
import { headerBlock, streamOf } from '../unit/fixtures/tarbuild.js';
import { encodeTarHeader, readTar, tarPadding, tarTrailer } from '../../src/core/index/tar.js';
import { manifestHeader, readIndexLayer } from '../../src/core/index/index-layer.js';
import { parseFilters } from '../../src/frontends/snapshotter/filters.js';

function typedError(fn: () => unknown): GearError {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(GearError);
  return err as GearError;
}

describe('snapshotter filters (test/fuzz/rpc-json.test.ts)', () => {
  it('a \\U escape beyond U+10FFFF is an InvalidArgument, not a RangeError (fuzz: _!="\\U7FFFFFFF)', () => {
    for (const f of ['_!="\\U7FFFFFFF"', 'labels.x=="\\UFFFFFFFF"', 'name=="\\U00110000"']) {
      const err = typedError(() => parseFilters([f]));
      expect(err.class).toBe('InvalidArgument');
      expect(err.message).toMatch(/not a valid Unicode code point/);
    }
  });

  it('surrogate escapes are refused as Go refuses them; valid ones still decode', () => {
    expect(typedError(() => parseFilters(['name=="\\uD800"'])).class).toBe('InvalidArgument');
    const f = parseFilters(['name=="\\U0001F600\\u00e9\\x41"']);
    expect(f.match(() => ['😀éA', true])).toBe(true);
    expect(f.match(() => ['x', true])).toBe(false);
  });
});

/** A zstd frame header claiming a single-segment frame of `content` bytes, then one empty raw block. */
function zstdBomb(content: number): Buffer {
  const fcs = Buffer.alloc(8);
  fcs.writeBigUInt64LE(BigInt(content));
  return Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0xe0]), fcs, Buffer.from([0x01, 0x00, 0x00])]);
}

async function drainError(it: AsyncIterable<Buffer>): Promise<unknown> {
  try {
    for await (const _ of it) {
      // discard
    }
  } catch (err) {
    return err;
  }
  return undefined;
}

describe('zstd layers (test/fuzz/tar-reader.test.ts)', () => {
  it('a 17-byte frame header claiming a 1 GiB window is refused before the decoder allocates it', async () => {
    const before = process.memoryUsage().arrayBuffers;
    const err = await drainError(layerBytes(Readable.from([zstdBomb(2 ** 30)])));
    const grew = process.memoryUsage().arrayBuffers - before;
    expect(err).toBeInstanceOf(GearError);
    expect((err as GearError).class).toBe('InvalidArgument');
    expect((err as GearError).message).toMatch(/1073741824-byte window, over the 536870912-byte limit/);
    expect(grew).toBeLessThan(64 * 1024 * 1024);
  });

  it('the converter\'s source decompressor refuses it too', async () => {
    const err = await drainError(decompressed(Readable.from([zstdBomb(2 ** 31)])));
    expect((err as GearError).class).toBe('InvalidArgument');
    expect((err as GearError).message).toMatch(/window, over the/);
  });

  it('a window descriptor (not single-segment) over the limit is refused; one at the limit is not', async () => {
    // FHD 0x00: no content size, window descriptor follows. exponent 20 → 2^30; exponent 19 → 2^29 (= the limit).
    const frame = (wd: number) => Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, wd, 0x01, 0x00, 0x00]);
    expect(((await drainError(layerBytes(Readable.from([frame(20 << 3)])))) as Error).message).toMatch(/over the 536870912-byte limit/);
    const atLimit = await drainError(layerBytes(Readable.from([frame(19 << 3)])));
    expect(atLimit).toBeUndefined(); // an empty last raw block: a valid, empty stream
  });
});

describe('layer tars through applyLayer (test/fuzz/tar-reader.test.ts)', () => {
  /** applyLayer's outcome, or "hang" when it has not settled within 5 s (a correctness bound). */
  async function applyBounded(tar: Buffer): Promise<{ err?: GearError; hang?: true; left: string[] }> {
    const dest = fs.mkdtempSync(path.join(os.tmpdir(), 'gear-fuzz-regr-'));
    try {
      let timer: NodeJS.Timeout | undefined;
      const r = await Promise.race([
        applyLayer(streamOf(tar, 8192), dest).then(
          () => ({}),
          (err: unknown) => ({ err: err as GearError }),
        ),
        new Promise<{ hang: true }>((resolve) => (timer = setTimeout(() => resolve({ hang: true }), 5000))),
      ]);
      clearTimeout(timer);
      return { ...r, left: fs.readdirSync(dest) };
    } finally {
      fs.rmSync(dest, { recursive: true, force: true });
    }
  }

  it('a base-256 size field tar-stream cannot decode (first byte 0x81) is refused, not read forever (fuzz minimized)', async () => {
    const sizeField = Buffer.from('gQAAAN/p/bIB/AcG', 'base64'); // 0x81 0x00 0x00 0x00 0xdf …: Go: overflow, ErrHeader
    const tar = Buffer.concat([headerBlock({ name: 'a', sizeField }), Buffer.alloc(1024)]);
    const r = await applyBounded(tar);
    expect(r.hang).toBeUndefined();
    expect(r.err).toBeInstanceOf(GearError);
    expect(r.err!.class).toBe('InvalidArgument');
    expect(r.err!.message).toMatch(/"a": the size field is not a valid number/);
    expect(r.left).toEqual([]);
  });

  it('undecodable base-256 mode, uid and gid fields are refused too (Go refuses the header)', async () => {
    for (const at of [100, 108, 116]) {
      const h = headerBlock({ name: 'f', data: 'x' });
      Buffer.from([0x81, 0, 0, 0, 0, 0, 0, 1]).copy(h, at);
      h.fill(0x20, 148, 156);
      let sum = 0;
      for (const x of h) sum += x;
      h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'latin1');
      const r = await applyBounded(Buffer.concat([h, Buffer.from('x'), Buffer.alloc(511), Buffer.alloc(1024)]));
      expect(r.err?.class).toBe('InvalidArgument');
      expect(r.err?.message).toMatch(/field is not a valid number/);
    }
  });
});

describe('empty PAX header (test/fuzz/tar-reader.test.ts: TypeError in the long-header wrapper)', () => {
  /**
   * [PAX, size 0][file a, 513 bytes][file b, 513 bytes: 1 byte, then a header "smuggled"][trailer].
   * Go (and the index tar codec) read a and b. tar-stream 3.2.2 kept its long-header flag set after the
   * empty PAX header, swallowed 513 bytes after a's data, and read "smuggled" out of b's content.
   */
  function smuggling(): Buffer {
    const pax = headerBlock({ name: 'PaxHeaders/a', typeflag: 'x', size: 0 });
    const a = Buffer.concat([headerBlock({ name: 'a', size: 513 }), Buffer.alloc(513, 0x61), Buffer.alloc(511)]);
    const bData = Buffer.concat([Buffer.from('b'), headerBlock({ name: 'smuggled', size: 0 })]);
    const b = Buffer.concat([headerBlock({ name: 'b', size: bData.length }), bData, Buffer.alloc(512 - (bData.length % 512))]);
    return Buffer.concat([pax, a, b, Buffer.alloc(1024)]);
  }

  it('the Go-compatible reader sees a and b', async () => {
    const names: string[] = [];
    for await (const e of readTar(streamOf(smuggling(), 100))) names.push(e.header.path);
    expect(names).toEqual(['a', 'b']);
  });

  it('applyLayer writes a and b (b with the header bytes as content), never "smuggled"', async () => {
    const dest = fs.mkdtempSync(path.join(os.tmpdir(), 'gear-fuzz-regr-'));
    try {
      await applyLayer(streamOf(smuggling(), 100), dest);
      expect(fs.readdirSync(dest).sort()).toEqual(['a', 'b']);
      expect(fs.statSync(path.join(dest, 'b')).size).toBe(513);
      expect(fs.readFileSync(path.join(dest, 'a')).equals(Buffer.alloc(513, 0x61))).toBe(true);
    } finally {
      fs.rmSync(dest, { recursive: true, force: true });
    }
  });
});

describe('PAX header with an undecodable size (test/fuzz/tar-reader.test.ts)', () => {
  it('is refused as corrupt, not a TypeError, and nothing is written', async () => {
    const pax = headerBlock({ name: 'PaxHeaders/a', typeflag: 'x', sizeField: Buffer.from([0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]) });
    const tar = Buffer.concat([pax, headerBlock({ name: 'a', size: 257 }), Buffer.alloc(512), Buffer.alloc(1024)]);
    const dest = fs.mkdtempSync(path.join(os.tmpdir(), 'gear-fuzz-regr-'));
    try {
      const err = await applyLayer(streamOf(tar, 65), dest).then(() => undefined, (e: unknown) => e as GearError);
      expect(err?.class).toBe('InvalidArgument');
      expect(err?.message).toMatch(/pax-header has an invalid size field/);
      expect(fs.readdirSync(dest)).toEqual([]);
    } finally {
      fs.rmSync(dest, { recursive: true, force: true });
    }
  });
});

describe('large version 2 index layers (found with the index-layer fuzz target in mind: sizes it cannot reach)', () => {
  it('a 300,000-entry tree (9 MB, far below the 256 MiB limit) is read, not a stack overflow', async () => {
    const tree = Array.from({ length: 300_000 }, (_, i) => ({ path: `d${String(i).padStart(7, '0')}`, type: 'dir' }));
    const json = Buffer.from(JSON.stringify({ version: 2, tree }));
    const tar = Buffer.concat([encodeTarHeader(manifestHeader(json.length)), json, tarPadding(json.length), tarTrailer()]);
    const layer = await readIndexLayer((async function* () {
      yield tar;
    })());
    expect(layer.entries.length).toBe(300_000);
    expect(layer.entries[299_999]!.path).toBe('d0299999');
  });
});
