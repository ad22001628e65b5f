/**
 * zstd over libzstd (src/core/sys/zstd.ts, native/gear_native.cc): the member
 * encoding of format v3 (docs/format.md §10.1). A member is exactly one zstd
 * frame whose content is exactly the member's byte count; everything else —
 * a size that differs either way, a second frame, a skippable frame, a
 * truncated frame, garbage — is refused as InvalidArgument.
 */
import crypto from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { GearError } from '../../src/core/errors.js';
import {
  ZSTD_MAX_DECOMPRESSED_SIZE,
  ZSTD_MAX_LEVEL,
  ZSTD_VERSION,
  zstdCompress,
  zstdDecompress,
} from '../../src/core/sys/zstd.js';

const ZSTD_MAGIC = Buffer.from([0x28, 0xb5, 0x2f, 0xfd]);

function text(bytes: number): Buffer {
  const line = 'the quick brown fox jumps over the lazy dog; Gear packs members of an image\n';
  return Buffer.from(line.repeat(Math.ceil(bytes / line.length)).slice(0, bytes));
}

/** The InvalidArgument GearError fn throws (fails the test when it throws anything else). */
function refusal(fn: () => unknown): GearError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(GearError);
  expect((caught as GearError).class).toBe('InvalidArgument');
  return caught as GearError;
}

/** A skippable frame (magic 0x184D2A5?, 4-byte little-endian length, payload). */
function skippableFrame(payload: Buffer, variant = 0): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32LE(0x184d2a50 + variant, 0);
  head.writeUInt32LE(payload.length, 4);
  return Buffer.concat([head, payload]);
}

describe('zstd round trip', () => {
  it('links the system libzstd', () => {
    expect(ZSTD_VERSION).toMatch(/^1\.\d+\.\d+$/);
  });

  it.each([
    ['1 byte', Buffer.from([0x42])],
    ['1 MiB of random bytes', crypto.randomBytes(1 << 20)],
    ['compressible text', text(300_000)],
    ['an empty input', Buffer.alloc(0)],
  ])('%s', (_name, data) => {
    const frame = zstdCompress(data);
    expect(frame.subarray(0, 4)).toEqual(ZSTD_MAGIC);
    const back = zstdDecompress(frame, data.length);
    expect(back.length).toBe(data.length);
    expect(back.equals(data)).toBe(true);
  });

  it('compresses text and stays within the format bound for random bytes', () => {
    const t = text(300_000);
    expect(zstdCompress(t).length).toBeLessThan(t.length / 20);
    const r = crypto.randomBytes(1 << 20);
    // docs/format.md §10.1: a zstd member is at most its byte count + 1/128 + 1,024.
    expect(zstdCompress(r).length).toBeLessThanOrEqual(r.length + Math.floor(r.length / 128) + 1024);
  });

  it('accepts any Uint8Array view, not only a Buffer', () => {
    const data = text(10_000);
    const backing = new Uint8Array(data.length + 100);
    backing.set(data, 50);
    const view = backing.subarray(50, 50 + data.length);
    const frame = zstdCompress(view);
    const framed = new Uint8Array(frame.length + 7);
    framed.set(frame, 3);
    expect(zstdDecompress(framed.subarray(3, 3 + frame.length), data.length).equals(data)).toBe(true);
  });

  it('levels change the output and all round trip; level 3 is the default', () => {
    const data = Buffer.concat([text(200_000), crypto.randomBytes(20_000), text(100_000)]);
    const sizes = new Map<number, number>();
    for (const level of [1, 3, 6, 19]) {
      const frame = zstdCompress(data, level);
      sizes.set(level, frame.length);
      expect(zstdDecompress(frame, data.length).equals(data)).toBe(true);
    }
    expect(zstdCompress(data).equals(zstdCompress(data, 3))).toBe(true);
    expect(sizes.get(19)!).toBeLessThan(sizes.get(1)!);
    // Negative ("fast") levels are libzstd's too.
    expect(zstdDecompress(zstdCompress(data, -5), data.length).equals(data)).toBe(true);
  });

  it('refuses a level libzstd does not have', () => {
    for (const level of [ZSTD_MAX_LEVEL + 1, 2.5, Number.NaN, -1e9]) {
      expect(refusal(() => zstdCompress(text(10), level)).message).toMatch(/compression level/);
    }
  });
});

