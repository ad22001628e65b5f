/**
 * Format version 3 (docs/format.md §10): the codec round-trips a manifest
 * with packs, single members and chunked files, and refuses hostile layouts
 * with an error naming the rule.
 */
import { describe, expect, it } from 'vitest';
import { encodeIndexManifest, parseIndexManifest, type IndexManifest } from '../../src/core/index/manifest.js';
import { chunkBytes, maxZstdLength } from '../../src/core/index/pack-layout.js';

const d = (c: string) => `sha256:${c.repeat(64).slice(0, 64)}`;
const MiB = 1024 * 1024;

function doc(): Record<string, any> {
  return {
    version: 3,
    location: { registry: 'localhost:5000', repository: 'team/app' },
    packs: [
      { digest: d('a'), size: 10_000 },
      { digest: d('b'), size: 5 * MiB },
    ],
    tree: [
      { path: 'bin', type: 'dir', mode: 0o755 },
      { path: 'bin/a', type: 'file', mode: 0o755, digest: d('1'), size: 5000, pack: 0, offset: 0, length: 2000 },
      { path: 'bin/b', type: 'file', mode: 0o644, digest: d('2'), size: 8, pack: 0, offset: 2000, length: 8, encoding: 'raw' },
      { path: 'bin/c', type: 'file', mode: 0o644, digest: d('1'), size: 5000, pack: 0, offset: 0, length: 2000 },
      {
        path: 'bin/d',
        type: 'file',
        mode: 0o755,
        digest: d('3'),
        size: 2 * MiB + 10,
        chunkSize: MiB,
        chunks: [
          { pack: 1, offset: 0, length: 1000, digest: d('4') },
          { pack: 1, offset: 1000, length: MiB, digest: d('5'), encoding: 'raw' },
          { pack: 1, offset: 1000 + MiB, length: 10, digest: d('6'), encoding: 'raw' },
        ],
      },
    ],
    prefetch: ['bin/d', 'bin/a'],
  };
}

const parse = (o: unknown) => parseIndexManifest(Buffer.from(JSON.stringify(o)));
function refused(mutate: (o: Record<string, any>) => void, message: RegExp): void {
  const o = doc();
  mutate(o);
  expect(() => parse(o)).toThrow(message);
}

describe('format v3 codec', () => {
  it('parses packs, members and chunks, and encodes them canonically back to the same bytes', () => {
    const bytes = Buffer.from(JSON.stringify(doc()));
    const m = parseIndexManifest(bytes);
    expect(m.version).toBe(3);
    expect(m.packs).toEqual([{ digest: d('a'), size: 10_000 }, { digest: d('b'), size: 5 * MiB }]);
    const big = m.files.find((f) => f.path === 'bin/d')!;
    expect(big.chunkSize).toBe(MiB);
    expect(big.chunks!.map((c) => c.encoding)).toEqual(['zstd', 'raw', 'raw']);
    expect(chunkBytes(big, 2)).toBe(10);
    expect(m.files.find((f) => f.path === 'bin/b')!.member).toEqual({ pack: 0, offset: 2000, length: 8, encoding: 'raw' });
    expect(m.files.find((f) => f.path === 'bin/a')!.member!.encoding).toBe('zstd');
    expect(encodeIndexManifest(m).toString()).toBe(bytes.toString());
  });

  it('refuses a member whose range runs past its pack', () => {
    refused((o) => (o.tree[1].offset = 9_000), /run past the end of pack 0/);
  });

  it('refuses offsets and lengths that overflow instead of wrapping', () => {
    refused((o) => {
      o.tree[1].offset = Number.MAX_SAFE_INTEGER;
      o.tree[1].length = 2;
    }, /run past the end|whole number/);
    refused((o) => (o.tree[1].length = 2 ** 60), /"length" must be a whole number/);
    refused((o) => (o.tree[1].offset = -1), /"offset" must be a whole number/);
    refused((o) => (o.packs[0].size = 1e300), /"size" must be a whole number/);
  });

  it('refuses overlapping ranges, and identical ranges that name different contents', () => {
    refused((o) => (o.tree[2].offset = 1999), /overlap/);
    refused((o) => {
      o.tree[2].offset = 0;
      o.tree[2].length = 2000;
      o.tree[2].size = 5000;
      delete o.tree[2].encoding;
    }, /names for other content/);
    refused((o) => (o.tree[4].chunks[1].offset = 999), /overlap/);
  });

  it('refuses a chunk list that does not add up to the size', () => {
    refused((o) => o.tree[4].chunks.pop(), /2 chunks do not add up to the size/);
    refused((o) => (o.tree[4].size = 3 * MiB + 1), /do not add up to the size/);
    refused((o) => (o.tree[4].chunks[2].length = 11), /raw member of 10 bytes must have "length" 10/);
    refused((o) => (o.tree[4].chunkSize = 1000), /"chunkSize" must be a whole number in 65536/);
    refused((o) => (o.tree[4].size = 2 ** 50), /beyond the 1048576 allowed/);
  });

  it('bounds a zstd member by what a frame of its bytes can take', () => {
    expect(maxZstdLength(5000)).toBe(5000 + 39 + 1024);
    refused((o) => (o.tree[1].length = maxZstdLength(5000) + 1), /takes at most/);
    refused((o) => (o.tree[2].length = 9), /must have "length" 8/);
  });

  it('refuses a bad pack index, a repeated pack, an unknown encoding and the v2 blob member', () => {
    refused((o) => (o.tree[1].pack = 2), /"pack" must be a whole number in 0…1/);
    refused((o) => (o.packs[1].digest = d('a')), /listed twice/);
    refused((o) => (o.packs[0].digest = 'sha256:../../x'), /"digest" must be sha256/);
    refused((o) => (o.tree[1].encoding = 'brotli'), /"encoding" must be "raw"/);
    refused((o) => (o.tree[1].blob = { mediaType: 'application/vnd.gear.file.v1+gzip', digest: d('9'), size: 10 }), /"blob" is a version 1\/2 member/);
    refused((o) => delete o.packs, /version 3 needs "packs"/);
    refused((o) => (o.packs = new Array(1_000_001).fill(0)), /beyond the 1000000 allowed/);
  });

  it('refuses a file with both or neither of a member and chunks, and one content stored two ways', () => {
    refused((o) => (o.tree[1].chunks = []), /exactly one of/);
    refused((o) => {
      delete o.tree[1].pack;
      delete o.tree[1].offset;
      delete o.tree[1].length;
    }, /neither is/);
    refused((o) => {
      o.tree[3].offset = 3000;
    }, /stored differently here/);
    refused((o) => {
      o.tree[1].size = 65 * MiB;
      o.packs[0].size = 100 * MiB;
      o.tree[1].length = 64 * MiB;
      o.tree[3].size = 65 * MiB;
      o.tree[3].length = 64 * MiB;
      o.tree[2].offset = 64 * MiB;
    }, /at most 67108864 bytes/);
  });

  it('keeps packs out of versions 1 and 2, and pack members out of a v2 encoder', () => {
    refused((o) => (o.version = 2), /version 2 has no "packs"/);
    const m = parse(doc()) as IndexManifest;
    expect(() => encodeIndexManifest({ ...m, version: 2 })).toThrow(/pack members are version 3/);
    expect(() => encodeIndexManifest({ ...m, packs: undefined })).toThrow(/needs its packs/);
  });

  it('refuses a pack member on a non-file entry', () => {
    refused((o) => Object.assign(o.tree[0], { pack: 0, offset: 0, length: 1 }), /only a regular file/);
  });
});