describe('zstd refusals', () => {
  const data = text(100_000);
  const frame = zstdCompress(data);

  it('refuses a declared size smaller than the content', () => {
    expect(refusal(() => zstdDecompress(frame, data.length - 1)).message).toMatch(
      new RegExp(`holds ${data.length} bytes, expected ${data.length - 1}`),
    );
    expect(refusal(() => zstdDecompress(frame, 0)).message).toMatch(/expected 0/);
  });

  it('refuses a declared size larger than the content', () => {
    expect(refusal(() => zstdDecompress(frame, data.length + 1)).message).toMatch(
      new RegExp(`holds ${data.length} bytes, expected ${data.length + 1}`),
    );
  });

  it('refuses a size mismatch when the frame does not record its content size', () => {
    // `printf 'hello gear\n' | zstd -c | xxd -p`: the CLI streams stdin, so
    // the frame header has no content size (and carries a checksum).
    const streamed = Buffer.from('28b52ffd045859000068656c6c6f20676561720ad33b515c', 'hex');
    expect(zstdDecompress(streamed, 11).toString()).toBe('hello gear\n');
    expect(refusal(() => zstdDecompress(streamed, 10)).message).toMatch(/more than the expected 10 bytes/);
    expect(refusal(() => zstdDecompress(streamed, 12)).message).toMatch(/holds 11 bytes, expected 12/);
  });

  it('refuses two concatenated frames', () => {
    const two = Buffer.concat([frame, zstdCompress(Buffer.from('more'))]);
    expect(refusal(() => zstdDecompress(two, data.length)).message).toMatch(/follow the frame/);
    expect(refusal(() => zstdDecompress(two, data.length + 4)).message).toMatch(/exactly one frame/);
  });

  it('refuses trailing bytes after the frame', () => {
    expect(refusal(() => zstdDecompress(Buffer.concat([frame, Buffer.from([0])]), data.length)).message).toMatch(
      /1 bytes follow the frame/,
    );
  });

  it('refuses a skippable frame, alone or before or after a frame', () => {
    for (const variant of [0, 7, 15]) {
      const skip = skippableFrame(Buffer.from('metadata'), variant);
      expect(refusal(() => zstdDecompress(skip, 0)).message).toMatch(/skippable frame/);
      expect(refusal(() => zstdDecompress(skip, 8)).message).toMatch(/skippable frame/);
      expect(refusal(() => zstdDecompress(Buffer.concat([skip, frame]), data.length)).message).toMatch(
        /skippable frame/,
      );
      expect(refusal(() => zstdDecompress(Buffer.concat([frame, skip]), data.length)).message).toMatch(
        /follow the frame/,
      );
    }
  });

  it('refuses a truncated frame, at every kind of cut', () => {
    for (const cut of [1, 3, 4, 5, 8, Math.floor(frame.length / 2), frame.length - 1]) {
      refusal(() => zstdDecompress(frame.subarray(0, cut), data.length));
    }
  });

  it('refuses garbage and corrupted frames', () => {
    refusal(() => zstdDecompress(Buffer.alloc(0), 0));
    expect(refusal(() => zstdDecompress(Buffer.from('not zstd at all'), 15)).message).toMatch(/bad magic/);
    expect(refusal(() => zstdDecompress(crypto.randomBytes(4096), 4096)).message).toMatch(/zstd/);
    // Right magic, garbage after it.
    refusal(() => zstdDecompress(Buffer.concat([ZSTD_MAGIC, crypto.randomBytes(4096)]), 4096));
    // A legacy (v0.7) frame magic is not a member either.
    refusal(() => zstdDecompress(Buffer.concat([Buffer.from([0x27, 0xb5, 0x2f, 0xfd]), frame.subarray(4)]), 100_000));
    // Flipped bytes in the compressed blocks: refused or, at worst, different
    // bytes of the right size (no checksum: the member's sha256 catches those).
    const bad = Buffer.from(frame);
    for (let i = 20; i < bad.length - 4; i += 97) bad[i] ^= 0xa5;
    try {
      const out = zstdDecompress(bad, data.length);
      expect(out.length).toBe(data.length);
    } catch (err) {
      expect((err as GearError).class).toBe('InvalidArgument');
    }
  });

  it('refuses a size that is not a whole number within the limit, before decompressing', () => {
    for (const size of [-1, 1.5, Number.NaN, ZSTD_MAX_DECOMPRESSED_SIZE + 1, 2 ** 53]) {
      expect(refusal(() => zstdDecompress(frame, size)).message).toMatch(/decompressed size/);
    }
    expect(ZSTD_MAX_DECOMPRESSED_SIZE).toBe(256 * 1024 * 1024);
  });

  it('refuses an input that is not a Uint8Array', () => {
    refusal(() => zstdDecompress('x' as unknown as Uint8Array, 1));
    refusal(() => zstdCompress([1, 2, 3] as unknown as Uint8Array));
  });
});

describe('zstd on worker threads', () => {
  it('loads and works in worker threads, several at once and one after another', async () => {
    const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
    const addon = process.env.GEAR_NATIVE_MODULE ?? path.join(root, 'build', 'Release', 'gear_native.node');
    // The addon itself (the worker cannot import the TypeScript sources).
    const source = `
      const { parentPort, workerData } = require('node:worker_threads');
      const crypto = require('node:crypto');
      const native = require(workerData.addon);
      const out = [];
      for (let i = 0; i < 20; i++) {
        const data = Buffer.concat([Buffer.from('member ' + i + ' ').fill(i, 0, 3), crypto.randomBytes(1000 * i), Buffer.alloc(50000, i)]);
        const frame = native.zstdCompress(data, 3);
        const back = native.zstdDecompress(frame, data.length);
        out.push(back.equals(data) && frame.length < data.length);
      }
      let refused = '';
      try { native.zstdDecompress(Buffer.concat([native.zstdCompress(Buffer.from('a'), 3), Buffer.from([1])]), 1); }
      catch (err) { refused = err.code + ' ' + err.message; }
      parentPort.postMessage({ ok: out.every(Boolean), refused, version: native.zstd.version, seed: workerData.seed,
        frame: native.zstdCompress(Buffer.from(workerData.seed), 3) });
    `;
    const run = (seed: string) =>
      new Promise<{ ok: boolean; refused: string; version: string; seed: string; frame: Uint8Array }>(
        (resolve, reject) => {
          const w = new Worker(source, { eval: true, workerData: { addon, seed } });
          w.once('message', (m) => {
            resolve(m);
            void w.terminate();
          });
          w.once('error', reject);
          w.once('exit', (code) => reject(new Error(`worker exited with ${code} before answering`)));
        },
      );
    const first = await Promise.all(['alpha', 'beta', 'gamma'].map((s) => run(s.repeat(1000))));
    const later = await run('delta'.repeat(1000)); // after the first workers are gone
    for (const r of [...first, later]) {
      expect(r.ok).toBe(true);
      expect(r.version).toBe(ZSTD_VERSION);
      expect(r.refused).toMatch(/^ERR_GEAR_ZSTD .*follow the frame/);
      // A frame made on a worker decompresses on the main thread.
      expect(zstdDecompress(r.frame, r.seed.length).toString()).toBe(r.seed);
    }
  });
});
